"""torch's reduce ops and tensors as hpcml.comm arguments: what MPI can compute exactly, and a
one-line refusal for the rest."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed import ReduceOp

_NAMES = {ReduceOp.SUM: "sum", ReduceOp.PRODUCT: "prod", ReduceOp.MIN: "min",
          ReduceOp.MAX: "max", ReduceOp.BAND: "band", ReduceOp.BOR: "bor",
          ReduceOp.BXOR: "bxor", ReduceOp.AVG: "sum"}
# bool tensors: MPI's logical ops (what torch computes on bool: sum = or, product = and)
_BOOL = {"sum": "lor", "max": "lor", "bor": "lor", "prod": "land", "min": "land",
         "band": "land", "bxor": "lxor"}
_BITWISE = ("band", "bor", "bxor")


def mpi_op(op: object, dtype: torch.dtype) -> tuple[str, bool]:
    """``(hpcml op name, average)`` of torch reduce op ``op`` on ``dtype`` tensors: ``average``
    means divide the sum by the group size. Raises ``ValueError`` (one line) for what MPI
    cannot compute exactly: ``PREMUL_SUM``, bitwise ops on floating point, ``AVG`` on integers
    or bool, ``MIN``/``MAX`` on complex."""
    red = getattr(op, "op", op)
    name = _NAMES.get(red)
    if name is None:
        raise ValueError(f"hpcml backend: reduce op {red} is not supported; use SUM, PRODUCT, "
                         "MIN, MAX, BAND, BOR, BXOR or AVG (scale the tensor yourself for "
                         "PREMUL_SUM)")
    average = red == ReduceOp.AVG
    if dtype == torch.bool:
        if average:
            raise ValueError("hpcml backend: AVG of a bool tensor has no bool result; convert "
                             "it to float first")
        return _BOOL[name], False
    if name in _BITWISE and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"hpcml backend: {red} on a {dtype} tensor: bitwise reductions need "
                         "an integer or bool tensor")
    if average and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"hpcml backend: AVG of a {dtype} tensor would truncate; use SUM and "
                         "divide, or convert it to float first")
    if dtype.is_complex and name in ("min", "max"):
        raise ValueError(f"hpcml backend: {red} is not defined on complex tensors")
    return name, average


def cpu(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, which must be a CPU tensor; raises ``ValueError`` (one line)
    otherwise."""
    if tensor.device.type != "cpu":
        raise ValueError(f"hpcml backend: tensor on {tensor.device}: this backend moves CPU "
                         "tensors only (the MPI under it is not CUDA-aware); move it with "
                         ".cpu(), or use init_process_group('cpu:hpcml,cuda:nccl')")
    return tensor


def writable(tensor: torch.Tensor) -> tuple[torch.Tensor, list[Callable[[], object]]]:
    """A contiguous buffer MPI may write for ``tensor`` (the tensor itself when contiguous) and
    the steps that copy it back afterwards (none, or one)."""
    cpu(tensor)
    if tensor.is_contiguous():
        return tensor, []
    buf = tensor.contiguous()
    return buf, [lambda: tensor.copy_(buf)]


def readable(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer with ``tensor``'s values, for MPI to read."""
    return cpu(tensor).contiguous()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory of ``a`` and ``b`` intersects (MPI forbids aliased buffers)."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes and a.nbytes > 0 and b.nbytes > 0
