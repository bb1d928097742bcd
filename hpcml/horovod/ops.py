"""Horovod's tensor collectives with its signatures and semantics, each one call (or two) of
:class:`hpcml.comm.Communicator`, so every byte is in hpcml's ledger.

Every operation is collective over its ``process_set`` (default: the job; ``root_rank`` is always
a global rank): every rank of it calls it. Blocking operations are posted **in the same order**
on every rank (MPI matches by order); asynchronous ones over the global set may come in other
orders (Horovod matches by ``name``): see :func:`hpcml.horovod.join.submit`. A ``name`` pending
on this rank may not be reused until synchronized (``ValueError``, as Horovod's). Results are
new tensors unless the name ends in ``_`` (in place). Non-contiguous in-place tensors are
refused.

- ``op``: ``Average`` (default), ``Sum``, ``Min``, ``Max``, ``Product``, and for allreduces
  ``Adasum`` (:func:`adasum_pair` up a binary tree; power-of-two sizes, floating point).
  ``prescale_factor`` multiplies each rank's tensor before the reduction and
  ``postscale_factor`` the result after it (with ``Average`` the division by the size is folded
  into the postscale factor, as Horovod does). Integer tensors are scaled as Horovod scales them:
  in float64, truncated toward zero on the way back (an integer average truncates).
- ``allreduce``, ``allgather``, ``broadcast``, ``alltoall`` and ``reducescatter`` are
  differentiable as in Horovod: the gradient of an allreduce is the same allreduce of the
  gradient; of an allgather, this rank's rows of the ranks' averaged gradient; of a broadcast,
  the averaged gradient on the root and zeros elsewhere; of an alltoall, the gradients sent back
  where the rows came from; of a reducescatter, see :func:`reducescatter`.
- The ``_async`` forms return a handle for :func:`~hpcml.horovod.basics.poll` and
  :func:`~hpcml.horovod.basics.synchronize`: allreduces (``Iallreduce``; Adasum completes at
  once), allgathers (``Iallgatherv`` after a blocking exchange of row counts), broadcasts
  (``Ibcast``) and reducescatters (``Ireduce_scatter``) are non-blocking; ``alltoall_async``
  completes before its handle is returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hpcml.comm import Communicator, Request
from hpcml.horovod.basics import (
    MPI_OPS,
    Adasum,
    Average,
    Sum,
    communicator,
    group_handles,
    new_handle,
    set_rank,
    synchronize,
    take_name,
)
from hpcml.horovod.compression import Compression
from hpcml.horovod.join import ALLREDUCE, OTHER, negotiate, submit

# a posted operation: its requests and the function that makes its result once they complete
_Started = tuple[list[Request], Callable[[], Any]]


def _op(op: int | None, average: bool | None, adasum: bool = False) -> int:
    """Horovod's op from ``op`` and the deprecated ``average``; refuses what is not built
    (``Adasum`` unless ``adasum``)."""
    if average is not None:
        if op is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of "
                             "them.")
        op = Average if average else Sum
    op = Average if op is None else op
    if op == Adasum and adasum:
        return op
    if op == Adasum:
        raise ValueError("hpcml.horovod: op=Adasum is not implemented here (use op=hvd.Average "
                         "or hvd.Sum)")
    if op not in MPI_OPS:
        raise ValueError(f"hpcml.horovod: op={op!r} is not one of hvd.Average, Sum, Min, Max, "
                         "Product")
    return op


def _factors(op: int, prescale: float, postscale: float, size: int) -> tuple[float, float]:
    """(prescale, postscale) with the average folded into the postscale, as Horovod does."""
    return prescale, postscale / size if op == Average else postscale


def _scale_(tensor: torch.Tensor, factor: float) -> None:
    """``tensor *= factor`` in place, as Horovod scales: integers in float64 and truncated
    toward zero on the way back (so an integer average truncates), floats in their dtype."""
    if factor == 1.0:
        return
    with torch.no_grad():
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
            tensor.mul_(factor)
        else:
            tensor.copy_(tensor.double().mul_(factor).trunc_())


def _contiguous(what: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError(f"hpcml.horovod: {what}: tensor is required to be contiguous (call "
                         ".contiguous() first)")
    return tensor


# -- allreduce ------------------------------------------------------------------------------------
def adasum_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Adasum of two gradients (arXiv 2006.02924, Horovod's ``adasum.h``):
    ``(1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b``, a coefficient staying 1 where its norm
    squared is below sqrt(DBL_MIN). Orthogonal gradients add, equal ones stay as they are.
    Pure function (float64 in, float64 out)."""
    dot, aa, bb = float(a.flatten() @ b.flatten()), float(a.flatten() @ a.flatten()), \
        float(b.flatten() @ b.flatten())
    tiny = math.sqrt(2.2250738585072014e-308)
    return (1 - dot / aa / 2 if aa >= tiny else 1.0) * a + \
        (1 - dot / bb / 2 if bb >= tiny else 1.0) * b


def _adasum_start(tensor: torch.Tensor, output: torch.Tensor, prescale: float,
                  postscale: float, comm: Communicator) -> _Started:
    """Horovod's Adasum allreduce into ``output``: the ranks' tensors combined pairwise up a
    binary tree (ranks 2i and 2i+1, then pairs of pairs: Horovod's recursive order), in
    float64 on every rank from one allgather, so every rank gets the same result. Requires a
    power-of-two number of ranks and a floating-point tensor, as Horovod's CPU Adasum does."""
    if comm.size & (comm.size - 1) or not tensor.dtype.is_floating_point:
        raise ValueError(f"hpcml.horovod: op=Adasum needs a power-of-two number of ranks (not "
                         f"{comm.size}) and a floating-point tensor (not {tensor.dtype}), as "
                         "Horovod's; use op=hvd.Average")
    mine = tensor.detach().contiguous().double() * prescale
    parts = torch.empty((comm.size, *mine.shape), dtype=torch.float64)
    comm.Allgather(mine, parts)
    level = list(parts)
    while len(level) > 1:
        level = [adasum_pair(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    with torch.no_grad():
        output.copy_(level[0] * postscale)
    return [], lambda: output


def _allreduce_start(tensor: torch.Tensor, output: torch.Tensor, op: int, prescale: float,
                     postscale: float, comm: Communicator) -> _Started:
    if op == Adasum:
        return _adasum_start(tensor, output, prescale, postscale, comm)
    pre, post = _factors(op, prescale, postscale, comm.size)
    if output is not tensor:
        with torch.no_grad():
            output.copy_(tensor)
    _scale_(output, pre)
    request = comm.Iallreduce(output, op=MPI_OPS[op])

    def finish() -> torch.Tensor:
        _scale_(output, post)
        return output

    return [request], finish


def _kind(op: int) -> int:
    """The header kind of an allreduce: Adasum (an allgather) has no neutral contribution for
    a rank inside ``join()``."""
    return OTHER if op == Adasum else ALLREDUCE


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0, process_set: Any = None) -> int:
    """Start reducing ``tensor`` over the ranks into a new tensor; ``tensor`` is unchanged."""
    op = _op(op, average, adasum=True)
    comm = communicator(process_set)
    output = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    t = tensor.detach()
    return submit("allreduce", process_set, name,
                  lambda: _allreduce_start(t, output, op, prescale_factor, postscale_factor,
                                           comm), _kind(op), output, op)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0, process_set: Any = None) -> int:
    """Start reducing ``tensor`` in place; its value is the result after ``synchronize``."""
    t = _contiguous("allreduce_", tensor)
    op = _op(op, average, adasum=True)
    comm = communicator(process_set)
    return submit("allreduce_", process_set, name,
                  lambda: _allreduce_start(t, t, op, prescale_factor, postscale_factor, comm),
                  _kind(op), t, op)


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, prescale: float, postscale: float,
                process_set: Any) -> torch.Tensor:
        ctx.args = (op, prescale, postscale, process_set)
        return synchronize(allreduce_async(tensor, None, None, op, prescale, postscale,
                                           process_set))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return _Allreduce.apply(grad.contiguous(), *ctx.args), None, None, None, None


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: Any = None) -> torch.Tensor:
    """The reduction of ``tensor`` over the ranks (same shape and dtype), differentiable."""
    compressed, ctx = compression.compress(tensor)
    out = _Allreduce.apply(compressed, _op(op, average, adasum=True), prescale_factor,
                           postscale_factor, process_set)
    return compression.decompress(out, ctx)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: int | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0, process_set: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` in place and return it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor,
                                        postscale_factor, process_set))


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: int | None = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: Any = None) -> int:
    """Start reducing every tensor of ``tensors`` into new tensors (one handle for all)."""
    return group_handles([allreduce_async(t, average, None, op, prescale_factor,
                                          postscale_factor, process_set) for t in tensors])


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: int | None = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: Any = None) -> int:
    """Start reducing every tensor of ``tensors`` in place (one handle for all)."""
    return group_handles([allreduce_async_(t, average, None, op, prescale_factor,
                                           postscale_factor, process_set) for t in tensors])


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: Any = None
                      ) -> list[torch.Tensor]:
    """``[allreduce(t) for t in tensors]``, all in flight together; differentiable (each
    tensor's gradient is the same allreduce of its gradient) when a tensor requires grad."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return [allreduce(t, average, None, compression, op, prescale_factor, postscale_factor,
                          process_set) for t in tensors]
    pairs = [compression.compress(t) for t in tensors]
    out = synchronize(grouped_allreduce_async([c for c, _ in pairs], average, name, op,
                                              prescale_factor, postscale_factor, process_set))
    return [compression.decompress(o, ctx) for o, (_, ctx) in zip(out, pairs, strict=True)]


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: int | None = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: Any = None) -> list[torch.Tensor]:
    """Reduce every tensor of ``tensors`` in place; returns them."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                                postscale_factor, process_set))


# -- allgather ------------------------------------------------------------------------------------
def _rows(what: str, tensor: torch.Tensor, comm: Communicator) -> list[int]:
    """Every rank's first dimension; refuses (on every rank) ranks whose tensors differ in
    dtype or in any other dimension."""
    if tensor.dim() == 0:
        raise ValueError(f"hpcml.horovod: {what}: a 0-dimensional tensor has no first "
                         "dimension (reshape it to (1,))")
    meta = comm.allgather((tuple(tensor.shape), str(tensor.dtype)))
    if len({(shape[1:], dtype) for shape, dtype in meta}) != 1:
        raise RuntimeError(f"hpcml.horovod: {what}: the ranks' tensors differ in dtype or beyond "
                         f"the first dimension ({[f'{s} {d}' for s, d in meta]})")
    return [shape[0] for shape, _ in meta]


def _allgather(tensor: torch.Tensor, comm: Communicator) -> tuple[torch.Tensor, list[int]]:
    """The gathered tensor and every rank's number of rows."""
    t = tensor.detach().contiguous()
    rows = _rows("allgather", t, comm)
    row = math.prod(t.shape[1:])
    out = torch.empty((sum(rows), *t.shape[1:]), dtype=t.dtype)
    comm.Allgatherv(t, out, [r * row for r in rows])
    return out, rows


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, process_set: Any) -> torch.Tensor:
        comm = communicator(process_set)
        negotiate("allgather", process_set, tensor=tensor, rows_free=True)
        out, rows = _allgather(tensor, comm)
        ctx.process_set, ctx.offset, ctx.rows = process_set, sum(rows[:comm.rank]), rows[comm.rank]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        averaged = allreduce(grad.contiguous(), op=Average, process_set=ctx.process_set)
        return averaged.narrow(0, ctx.offset, ctx.rows), None


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: Any = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along the first dimension in rank order; the first
    dimension may differ between ranks, the others and the dtype may not. Differentiable."""
    return _Allgather.apply(tensor, process_set)


def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: Any = None) -> int:
    """Start :func:`allgather` (not differentiable): the rows are exchanged when the handle is
    returned, the data travels by a non-blocking ``Iallgatherv``."""
    comm = communicator(process_set)
    t = tensor.detach().contiguous()

    def start() -> _Started:
        rows = _rows("allgather", t, comm)
        out = torch.empty((sum(rows), *t.shape[1:]), dtype=t.dtype)
        row = math.prod(t.shape[1:])
        return [comm.Iallgatherv(t, out, [r * row for r in rows])], lambda: out

    return submit("allgather_async", process_set, name, start, tensor=t, rows_free=True)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: Any = None) -> list[torch.Tensor]:
    """``[allgather(t) for t in tensors]``."""
    return [allgather(t, process_set=process_set) for t in tensors]


def sparse_allreduce_async(tensor: torch.Tensor, name: str | None = None, op: int = Average,
                           process_set: Any = None) -> Callable[[], torch.Tensor]:
    """The reduction of a sparse COO ``tensor`` over the ranks, as Horovod computes it: every
    rank's indices and values are gathered (two allgathers, collective now) and returned by the
    callable (Horovod's handle) as one uncoalesced sparse tensor of ``tensor``'s shape, its
    values divided by the size for ``Average``. ``op``: ``Average`` or ``Sum``."""
    if op not in (Average, Sum):
        raise ValueError("hpcml.horovod: sparse_allreduce_async: op must be hvd.Average or "
                         "hvd.Sum")
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    indices = allgather(t.indices().t().contiguous(), process_set=process_set)
    values = allgather(t.values().contiguous(), process_set=process_set)
    if op == Average:
        values = values / communicator(process_set).size

    def handle() -> torch.Tensor:
        return torch.sparse_coo_tensor(indices.t(), values, t.shape, check_invariants=True)

    return handle


# -- broadcast ------------------------------------------------------------------------------------
def _root(root_rank: int, process_set: Any) -> int:
    """``root_rank`` (a global rank, as in Horovod) as a rank of ``process_set``."""
    return set_rank(process_set, root_rank)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: Any = None) -> torch.Tensor:
    """Copy ``root_rank``'s ``tensor`` into every rank's ``tensor`` (in place); returns it."""
    comm = communicator(process_set)
    root = _root(root_rank, process_set)
    negotiate("broadcast", process_set, tensor=tensor, op=root)
    comm.Bcast(_contiguous("broadcast_", tensor).data, root=root)
    return tensor


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: Any = None) -> int:
    """Start :func:`broadcast_` (``Ibcast``); ``tensor`` holds the root's after
    ``synchronize``."""
    comm = communicator(process_set)
    root = _root(root_rank, process_set)
    t = _contiguous("broadcast_async_", tensor).data
    return submit("broadcast", process_set, name,
                  lambda: ([comm.Ibcast(t, root=root)], lambda: tensor), tensor=t, op=root)


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int, process_set: Any
                ) -> torch.Tensor:
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return broadcast_(tensor.detach().clone(memory_format=torch.contiguous_format),
                          root_rank, process_set=process_set)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        averaged = allreduce(grad.contiguous(), op=Average, process_set=ctx.process_set)
        if communicator(ctx.process_set).rank != _root(ctx.root_rank, ctx.process_set):
            averaged = torch.zeros_like(averaged)
        return averaged, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: Any = None) -> torch.Tensor:
    """A new tensor holding ``root_rank``'s ``tensor`` on every rank. Differentiable."""
    return _Broadcast.apply(tensor, root_rank, process_set)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: Any = None) -> int:
    """Start :func:`broadcast` into a new tensor (not differentiable)."""
    return broadcast_async_(tensor.detach().clone(memory_format=torch.contiguous_format),
                            root_rank, name, process_set)


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: Any = None) -> Any:
    """``root_rank``'s picklable ``obj`` on every rank (pickled within the job)."""
    comm, root = communicator(process_set), _root(root_rank, process_set)
    negotiate("broadcast_object", process_set)
    return comm.bcast(obj, root=root)


def allgather_object(obj: Any, name: str | None = None, process_set: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    comm = communicator(process_set)
    negotiate("allgather_object", process_set)
    return comm.allgather(obj)


def barrier(process_set: Any = None) -> None:
    """Return when every rank has called it."""
    comm = communicator(process_set)
    negotiate("barrier", process_set)
    comm.barrier()


# -- alltoall, reducescatter -----------------------------------------------------------------------
def _alltoall(tensor: torch.Tensor, splits: Sequence[int] | torch.Tensor | None,
              process_set: Any) -> tuple[torch.Tensor, torch.Tensor]:
    comm = communicator(process_set)
    negotiate("alltoall", process_set, tensor=tensor, rows_free=True)
    t = tensor.detach().contiguous()
    if t.dim() == 0:
        raise ValueError("hpcml.horovod: alltoall: a 0-dimensional tensor has no first "
                         "dimension (reshape it to (1,))")
    if splits is None:
        if t.shape[0] % comm.size:
            raise ValueError(f"hpcml.horovod: alltoall: first dimension {t.shape[0]} does not "
                             f"divide by {comm.size} ranks (pass splits=)")
        send = [t.shape[0] // comm.size] * comm.size
    else:
        send = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor)
                                 else splits)]
        if len(send) != comm.size or min(send) < 0 or sum(send) != t.shape[0]:
            raise ValueError(f"hpcml.horovod: alltoall: splits {send} must be {comm.size} "
                             f"non-negative row counts adding up to {t.shape[0]}")
    received = torch.empty(comm.size, dtype=torch.int32)
    comm.Alltoall(torch.tensor(send, dtype=torch.int32), received)
    recv = received.tolist()
    row = math.prod(t.shape[1:])
    out = torch.empty((sum(recv), *t.shape[1:]), dtype=t.dtype)
    comm.Alltoallv(t, out, [s * row for s in send], [r * row for r in recv])
    return out, received


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: Any, process_set: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out, received = _alltoall(tensor, splits, process_set)
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _received: Any) -> tuple[Any, ...]:
        # the rows came from the ranks in received-splits order: send their gradients back
        return _alltoall(grad, ctx.received, ctx.process_set)[0], None, None


def alltoall(tensor: torch.Tensor, splits: Sequence[int] | torch.Tensor | None = None,
             name: str | None = None, process_set: Any = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows ``splits[j]`` (consecutive, in rank order) of ``tensor`` go to rank j; the result
    concatenates the rows received, in rank order. ``splits=None``: the first dimension split
    equally (it must divide by the size). With ``splits``, returns ``(result, received_splits)``
    (int32, one entry per rank), as Horovod does; without, the result only. Ranks' tensors
    must agree beyond the first dimension. Differentiable (the gradient travels back)."""
    out, received = _Alltoall.apply(tensor, splits, process_set)
    return out if splits is None else (out, received)


def alltoall_async(tensor: torch.Tensor, splits: Sequence[int] | torch.Tensor | None = None,
                   name: str | None = None, process_set: Any = None) -> int:
    """:func:`alltoall`, complete when its handle is returned."""
    take_name(name)
    out = alltoall(tensor, splits, name, process_set)
    return new_handle([], lambda: out, name)


def reducescatter(tensor: torch.Tensor, name: str | None = None,
                  compression: Any = Compression.none, op: int | None = Average,
                  process_set: Any = None, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce ``tensor`` (same shape on every rank) over the ranks and give rank r its block
    of the first dimension: blocks of ``rows // size`` rows, the first ``rows % size`` ranks
    one row more (Horovod's split). Differentiable as in Horovod: the gradient is the
    allgather of the blocks' gradients, times the size for ``Sum`` and times both factors."""
    compressed, ctx = compression.compress(tensor)
    out = _Reducescatter.apply(compressed, _reducescatter_op(op), prescale_factor,
                               postscale_factor, process_set)
    return compression.decompress(out, ctx)


def _reducescatter_op(op: int | None) -> int:
    """``op`` for a reducescatter: Adasum is refused with ``RuntimeError``, as Horovod does."""
    if op == Adasum:
        raise RuntimeError("hpcml.horovod: reducescatter: op=Adasum is not supported (as in "
                           "Horovod): use hvd.Average or hvd.Sum")
    return _op(op, None)


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, prescale: float, postscale: float,
                process_set: Any) -> torch.Tensor:
        ctx.args = (op, prescale, postscale, process_set)
        negotiate("reducescatter", process_set, tensor=tensor, op=op)
        requests, finish = _reducescatter_start(tensor, op, prescale, postscale, process_set)
        for request in requests:
            request.wait()
        return finish()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        op, prescale, postscale, process_set = ctx.args
        factor = prescale * postscale * (communicator(process_set).size if op == Sum else 1)
        comm = communicator(process_set)
        negotiate("reducescatter (backward)", process_set)
        return _allgather(grad * factor, comm)[0], None, None, None, None


def _reducescatter_start(tensor: torch.Tensor, op: int, prescale_factor: float,
                         postscale_factor: float, process_set: Any) -> _Started:
    """Post the reducescatter of ``tensor`` (``Ireduce_scatter``); its request and result."""
    comm = communicator(process_set)
    t = tensor.detach().contiguous()
    if t.dim() == 0:
        raise ValueError("hpcml.horovod: reducescatter: a 0-dimensional tensor has no first "
                         "dimension (reshape it to (1,))")
    pre, post = _factors(op, prescale_factor, postscale_factor, comm.size)
    if pre != 1.0:
        t = t.clone()
        _scale_(t, pre)
    q, extra = divmod(t.shape[0], comm.size)
    rows = [q + (r < extra) for r in range(comm.size)]
    row = math.prod(t.shape[1:])
    out = torch.empty((rows[comm.rank], *t.shape[1:]), dtype=t.dtype)
    request = comm.Ireduce_scatter(t, out, [r * row for r in rows], op=MPI_OPS[op])

    def finish() -> torch.Tensor:
        _scale_(out, post)
        return out

    return [request], finish


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: int | None = Average,
                        process_set: Any = None, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    """Start :func:`reducescatter` (``Ireduce_scatter``; not differentiable)."""
    op = _reducescatter_op(op)
    if tensor.dim() == 0:
        raise ValueError("hpcml.horovod: reducescatter: a 0-dimensional tensor has no first "
                         "dimension (reshape it to (1,))")
    return submit("reducescatter", process_set, name,
                  lambda: _reducescatter_start(tensor, op, prescale_factor, postscale_factor,
                                               process_set), tensor=tensor, op=op)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None,
                          compression: Any = Compression.none, op: int | None = Average,
                          process_set: Any = None, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """``[reducescatter(t) for t in tensors]``."""
    return [reducescatter(t, None, compression, op, process_set, prescale_factor,
                          postscale_factor) for t in tensors]
