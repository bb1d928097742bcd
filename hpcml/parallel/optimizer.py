"""``DistributedOptimizer``: data parallelism for any training loop in three lines::

    opt = hpcml.parallel.DistributedOptimizer(torch.optim.AdamW(model.parameters()), model)
    hpcml.parallel.broadcast_parameters(model)
    hpcml.parallel.broadcast_optimizer_state(opt)

and the loop stays ``opt.zero_grad(); loss.backward(); opt.step()``. Gradients are reduced over
the communicator while backward runs (:class:`~hpcml.parallel.data_parallel.GradientReducer`);
``step()`` finishes the exchange, then steps the wrapped optimizer. The wrapper is a
``torch.optim.Optimizer`` (:class:`~hpcml.parallel.wrapper.WrappedOptimizer`): LR schedulers,
``state_dict``, ``load_state_dict``, ``zero_grad`` and ``add_param_group`` work unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from hpcml.comm import Communicator, world
from hpcml.comm.watch import WATCH
from hpcml.parallel.data_parallel import GradientReducer
from hpcml.parallel.memory import ExchangeMemory
from hpcml.parallel.reductions import REDUCTIONS, make_reduction
from hpcml.parallel.wrapper import WrappedOptimizer

OPS = ("average", "sum")


def sparse_parameter_ids(model: nn.Module) -> frozenset[int]:
    """Ids of the parameters whose gradient is a sparse COO tensor: the weights of
    ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)`` modules, and whatever the
    model lists in a ``sparse_parameters()`` method of its own."""
    ids = {id(m.weight) for m in model.modules()
           if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse}
    declared = getattr(model, "sparse_parameters", None)
    if callable(declared):
        ids |= {id(p) for p in declared()}
    return frozenset(ids)


class DistributedOptimizer(WrappedOptimizer):
    """Wrap ``optimizer`` (over parameters of ``model``) with data-parallel gradient reduction.

    - ``comm``: the data-parallel communicator (``None``: :func:`hpcml.comm.world`).
    - ``reduction``: ``"dense_allreduce"``, ``"sparse_allgather"`` or ``"auto"``
      (:mod:`hpcml.parallel.reductions`); only sparse gradients travel differently.
    - ``bucket_kib``: size of the fused buckets; ``backward_passes_per_step``: micro-batches
      accumulated per step (the reduction launches on the last one; one more raises);
      ``op``: ``"average"`` or ``"sum"`` over ranks.
    - ``on_choice(name, method)``: called when ``auto`` changes a tensor's method.

    Every rank must build it for the same model (construction is collective and raises
    ``ValueError`` on every rank when the ranks' parameters differ in name, shape or dtype) and
    call ``step()`` (collective) the same number of times. It reduces the parameters of the
    optimizer that require a gradient when it is built (or at :meth:`rebuild`): a parameter
    unfrozen later is refused at ``step()``/``synchronize()`` with ``ValueError``; the model
    supplies their names, their backward order
    and which gradients are sparse. It does not broadcast: call
    :func:`~hpcml.parallel.broadcast_parameters` and
    :func:`~hpcml.parallel.broadcast_optimizer_state` once before training. Each completed
    ``step()`` is counted for the collective watchdog, which names the step of a loop that
    hangs (:mod:`hpcml.comm.watchdog`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *,
                 comm: Communicator | None = None, reduction: str = "dense_allreduce",
                 bucket_kib: float = 1024, backward_passes_per_step: int = 1,
                 op: str = "average",
                 on_choice: Callable[[str, str], None] | None = None) -> None:
        super().__init__(optimizer)
        if not isinstance(model, nn.Module):
            raise TypeError(f"DistributedOptimizer(optimizer, model): model must be the "
                            f"torch.nn.Module being trained, got {type(model).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r}: use one of {sorted(REDUCTIONS)}")
        if op not in OPS:
            raise ValueError(f"op={op!r}: use 'average' or 'sum'")
        if not bucket_kib > 0:
            raise ValueError(f"bucket_kib={bucket_kib}: must be > 0")
        if int(backward_passes_per_step) != backward_passes_per_step \
                or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step={backward_passes_per_step}: must be an "
                             "integer >= 1 (the micro-batches accumulated per step)")
        self.model, self.comm = model, comm if comm is not None else world()
        self.reduction, self.op = reduction, op
        self.bucket_bytes = max(1, int(bucket_kib * 1024))
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.on_choice = on_choice
        self.reducer = self._build_reducer()

    def _build_reducer(self) -> GradientReducer:
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in optimized]
        stray = len(optimized) - len(named)
        if stray:
            raise ValueError(f"the optimizer holds {stray} parameter(s) that are not parameters "
                             "of the model; pass the model whose parameters it optimizes")
        trainable = [(n, p) for n, p in named if p.requires_grad]
        layout = [(n, tuple(p.shape), str(p.dtype)) for n, p in trainable]
        digest = hashlib.sha256(repr(layout).encode()).hexdigest()
        differ = [r for r, d in enumerate(self.comm.allgather(digest)) if d != digest]
        if differ:
            raise ValueError(f"the ranks' trainable parameters differ (ranks {differ} hold "
                             "another name, shape or dtype than this one): every rank must wrap "
                             "the same model with the same parameter groups")
        return GradientReducer(self.comm, trainable[::-1], make_reduction(self.reduction),
                               bucket_bytes=self.bucket_bytes,
                               sparse=sparse_parameter_ids(self.model),
                               passes=self.backward_passes_per_step,
                               average=self.op == "average", on_choice=self.on_choice)

    def _added(self, params: list[torch.Tensor]) -> None:
        if self.reducer.pending:
            raise RuntimeError("add_param_group() or rebuild() between backward() and step(); "
                               "call it between steps")
        self.reducer.remove_hooks()
        self.reducer = self._build_reducer()

    @property
    def memory(self) -> ExchangeMemory:
        """Bytes of the exchange buffers on this rank (current and peak)."""
        return self.reducer.memory

    @property
    def choices(self) -> dict[str, str]:
        """The current per-tensor method of each separately exchanged (sparse) parameter."""
        return self.reducer.choices

    def synchronize(self) -> None:
        """Finish the reduction now (collective); ``step()`` then does not repeat it. Use it to
        read or clip the reduced gradients before stepping (e.g. ``GradScaler.unscale_``)."""
        self._check_trainable()
        self.reducer.synchronize()

    def _check_trainable(self) -> None:
        """Refuse a parameter that requires a gradient now but did not when the reducer was
        built (it would be stepped on this rank's gradient alone, never averaged)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self.reducer.names:
                    name = next((n for n, q in self.model.named_parameters() if q is p), "?")
                    raise ValueError(f"parameter {name!r} was unfrozen (requires_grad=True) "
                                     "after DistributedOptimizer was built, so its gradient is "
                                     "never averaged; call opt.rebuild() on every rank after "
                                     "changing requires_grad, between steps")

    def rebuild(self) -> None:
        """Rebuild the gradient reduction for the parameters that require a gradient now
        (after freezing or unfreezing some). Between steps; collective."""
        self._added([])

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally, without communication (torch DDP's
        ``no_sync``); the next pass outside reduces the accumulated gradient."""
        with self.reducer.no_sync():
            yield

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Finish the reduction (unless :meth:`synchronize` already did) and step the wrapped
        optimizer. Collective. A ``closure`` is evaluated once, before the reduction."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.reducer.synchronized:
            self.synchronize()
        self.optimizer.step()
        WATCH.optimizer_steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.reducer.pending:
            raise RuntimeError("zero_grad() was called after backward() but before step() (or "
                               "synchronize()): the gradient reduction of this step is under "
                               "way; call step() first")
        super().zero_grad(set_to_none)
