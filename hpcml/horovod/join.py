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

import dataclasses
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import torch

from hpcml.comm import Request
from hpcml.horovod.basics import (
    MPI_OPS,
    HorovodInternalError,
    Max,
    Min,
    Product,
    communicator,
    new_handle,
    pending,
    release_posted_names,
    synchronize,
)

ALLREDUCE, OPTIMIZER, OTHER, JOIN = 1, 2, 3, 4
# header fields (MAX-reduced): someone joined, someone working, kind, op, dtype, shape digest,
# numel, optimizer index, rank joining in this round, someone may wait (an asynchronous
# operation), name digest, then kind, op, dtype, shape and name digests negated (their MAX is
# minus the working ranks' minimum: the ranks agree when max == min)
_JOINED, _WORKING, _KIND, _OP, _DTYPE, _SHAPE, _NUMEL, _INDEX, _NEW, _DEFER, _NAME = range(11)
_AGREE = [_KIND, _OP, _DTYPE, _SHAPE, _NAME]
_NEG = 11
FIELDS = _NEG + len(_AGREE)
_LOW = -(2**62)  # a joined rank's entry in the negated fields
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)

# the DistributedOptimizers over the global set, in construction order (the same on every rank)
_OPTIMIZERS: list[weakref.ReferenceType[Any]] = []


@dataclasses.dataclass(eq=False)
class _Deferred:
    """An asynchronous operation this rank submitted while the other ranks posted something
    else: its header, its handle's state and how to start it."""

    header: list[int]
    pending: Any
    start: Callable[[], tuple[list[Request], Callable[[], Any]]]


# this rank's deferred operations, oldest first
_DEFERRED: list[_Deferred] = []


def forget_deferred() -> None:
    """Drop the deferred operations (``shutdown()``)."""
    _DEFERRED.clear()


def register_optimizer(optimizer: Any) -> int:
    """Record a ``DistributedOptimizer`` built over the global set (collective construction
    keeps the index equal on every rank); returns its index."""
    _OPTIMIZERS.append(weakref.ref(optimizer))
    return len(_OPTIMIZERS) - 1


def _is_global(process_set: Any) -> bool:
    return process_set is None or process_set.ranks is None


def _describe(kind: int, tensor: torch.Tensor | None, op: int, index: int, rows_free: bool,
              name: str | None) -> list[int]:
    """A working rank's header fields for one operation (``_DEFER`` unset, no negated
    fields). Plain integers: this runs once per operation (per step for the optimizer)."""
    dtype = shape = numel = 0
    if tensor is not None:
        dtype, numel = DTYPES.index(tensor.dtype), tensor.numel()
        dims = tuple(tensor.shape)[1:] if rows_free else tuple(tensor.shape)
        shape = hash(dims) & (2**62 - 1)
    return [0, 1, kind, op, dtype, shape, numel, index, -1, 0,
            0 if name is None else zlib.crc32(name.encode())]


def _exchange(described: list[int], deferrable: bool) -> tuple[list[int], list[str]]:
    """One header round (collective over the job): the reduced header and the fields in which
    the working ranks differ."""
    fields = list(described)
    fields[_DEFER] = int(deferrable)
    header = torch.tensor(fields + [-fields[f] for f in _AGREE], dtype=torch.int64)
    communicator(None).Allreduce(header, op="max")
    got = header.tolist()
    names = ("operations", "ops or root ranks", "dtypes", "shapes", "names")
    return got, [name for name, f, k in zip(names, _AGREE, range(_NEG, FIELDS), strict=True)
                 if got[f] != -got[k]]


def _mismatch(what: str, differ: list[str]) -> HorovodInternalError:
    return HorovodInternalError(
        f"hpcml.horovod: {what}: the ranks called collectives that differ in "
        f"{', '.join(differ)} (every rank must post the same operations, with the same op, "
        "dtype and shape for an allreduce, the same root, dtype and shape for a broadcast, "
        "in the same order)")


def _check_joined(what: str, header: list[int]) -> bool:
    joined = bool(header[_JOINED] > 0)
    if joined and int(header[_KIND]) not in (ALLREDUCE, OPTIMIZER):
        raise RuntimeError(f"hpcml.horovod: {what} after a rank called join(): only allreduces "
                           "(and DistributedOptimizer) go on until every rank has joined")
    return joined


def _post(entry: _Deferred) -> None:
    """Start a deferred operation now that every rank posts it."""
    _DEFERRED.remove(entry)
    entry.pending.requests, entry.pending.finish = entry.start()
    entry.pending.post = None


def _settle(what: str, mine: list[int], entry: _Deferred | None) -> bool | None:
    """Header rounds until the ranks agree on this rank's operation ``mine``; this rank's
    deferred operations are offered first and started where every rank offers the same.
    Returns whether some rank has joined, or None when ``entry`` (this operation, which is
    asynchronous) was deferred because other ranks post something else. When the ranks
    disagree and none can wait, every rank raises :class:`HorovodInternalError`."""
    skip = 0
    while True:
        offered = _DEFERRED[skip] if skip < len(_DEFERRED) else None
        header, differ = _exchange(mine if offered is None else offered.header,
                                   offered is not None or entry is not None)
        if not differ:
            if offered is None:
                return _check_joined(what, header)
            _check_joined(what, header)
            _post(offered)
        elif header[_DEFER] <= 0:
            raise _mismatch(what, differ)
        elif offered is not None:
            skip += 1
        elif entry is not None:
            _DEFERRED.append(entry)
            return None


def negotiate(what: str, process_set: Any = None, kind: int = OTHER,
              tensor: torch.Tensor | None = None, op: int = 0, index: int = 0,
              rows_free: bool = False) -> bool:
    """Called by every working rank before a blocking operation over ``process_set``
    (collective over it). Returns True when some rank has joined (the joined ranks then take
    part in an allreduce); raises ``RuntimeError`` for any other operation after a rank
    joined, and :class:`HorovodInternalError` on every rank when the ranks' ``kind``, ``op`` or
    ``tensor`` dtype and shape (beyond the first dimension with ``rows_free``) differ."""
    if not _is_global(process_set):
        return False
    joined = bool(_settle(what, _describe(kind, tensor, op, index, rows_free, None), None))
    release_posted_names()
    return joined


def submit(what: str, process_set: Any, name: str | None,
           start: Callable[[], tuple[list[Request], Callable[[], Any]]], kind: int = OTHER,
           tensor: torch.Tensor | None = None, op: int = 0, rows_free: bool = False) -> int:
    """Submit an asynchronous operation (collective over ``process_set``): ``start()`` posts
    it and returns its requests and the function that makes its result. Returns its handle.

    ``name`` (Horovod's): ``ValueError`` on this rank, before any communication, when an
    operation of that name is pending here. Over the global set the operation is negotiated
    like a blocking one (:func:`negotiate`, the name must agree too), except that when other
    ranks post something else it waits, unposted (its handle polls False), and is offered
    again at this rank's next operation, so ranks may submit asynchronous operations in
    different orders, as Horovod allows; ``synchronize`` of its handle offers it until every
    rank posts it (or every rank raises :class:`HorovodInternalError` if none can wait)."""
    handle = new_handle([], lambda: None, name)
    p = pending(handle)
    try:
        if not _is_global(process_set):
            p.requests, p.finish = start()
            return handle
        entry = _Deferred(_describe(kind, tensor, op, 0, rows_free, name), p, start)
        if _settle(what, entry.header, entry) is None:
            p.post = lambda: _force(what, entry)
        else:
            p.requests, p.finish = start()
    except BaseException:
        synchronize(handle)  # spends the handle and releases the name
        raise
    return handle


def _force(what: str, entry: _Deferred) -> None:
    """Header rounds offering the deferred ``entry`` (this rank can no longer wait) until every
    rank posts it; then start it."""
    while entry in _DEFERRED:
        header, differ = _exchange(entry.header, False)
        if not differ:
            _check_joined(what, header)
            _post(entry)
        elif header[_DEFER] <= 0:
            _DEFERRED.remove(entry)
            entry.pending.post = None
            raise _mismatch(what, differ)


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
        header[_NEG:] = _LOW
        header[_JOINED], header[_WORKING], header[_DEFER] = 1, 0, 0
        header[_NEW] = comm.rank if first else -1
        first = False
        comm.Allreduce(header, op="max")
        if header[_WORKING] <= 0:
            return int(header[_NEW])
        if any(header[f] != -header[k] for f, k in zip(_AGREE, range(_NEG, FIELDS),
                                                       strict=True)):
            continue  # the working ranks raise or wait; this rank waits for what they do next
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
