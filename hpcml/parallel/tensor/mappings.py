"""The four communication steps of tensor parallelism, as autograd functions (Megatron-LM's
"mappings", arXiv 1909.08053 §3), and the pure slicing arithmetic of a sharded parameter.

Inside a tensor-parallel group every rank holds the same *replicated* activations outside the
parallel regions. Entering a region, :func:`copy_to` is the identity forward and sums the
gradient over the group backward (each rank's shard contributed part of the input's gradient);
leaving it, :func:`reduce_from` sums the partial outputs forward and passes the gradient through
backward (every rank already holds the full gradient of the replicated output). :func:`gather`
and :func:`scatter` are the pair for a dimension that is split across the group. All of them are
collective over ``comm`` (every rank of the group must call them, in the same order, forward and
backward) and move their bytes through :mod:`hpcml.comm`, so the ledger sees every byte; on a
group of one rank they are identities without communication.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from hpcml.comm import Communicator, chunk_bounds, chunk_counts
from hpcml.errors import UsageError


def _allreduce(x: torch.Tensor, comm: Communicator, op: str = "sum") -> torch.Tensor:
    out = x.detach().contiguous().clone()
    if comm.size > 1 and not out.is_meta:  # meta: tracing a deferred model, shapes only
        comm.Allreduce(out, op=op)
    return out


def _gather(x: torch.Tensor, comm: Communicator, dim: int, total: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order, where rank r's part is the
    :func:`~hpcml.comm.chunk_bounds` range r of ``total`` elements (so every rank knows every
    part's length without asking: one ``Allgatherv``, nothing else). Collective."""
    counts = chunk_counts(total, comm.size)
    if counts[comm.rank] != x.shape[dim]:
        raise UsageError(f"tensor-parallel gather: this rank's part has {x.shape[dim]} elements "
                         f"along dim {dim}, but the chunk_bounds split of {total} over "
                         f"{comm.size} ranks gives it {counts[comm.rank]}; pass the full length")
    if comm.size == 1:
        return x.detach().clone()
    if x.is_meta:  # tracing a deferred model: the shape only, no communication
        return x.new_empty((*x.shape[:dim], total, *x.shape[dim + 1:]))
    front = x.detach().movedim(dim, 0).contiguous()
    per = int(torch.Size(front.shape[1:]).numel())
    out = torch.empty((total, *front.shape[1:]), dtype=x.dtype, device=x.device)
    comm.Allgatherv(front.reshape(-1), out.reshape(-1), [c * per for c in counts])
    return out.movedim(0, dim)


def _my_slice(x: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
    lo, hi = chunk_bounds(x.shape[dim], comm.size, comm.rank)
    return x.narrow(dim, lo, hi - lo).contiguous()


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:  # noqa: ANN001
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return _allreduce(grad, ctx.comm), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:  # noqa: ANN001
        return _allreduce(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, dim: int,  # noqa: ANN001
                total: int) -> torch.Tensor:
        ctx.dim, ctx.lo = dim, chunk_bounds(total, comm.size, comm.rank)[0]
        ctx.n = x.shape[dim]
        return _gather(x, comm, dim, total)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        return grad.narrow(ctx.dim, ctx.lo, ctx.n).contiguous(), None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:  # noqa: ANN001
        ctx.comm, ctx.dim, ctx.total = comm, dim, x.shape[dim]
        return _my_slice(x, comm, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        return _gather(grad, ctx.comm, ctx.dim, ctx.total), None, None


def copy_to(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Enter a parallel region: ``x`` forward, gradient summed over ``comm`` backward."""
    return _CopyTo.apply(x, comm)


def reduce_from(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Leave a parallel region: ``x`` summed over ``comm`` forward, gradient unchanged backward."""
    return _ReduceFrom.apply(x, comm)


def gather(x: torch.Tensor, comm: Communicator, dim: int = -1,
           total: int | None = None) -> torch.Tensor:
    """Concatenate the ranks' parts along ``dim`` into ``total`` elements; backward keeps this
    rank's part of the gradient. The parts are the :func:`~hpcml.comm.chunk_bounds` split of
    ``total`` (how :func:`scatter`, :class:`Shard` and the vocabulary split cut); the default
    ``total = comm.size * x.shape[dim]`` means equal parts. The lengths are computed, not
    exchanged, so a call costs one ``Allgatherv``; a part whose length does not fit ``total``
    raises ``UsageError``."""
    dim = dim % x.dim()
    return _Gather.apply(x, comm, dim, comm.size * x.shape[dim] if total is None else total)


def scatter(x: torch.Tensor, comm: Communicator, dim: int = -1) -> torch.Tensor:
    """This rank's :func:`~hpcml.comm.chunk_bounds` slice of replicated ``x`` along ``dim``;
    backward gathers the gradient."""
    return _Scatter.apply(x, comm, dim)


def max_over(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Elementwise maximum over ``comm``, without gradient. Collective."""
    return _allreduce(x, comm, op="max")


@dataclasses.dataclass(frozen=True)
class Shard:
    """How one parameter is split over a tensor-parallel group: along ``dim``, in ``blocks``
    equal stacked blocks (3 for a fused query/key/value projection), each block cut into the
    :func:`~hpcml.comm.chunk_bounds` ranges of its length. Pure arithmetic, no communication."""

    dim: int
    blocks: int = 1

    def local(self, full: torch.Tensor, size: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s shard of ``full`` (a new contiguous tensor)."""
        stacked = full.unflatten(self.dim, (self.blocks, -1))
        lo, hi = chunk_bounds(stacked.shape[self.dim + 1], size, rank)
        return stacked.narrow(self.dim + 1, lo, hi - lo).flatten(self.dim, self.dim + 1).clone()

    def full(self, local: torch.Tensor, comm: Communicator,
             total: int | None = None) -> torch.Tensor:
        """The whole tensor (length ``total`` along ``dim``; default ``comm.size`` times this
        shard's, i.e. an even split) from every rank's shard. Collective over ``comm``: one
        ``Allgatherv``."""
        total = comm.size * local.shape[self.dim] if total is None else total
        stacked = local.detach().unflatten(self.dim, (self.blocks, -1))
        return _gather(stacked, comm, self.dim + 1, total // self.blocks).flatten(
            self.dim, self.dim + 1)


def full_tensors(parts: Sequence[tuple[torch.Tensor, Shard | None]],
                 comm: Communicator) -> list[torch.Tensor]:
    """Each sharded part made whole (:meth:`Shard.full`), replicated ones cloned, in order.
    Collective over ``comm`` with the same sequence of shards on every rank: one small
    allgather of the shards' lengths (uneven splits need them), then one ``Allgatherv`` per
    sharded tensor."""
    lengths = [t.shape[s.dim] for t, s in parts if s is not None]
    if comm.size > 1 and lengths:
        totals = iter([sum(col) for col in zip(*comm.allgather(lengths), strict=True)])
    else:
        totals = iter([comm.size * n for n in lengths])
    return [t.detach().clone() if s is None else s.full(t, comm, next(totals)) for t, s in parts]
