"""``QsparseLocalSGD``: Qsparse-local-SGD around any torch model and optimizer.

The user's loop does not change (``loss.backward(); opt.step()``): ``step`` runs the wrapped
optimizer (the local iteration ``x_r <- x_r - eta_t grad``, Algorithm 1 line 4) and, every ``H``
local steps (the synchronization indices, ``gap(I_T) = H``), performs the error-compensated
compressed exchange (lines 6-11, :func:`~hpcml.qsparse.error_feedback.compensate`) through an
exchange strategy: :class:`~hpcml.qsparse.exchange.AllgatherExchange` (synchronous, collective)
or :class:`~hpcml.qsparse.exchange.ServerExchange` (asynchronous worker, Algorithm 2).
Parameters are treated as one flat vector of the trainable parameters in ``model.parameters()``
order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpcml.comm import Communicator, world
from hpcml.qsparse.compressors import Compressor
from hpcml.qsparse.error_feedback import compensate
from hpcml.qsparse.exchange import AllgatherExchange, ServerExchange


class WrappedOptimizer:
    """The torch-optimizer surface both wrappers expose by delegating to ``self.optimizer``,
    so schedulers and training loops treat them as the optimizer they wrap."""

    optimizer: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class QsparseLocalSGD(WrappedOptimizer):
    """Wrap ``optimizer`` (over ``model``'s parameters) with Qsparse-local-SGD.

    Construction is collective over the exchange's communicator (it broadcasts the starting
    point). In synchronous mode ``step`` is collective on every ``H``-th call; in asynchronous
    mode it only talks to the server. ``H >= 1``; ``seed`` seeds this rank's Rand-k/QSGD stream.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 compressor: Compressor | None = None, H: int = 1,
                 comm: Communicator | None = None,
                 exchange: AllgatherExchange | ServerExchange | None = None,
                 seed: int = 0) -> None:
        if H < 1:
            raise ValueError(f"QsparseLocalSGD: H must be >= 1 local step per sync, got {H}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("QsparseLocalSGD: the model has no trainable parameters")
        self.optimizer = optimizer
        self.compressor = compressor if compressor is not None else Compressor()
        self.H = H
        self.exchange = exchange if exchange is not None else AllgatherExchange(comm or world())
        rank = self.exchange.comm.rank
        x0 = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        self.x_sync = self.exchange.initial(x0)
        self._load(self.x_sync)
        self.memory = torch.zeros_like(self.x_sync)
        state = np.random.SeedSequence([seed, rank]).generate_state(1)[0]
        self.gen = torch.Generator().manual_seed(int(state))
        self.local_steps = 0
        self.syncs = 0
        self.bits_sent = 0

    def step(self, closure: Any = None) -> Any:
        """One local optimizer step; synchronizes after every ``H``-th."""
        loss = self.optimizer.step(closure)
        self.local_steps += 1
        if self.local_steps % self.H == 0:
            self.synchronize()
        return loss

    def synchronize(self) -> None:
        """Compress ``memory + x_sync - x_local``, exchange, and restart from the new
        ``x_sync`` (collective in synchronous mode)."""
        x_local = torch.nn.utils.parameters_to_vector(self.params).detach()
        payload, _, self.memory = compensate(self.compressor, self.memory, self.x_sync,
                                             x_local, self.gen)
        self.x_sync = self.exchange.exchange(payload, self.compressor, self.x_sync)
        self._load(self.x_sync)
        self.bits_sent += payload.bits
        self.syncs += 1

    def close(self) -> None:
        """End of training (asynchronous workers tell the server they are done)."""
        self.exchange.close()

    def _load(self, vector: torch.Tensor) -> None:
        load_flat(self.params, vector)


@torch.no_grad()
def load_flat(params: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy the flat ``vector`` into ``params`` (in order); the parameters keep their storage."""
    offset = 0
    for p in params:
        p.copy_(vector[offset: offset + p.numel()].view_as(p))
        offset += p.numel()


class AllreduceSGD(WrappedOptimizer):
    """Vanilla distributed SGD, the baseline Qsparse is measured against: every step the
    gradients are averaged with one dense ``Allreduce`` before the wrapped optimizer steps.

    Same surface as :class:`QsparseLocalSGD` (``step``, ``zero_grad``, ``param_groups``,
    ``x_sync``, ``bits_sent``, ``syncs``); ``bits_sent`` counts the ``32 d`` (float32) bits of
    this worker's gradient per step. Construction and ``step`` are collective."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 comm: Communicator) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.comm = optimizer, comm
        x0 = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        load_flat(self.params, comm.Bcast(x0, root=0))
        self.bits_per_step = x0.numel() * torch.finfo(x0.dtype).bits
        self.syncs = 0
        self.bits_sent = 0

    @property
    def x_sync(self) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(self.params).detach()

    def step(self, closure: Any = None) -> Any:
        grads = torch.cat([p.grad.reshape(-1) for p in self.params])
        self.comm.Allreduce(grads)
        load_flat([p.grad for p in self.params], grads / self.comm.size)
        self.syncs += 1
        self.bits_sent += self.bits_per_step
        return self.optimizer.step(closure)
