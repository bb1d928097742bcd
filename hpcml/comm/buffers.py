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

REDUCE_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD,
              # bitwise (integer buffers) and logical (bool buffers) reductions
              "band": MPI.BAND, "bor": MPI.BOR, "bxor": MPI.BXOR,
              "land": MPI.LAND, "lor": MPI.LOR, "lxor": MPI.LXOR}
_from_address = MPI.buffer.fromaddress
_NDARRAY = np.ndarray
_HALF = np.dtype(np.float16)  # the native one (the only one a program makes without asking)


class Staged:
    """What MPI gets for one buffer (``spec``: a numpy array, or ``[memory, MPI datatype]`` for a
    torch tensor), its element count and size, and how to write results back to the caller's
    object (``write_back`` is ``None`` when MPI works on the caller's memory itself). A plain
    slotted class: it is built once or twice per call, so its cost is on the hot path."""

    __slots__ = ("itemsize", "nbytes", "obj", "size", "spec", "write_back")

    def __init__(self, spec: Any, size: int, itemsize: int, obj: Any = None,
                 write_back: Callable[[], None] | None = None) -> None:
        self.spec, self.size, self.itemsize, self.nbytes = spec, size, itemsize, size * itemsize
        self.obj, self.write_back = obj, write_back

    @property
    def array(self) -> np.ndarray:
        """The buffer as a numpy array sharing its memory (off the hot path)."""
        if type(self.spec) is np.ndarray:
            return self.spec
        return np.frombuffer(self.spec[0], dtype=np.dtype(self.spec[1].tocode()))

    def vector(self, counts: list[int], displs: list[int]) -> list[Any]:
        """The message spec of a v-collective (``Allgatherv``, ``Alltoallv``) over this buffer."""
        if type(self.spec) is np.ndarray:
            return [self.spec, (counts, displs)]
        return [self.spec[0], (counts, displs), self.spec[1]]

    def finish(self) -> None:
        if self.write_back is not None:
            self.write_back()


_TORCH_TENSOR: type | None = None
_MPI_TYPES: dict[Any, tuple[MPI.Datatype, int]] = {}
_RAW_16BIT: dict[Any, tuple[MPI.Datatype, int]] = {}
# message()'s answers for contiguous CPU tensors: data address -> (bytes, dtype, answer); cleared
# when full, so it holds the buffers a program reuses (pipeline and tensor-parallel ones).
_SPECS: dict[int, tuple[int, Any, tuple[Any, int, int, None]]] = {}
_SPECS_MAX = 256
_specs_get = _SPECS.get


def _torch_types() -> type | None:
    """torch.Tensor and the dtype -> (MPI datatype, item size) tables, once torch is loaded."""
    global _TORCH_TENSOR
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "Tensor"):
        return None
    _MPI_TYPES.update({
        torch.float32: (MPI.FLOAT, 4), torch.float64: (MPI.DOUBLE, 8),
        torch.int64: (MPI.INT64_T, 8), torch.int32: (MPI.INT32_T, 4),
        torch.int16: (MPI.INT16_T, 2), torch.int8: (MPI.INT8_T, 1),
        torch.uint8: (MPI.UINT8_T, 1), torch.bool: (MPI.C_BOOL, 1),
        torch.complex64: (MPI.C_FLOAT_COMPLEX, 8), torch.complex128: (MPI.C_DOUBLE_COMPLEX, 16)})
    _RAW_16BIT.update({torch.bfloat16: (MPI.INT16_T, 2), torch.float16: (MPI.INT16_T, 2)})
    _TORCH_TENSOR = torch.Tensor
    return _TORCH_TENSOR


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
    """Wrap ``obj`` (numpy array or torch tensor) for an MPI call; the :class:`Staged` keeps
    ``obj`` alive (what a non-blocking call needs). ``reduce=True`` means MPI will do arithmetic
    on it (Allreduce, Reduce_scatter), which forces 16-bit floats through float32."""
    spec, nbytes, itemsize, write_back = message(obj, reduce)
    return Staged(spec, nbytes // itemsize, itemsize, obj, write_back)


def message(obj: Any, reduce: bool = False) -> tuple[Any, int, int, Callable[[], None] | None]:
    """``(spec, nbytes, itemsize, write_back)`` of ``obj`` for a *blocking* MPI call (the caller
    keeps ``obj`` alive). The hot path of small messages: a contiguous numpy array, or a
    contiguous CPU tensor of a dtype MPI knows (handed over by address with a datatype from one
    table, as heat does), costs a few attribute reads and no object of ours; everything else
    goes through :class:`Staged`.

    A tensor's answer is remembered under its address (:data:`_SPECS`) and reused only while
    address, byte size and dtype all match: the answer is a function of those three alone (for
    a contiguous CPU tensor, checked on every call), so it can never describe a stale buffer,
    even after the tensor was resized or re-allocated in place, pointed elsewhere (``set_``,
    ``.data =``, which leave ``_version`` alone, so no check can rest on it), or freed and
    another one took its address. The plain ``Allreduce``, ``Send`` and ``Recv`` of
    :class:`~hpcml.comm.Communicator` inline this function's two fast answers (the same checks,
    in the same order) and call it for everything else; change them together."""
    tp = type(obj)
    if tp is _NDARRAY:
        if obj.flags.c_contiguous and obj.dtype is not _HALF:
            return obj, obj.nbytes, obj.itemsize, None
    elif tp is _TORCH_TENSOR or (_TORCH_TENSOR is None and _torch_types() is tp):
        if obj.is_contiguous():  # first: a sparse tensor is not, and has no data_ptr()
            ptr = obj.data_ptr()
            known = _specs_get(ptr)
            if (known is not None and known[0] == obj.nbytes and known[1] is obj.dtype
                    and obj.is_cpu):
                return known[2]
        if obj.is_cpu and obj.is_contiguous():
            ptr, dtype, nbytes = obj.data_ptr(), obj.dtype, obj.nbytes
            entry = _MPI_TYPES.get(dtype)
            remember = entry is not None  # then the answer holds for reduce=False and True
            if not remember and not reduce:
                entry = _RAW_16BIT.get(dtype)
            if entry is not None and nbytes:
                mpitype, itemsize = entry
                answer = [_from_address(ptr, nbytes), mpitype], nbytes, itemsize, None
                if remember:
                    if len(_SPECS) >= _SPECS_MAX:
                        _SPECS.clear()
                    _SPECS[ptr] = (nbytes, dtype, answer)
                return answer
    staged = _stage_other(obj, reduce)
    return staged.spec, staged.nbytes, staged.itemsize, staged.write_back


def _stage_other(obj: Any, reduce: bool) -> Staged:
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
    return _wrap(obj)


def _wrap(a: np.ndarray, write_back: Callable[[], None] | None = None) -> Staged:
    return Staged(a, a.size, a.itemsize, None, write_back)


def _stage_tensor(t: Any, reduce: bool) -> Staged:
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

        return _wrap(inner.array, back)
    torch = sys.modules["torch"]
    if t.dtype in (torch.bfloat16, torch.float16):
        return _stage_half(t, reduce, lambda x: x.view(torch.int16).numpy(),
                           lambda f32: t.copy_(torch.from_numpy(f32)))
    return _wrap(t.numpy())


def _stage_half(obj: Any, reduce: bool, as_words: Callable[[Any], np.ndarray],
                store: Callable[[np.ndarray], Any]) -> Staged:
    if not reduce:
        return _wrap(as_words(obj))
    f32 = obj.float().numpy() if is_tensor(obj) else obj.astype(np.float32)
    return _wrap(f32, lambda: store(f32))


def nbytes(obj: Any) -> int:
    """Bytes a buffer occupies (numpy or torch), without staging it."""
    if is_tensor(obj):
        return obj.numel() * obj.element_size()
    return int(obj.nbytes)
