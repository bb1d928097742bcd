"""The one gradient-exchange mechanism every strategy shares (arXiv 1905.04035).

:class:`GradientExchange` averages the gradients of a model over the ranks of a communicator
after ``loss.backward()``; :meth:`GradientExchange.synchronize` leaves on every rank the mean of
the ranks' gradients in each ``param.grad`` (dense). A :class:`Strategy` decides only *how* each
tensor travels:

- **fused dense allreduce** (Horovod tensor fusion / DDP buckets): the parameters are laid out,
  in reverse registration order (the order backward produces them), in fused float32 buckets of
  at most ``bucket_bytes`` (:func:`plan_buckets`). A ``register_post_accumulate_grad_hook`` on
  each parameter copies its gradient into its bucket slot the moment autograd finishes it
  (densifying a sparse one with ``index_add_``), and a bucket whose slots are all filled is
  reduced with a non-blocking ``Iallreduce`` while backward goes on. Buckets are launched in
  index order only, so every rank posts the same collectives in the same order.
- **per-tensor exchange** for the parameters a strategy keeps out of the buckets (the sparse
  embedding): after the buckets are launched, in parameter order, by sparse allgather or by a
  dense allreduce of its own buffer, chosen per step by :meth:`Strategy.choose` from the largest
  number of sparse rows on any rank (a collective value, so all ranks choose alike).

Exchange memory (:class:`ExchangeMemory`) counts the bytes of every buffer allocated for the
exchange, from the tensors' own sizes: persistent buckets and per-tensor buffers, plus the
transient allgather payloads while they are alive; ``peak`` is the per-rank high-water mark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hpcml.comm import Communicator, Request
from hpcml.nmt.exchange.memory import ExchangeMemory
from hpcml.nmt.exchange.sparse_allgather import allgather_sparse
from hpcml.nmt.exchange.strategy import ALLGATHER, Strategy


def plan_buckets(numels: Sequence[int], bucket_bytes: int, itemsize: int = 4) -> list[list[int]]:
    """Group tensor indices, keeping their order, into consecutive buckets of at most
    ``bucket_bytes`` (a tensor larger than that gets a bucket of its own). Pure."""
    buckets: list[list[int]] = []
    used = 0
    for i, n in enumerate(numels):
        nbytes = n * itemsize
        if not buckets or used + nbytes > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(i)
        used += nbytes
    return buckets


def densify_into(grad: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``grad`` (dense, or sparse COO possibly uncoalesced) into ``out`` (same numel)."""
    if grad.is_sparse:
        out.zero_()
        view = out.view(grad.shape)
        view.index_add_(0, grad._indices()[0], grad._values())
    else:
        out.copy_(grad.reshape(-1))


@dataclasses.dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    filled: set[int] = dataclasses.field(default_factory=set)
    request: Request | None = None

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)


class GradientExchange:
    """Data-parallel gradient averaging over ``comm`` (see module docstring).

    Collective: every rank builds it for the same model, runs backward and then calls
    :meth:`synchronize` once per step. ``on_choice(name, method)`` is called whenever the
    method of a per-tensor exchange changes (for logging)."""

    def __init__(self, comm: Communicator, model: nn.Module, strategy: Strategy,
                 bucket_bytes: int = 2**20,
                 on_choice: Callable[[str, str], None] | None = None) -> None:
        self.comm, self.strategy, self.on_choice = comm, strategy, on_choice
        self.memory = ExchangeMemory()
        names = {id(p): n for n, p in model.named_parameters()}
        sparse_ids = {id(p) for p in getattr(model, "sparse_parameters", list)()}
        params = [p for p in model.parameters() if p.requires_grad]
        fused = [p for p in reversed(params) if strategy.fused(id(p) in sparse_ids)]
        fused_ids = {id(p) for p in fused}
        self.separate = [(names[id(p)], p) for p in params if id(p) not in fused_ids]
        self.choices: dict[str, str] = {}
        self._solo: dict[str, torch.Tensor] = {}
        self.buckets: list[_Bucket] = []
        self._slot: dict[int, tuple[int, int]] = {}
        for group in plan_buckets([p.numel() for p in fused], bucket_bytes):
            members = [fused[i] for i in group]
            offsets = [0]
            for p in members:
                offsets.append(offsets[-1] + p.numel())
            bucket = _Bucket(members, offsets[:-1], torch.zeros(offsets[-1]))
            self.memory.alloc(bucket.buffer.nbytes)
            for j, p in enumerate(members):
                self._slot[id(p)] = (len(self.buckets), j)
            self.buckets.append(bucket)
        self._next = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in fused]

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()

    def _on_grad(self, p: torch.Tensor) -> None:
        b, j = self._slot[id(p)]
        bucket = self.buckets[b]
        densify_into(p.grad, bucket.view(j).view(-1))
        bucket.filled.add(j)
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if len(bucket.filled) < len(bucket.params):
                if not force:
                    return
                for j in set(range(len(bucket.params))) - bucket.filled:
                    bucket.view(j).zero_()
            bucket.request = self.comm.Iallreduce(bucket.buffer)
            self._next += 1

    def _exchange_separate(self, name: str, p: nn.Parameter) -> torch.Tensor:
        """The mean over ranks of ``p``'s gradient, by the strategy's choice (collective)."""
        size = self.comm.size
        grad = p.grad
        if grad is None:
            grad = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long),
                                           torch.zeros((0, *p.shape[1:])), p.shape,
                                           check_invariants=False)
        nnz = grad._nnz() if grad.is_sparse else p.shape[0]
        nnz_max = int(self.comm.allreduce(nnz, op="max"))
        row_bytes = p[0].numel() * p.element_size()
        method = self.strategy.choose(nnz_max, p.shape[0], row_bytes, size)
        if self.choices.get(name) != method:
            self.choices[name] = method
            if self.on_choice is not None:
                self.on_choice(name, method)
        if method == ALLGATHER:
            total = allgather_sparse(self.comm, grad.to_sparse() if not grad.is_sparse
                                           else grad, self.memory)
            return total.to_dense().div_(size)
        buf = self._solo.get(name)
        if buf is None:
            buf = self._solo[name] = torch.zeros(p.numel())
            self.memory.alloc(buf.nbytes)
        densify_into(grad, buf)
        self.comm.Allreduce(buf)
        return buf.view(p.shape).div(size)

    def synchronize(self) -> None:
        """Finish the exchange: launch what backward has not, exchange the separate tensors,
        wait, and store the mean gradient in every ``param.grad`` (collective)."""
        self._launch_ready(force=True)
        results = [(p, self._exchange_separate(name, p)) for name, p in self.separate]
        size = self.comm.size
        for bucket in self.buckets:
            bucket.request.wait()
            bucket.buffer.div_(size)
            for j, p in enumerate(bucket.params):
                p.grad = bucket.view(j)
            bucket.filled.clear()
            bucket.request = None
        for p, grad in results:
            p.grad = grad
        self._next = 0
