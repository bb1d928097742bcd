"""numpy arrays and torch tensors as MPI buffers.

CPU tensors and numpy arrays are passed to MPI without a copy (``Tensor.numpy()`` shares the
storage; a tensor that requires grad is detached first, which shares it too). Three cases cannot
be zero-copy and are handled explicitly, never silently:

- non-contiguous arrays/views: ``ValueError`` naming the fix (``.contiguous()`` /
  ``np.ascontiguousarray``), since a hidden copy would drop results written into a view;
- bfloat16 / float16, which MPI cannot add: reductions stage through a float32 copy and write
  the result back; data movement (bcast, gather, send) moves the raw 16-bit words unchanged;
- tensors on a GPU: staged through a host copy and written back (the wheel MPI is not CUDA-aware).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

REDUCE_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}


class Staged:
    """A contiguous numpy array MPI can use, and how to write results back to the caller's
    object (``None`` when the array *is* the caller's memory). A plain slotted class: it is
    built twice per collective, so its construction cost is on the hot path."""

    __slots__ = ("array", "write_back")

    def __init__(self, array: np.ndarray, write_back: Callable[[], None] | None = None) -> None:
        self.array = array
        self.write_back = write_back

    @property
    def spec(self) -> np.ndarray:
        """The buffer as mpi4py takes it (it derives the MPI datatype from the array)."""
        return self.array

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def finish(self) -> None:
        if self.write_back is not None:
            self.write_back()


def is_tensor(obj: Any) -> bool:
    """True for a torch tensor. torch is never imported here: if the program has not imported
    it, ``obj`` cannot be a tensor (this keeps numpy-only ranks free of torch's start-up cost)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def reduce_op(op: str) -> MPI.Op:
    try:
        return REDUCE_OPS[op]
    except KeyError:
        raise ValueError(f"op {op!r} is not supported; use one of {sorted(REDUCE_OPS)}") from None


def stage(obj: Any, *, reduce: bool = False) -> Staged:
    """Wrap ``obj`` (numpy array or torch tensor) for an MPI call.

    ``reduce=True`` means MPI will do arithmetic on it (Allreduce, Reduce_scatter), which forces
    16-bit floats through float32."""
    if type(obj) is np.ndarray and obj.flags.c_contiguous and obj.dtype.char != "e":
        return Staged(obj)
    if is_tensor(obj):
        return _stage_tensor(obj, reduce)
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(obj).__name__}; "
                        "use the lower-case object methods (bcast, allgather) for Python objects")
    if not obj.flags.c_contiguous:
        raise ValueError("non-contiguous numpy array: MPI needs one contiguous buffer; pass "
                         "np.ascontiguousarray(a) and copy results back yourself")
    if obj.dtype == np.float16:
        return _stage_half(obj, reduce, lambda a: a.view(np.uint16),
                           lambda f32: np.copyto(obj, f32.astype(np.float16)))
    return Staged(obj)


def _stage_tensor(t: Any, reduce: bool) -> Staged:
    if t.is_cpu and not t.requires_grad and t.is_contiguous() and t.element_size() != 2:
        return Staged(t.numpy())
    if not t.is_contiguous():
        raise ValueError("non-contiguous tensor: MPI needs one contiguous buffer; pass "
                         "t.contiguous() and copy results back with t.copy_(...)")
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        host = t.cpu()
        inner = _stage_tensor(host, reduce)

        def back() -> None:
            inner.finish()
            t.copy_(host)

        return Staged(inner.array, back)
    torch = sys.modules["torch"]
    if t.dtype in (torch.bfloat16, torch.float16):
        return _stage_half(t, reduce, lambda x: x.view(torch.int16).numpy(),
                           lambda f32: t.copy_(torch.from_numpy(f32)))
    return Staged(t.numpy())


def _stage_half(obj: Any, reduce: bool, as_words: Callable[[Any], np.ndarray],
                store: Callable[[np.ndarray], Any]) -> Staged:
    if not reduce:
        return Staged(as_words(obj))
    f32 = obj.float().numpy() if is_tensor(obj) else obj.astype(np.float32)
    return Staged(f32, lambda: store(f32))


def nbytes(obj: Any) -> int:
    """Bytes a buffer occupies (numpy or torch), without staging it."""
    if is_tensor(obj):
        return obj.numel() * obj.element_size()
    return int(obj.nbytes)
