"""Horovod's ``join()`` over MPI: a rank that has run out of data calls ``join()`` and from then
on takes part, with a neutral contribution, in the allreduces the other ranks still make, until
every rank has joined.

MPI matches collectives by order, so the ranks must agree on what comes next: every operation
over the global process set starts with one small header allreduce (13 int64, ``MAX``) that says
whether some rank has joined and, from the ranks still working, which operation follows (kind,
op, dtype, shape). The working ranks must agree on kind, for an allreduce on op, dtype and
shape, for a broadcast on root, dtype and shape: when they do not, every one of them raises
``RuntimeError`` naming the mismatch (as Horovod does; plain MPI would reduce garbage or hang).
A rank inside ``join()`` loops on that header:

- an **allreduce** (``allreduce``/``grouped_allreduce``, their in-place and async forms, and the
  gradient reduction of ``DistributedOptimizer``): the joined rank contributes zeros to ``Sum``
  and ``Average`` (an average still divides by the whole size, as Horovod does) and the identity
  to ``Min``, ``Max`` and ``Product`` (so their result is that of the working ranks);
- any **other** operation (allgather, broadcast, alltoall, reducescatter, barrier, the object
  operations, the broadcasts of parameters and optimizer state, ``add_process_set``) has no
  neutral contribution: every working rank raises ``RuntimeError`` (as Horovod does), and the
  joined ranks keep waiting;
- when every rank is in ``join()``, all return the same rank: the one that joined last.

Operations over a process set other than the global one are not negotiated: a joined rank does
not take part in them (as in Horovod, join is over the global set). The header costs one
latency-bound allreduce per operation (one per optimizer step for ``DistributedOptimizer``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from hpcml.horovod.basics import MPI_OPS, HorovodInternalError, Max, Min, Product, communicator

ALLREDUCE, OPTIMIZER, OTHER, JOIN = 1, 2, 3, 4
# header fields (MAX-reduced): someone joined, someone working, kind, op, dtype, shape digest,
# numel, optimizer index, rank joining in this round, then kind, op, dtype and shape digest
# negated (their MAX is minus the working ranks' minimum: the ranks agree when max == min)
_JOINED, _WORKING, _KIND, _OP, _DTYPE, _SHAPE, _NUMEL, _INDEX, _NEW = range(9)
_AGREE = (_KIND, _OP, _DTYPE, _SHAPE)
FIELDS = 9 + len(_AGREE)
_LOW = -(2**62)  # a joined rank's entry in the negated fields
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)

# the DistributedOptimizers over the global set, in construction order (the same on every rank)
_OPTIMIZERS: list[weakref.ReferenceType[Any]] = []


def register_optimizer(optimizer: Any) -> int:
    """Record a ``DistributedOptimizer`` built over the global set (collective construction
    keeps the index equal on every rank); returns its index."""
    _OPTIMIZERS.append(weakref.ref(optimizer))
    return len(_OPTIMIZERS) - 1


def _is_global(process_set: Any) -> bool:
    return process_set is None or process_set.ranks is None


def negotiate(what: str, process_set: Any = None, kind: int = OTHER,
              tensor: torch.Tensor | None = None, op: int = 0, index: int = 0,
              rows_free: bool = False) -> bool:
    """Called by every working rank before an operation over ``process_set`` (collective over
    it). Returns True when some rank has joined (the joined ranks then take part in an
    allreduce); raises ``RuntimeError`` for any other operation after a rank joined, and
    :class:`HorovodInternalError` on every rank when the ranks' ``kind``, ``op`` or
    ``tensor`` dtype and shape (beyond the first dimension with ``rows_free``) differ."""
    if not _is_global(process_set):
        return False
    header = torch.full((FIELDS,), -1, dtype=torch.int64)
    header[_JOINED], header[_WORKING], header[_KIND], header[_OP] = 0, 1, kind, op
    header[_DTYPE] = header[_SHAPE] = header[_NUMEL] = 0
    if tensor is not None:
        header[_DTYPE], header[_NUMEL] = DTYPES.index(tensor.dtype), tensor.numel()
        shape = tuple(tensor.shape)[1:] if rows_free else tuple(tensor.shape)
        header[_SHAPE] = hash(shape) & (2**62 - 1)
    header[_INDEX] = index
    header[9:] = -header[list(_AGREE)]
    communicator(None).Allreduce(header, op="max")
    names = ("operations", "ops or root ranks", "dtypes", "shapes")
    differ = [name for name, f, k in zip(names, _AGREE, range(9, FIELDS), strict=True)
              if header[f] != -header[k]]
    if differ:
        raise HorovodInternalError(
            f"hpcml.horovod: {what}: the ranks called collectives that differ in "
            f"{', '.join(differ)} (every rank must post the same operations, with the same op, "
            "dtype and shape for an allreduce, the same root, dtype and shape for a broadcast, "
            "in the same order)")
    if header[_JOINED] > 0 and kind not in (ALLREDUCE, OPTIMIZER):
        raise RuntimeError(f"hpcml.horovod: {what} after a rank called join(): only allreduces "
                           "(and DistributedOptimizer) go on until every rank has joined")
    return bool(header[_JOINED] > 0)


def _identity(op: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if op == Product:
        return torch.ones(numel, dtype=dtype)
    if op in (Min, Max):
        if dtype == torch.bool:
            return torch.full((numel,), op == Min, dtype=dtype)
        if dtype.is_floating_point:
            return torch.full((numel,), float("inf") if op == Min else float("-inf"),
                              dtype=dtype)
        info = torch.iinfo(dtype)
        return torch.full((numel,), info.max if op == Min else info.min, dtype=dtype)
    return torch.zeros(numel, dtype=dtype)


def join(device: int = -1) -> int:
    """This rank has no more data: take part in the other ranks' allreduces with a neutral
    contribution (zeros for Sum/Average, the identity for Min/Max/Product) until every rank has
    called ``join()``; returns, on every rank alike, the rank that joined last. Collective over
    the job. ``device`` is accepted for Horovod's signature (CPU only)."""
    comm = communicator(None)
    first = True
    while True:
        header = torch.full((FIELDS,), -1, dtype=torch.int64)
        header[9:] = _LOW
        header[_JOINED], header[_WORKING] = 1, 0
        header[_NEW] = comm.rank if first else -1
        first = False
        comm.Allreduce(header, op="max")
        if header[_WORKING] <= 0:
            return int(header[_NEW])
        if any(header[f] != -header[k] for f, k in zip(_AGREE, range(9, FIELDS), strict=True)):
            continue  # the working ranks raise; this rank waits for what they do next
        kind = int(header[_KIND])
        if kind == ALLREDUCE:
            op = int(header[_OP])
            zeros = _identity(op, DTYPES[int(header[_DTYPE])], int(header[_NUMEL]))
            comm.Iallreduce(zeros, op=MPI_OPS[op]).wait()  # matches the Iallreduce of ops
        elif kind == OPTIMIZER:
            optimizer = _OPTIMIZERS[int(header[_INDEX])]()
            if optimizer is None:
                raise RuntimeError("hpcml.horovod: join(): the other ranks step a "
                                   "DistributedOptimizer this rank has deleted (keep it alive "
                                   "until join() returns)")
            optimizer.contribute_nothing()
