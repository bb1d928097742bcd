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
from hpcml.parallel import DistributedOptimizer, WrappedOptimizer, broadcast_parameters
from hpcml.qsparse.compressors import Compressor
from hpcml.qsparse.error_feedback import compensate
from hpcml.qsparse.exchange import AllgatherExchange, ServerExchange


class QsparseLocalSGD(WrappedOptimizer):
    """Wrap ``optimizer`` (over ``model``'s parameters) with Qsparse-local-SGD.

    A ``torch.optim.Optimizer`` (:class:`~hpcml.parallel.WrappedOptimizer`): LR schedulers and
    ``zero_grad`` act on the wrapped optimizer; ``state_dict()`` is this rank's (the wrapped
    optimizer's state plus, under ``"qsparse"``, ``x_sync``, the error memory, the compressor's
    random stream and the counters, all plain tensors and ints), so saving each rank's model and
    optimizer state dicts and loading them into a freshly built wrapper continues the run
    bit-exactly. Construction is collective over the exchange's communicator (it broadcasts the
    starting point). In synchronous mode ``step`` is collective on every ``H``-th call; in
    asynchronous mode it only talks to the server. ``H >= 1``; ``seed`` seeds this rank's
    Rand-k/QSGD stream.
    """

    extra_key = "qsparse"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 compressor: Compressor | None = None, H: int = 1,
                 comm: Communicator | None = None,
                 exchange: AllgatherExchange | ServerExchange | None = None,
                 seed: int = 0) -> None:
        if H < 1:
            raise ValueError(f"QsparseLocalSGD: H must be >= 1 local step per sync, got {H}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("QsparseLocalSGD: the model has no trainable parameters")
        super().__init__(optimizer)
        self.params = params
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

    def _added(self, params: list[torch.Tensor]) -> None:
        raise ValueError("QsparseLocalSGD: the synchronized parameter vector is fixed at "
                         "construction; build the wrapper after adding every parameter group")

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

    def extra_state(self) -> dict[str, Any]:
        return {"x_sync": self.x_sync.clone(), "memory": self.memory.clone(),
                "generator": self.gen.get_state(), "local_steps": self.local_steps,
                "syncs": self.syncs, "bits_sent": self.bits_sent}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state["x_sync"].shape != self.x_sync.shape:
            raise ValueError(f"QsparseLocalSGD.load_state_dict: the state holds "
                             f"{state['x_sync'].numel()} parameters, this model has "
                             f"{self.x_sync.numel()}")
        self.x_sync = state["x_sync"].to(self.x_sync.dtype).clone()
        self.memory = state["memory"].to(self.memory.dtype).clone()
        self.gen.set_state(state["generator"])
        self.local_steps, self.syncs = int(state["local_steps"]), int(state["syncs"])
        self.bits_sent = int(state["bits_sent"])

    def close(self) -> None:
        """End of training (asynchronous workers tell the server they are done)."""
        self.exchange.close(self.local_steps)

    def _load(self, vector: torch.Tensor) -> None:
        load_flat(self.params, vector)


@torch.no_grad()
def load_flat(params: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy the flat ``vector`` into ``params`` (in order); the parameters keep their storage."""
    offset = 0
    for p in params:
        p.copy_(vector[offset: offset + p.numel()].view_as(p))
        offset += p.numel()


class AllreduceSGD(DistributedOptimizer):
    """Vanilla distributed SGD, the baseline Qsparse is measured against: a
    :class:`~hpcml.parallel.DistributedOptimizer` (dense allreduce of the averaged gradients,
    overlapped with backward) with Qsparse's accounting surface (``x_sync``, ``bits_sent``:
    the ``32 d`` float32 bits of this worker's gradient per step, ``syncs``).
    Construction (it broadcasts rank 0's model) and ``step`` are collective."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 comm: Communicator) -> None:
        super().__init__(optimizer, model, comm=comm)
        broadcast_parameters(model, comm)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bits_per_step = sum(p.numel() * torch.finfo(p.dtype).bits for p in self.params)
        self.syncs = 0
        self.bits_sent = 0

    @property
    def x_sync(self) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(self.params).detach()

    def step(self, closure: Any = None) -> Any:
        self.syncs += 1
        self.bits_sent += self.bits_per_step
        return super().step(closure)

    def extra_state(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "bits_sent": self.bits_sent}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.syncs, self.bits_sent = int(state["syncs"]), int(state["bits_sent"])
