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
from collections.abc import Callable, Iterable, Iterator
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
    - ``gradient_predivide_factor`` (``op="average"`` only): the sum is taken of the gradients
      divided by it and the result multiplied by it over the ranks (Horovod's option; equal to
      the average up to rounding).
    - ``named_parameters``: with ``model=None``, the ``(name, parameter)`` pairs that name the
      optimizer's parameters (Horovod's way; their gradients are then all reduced densely, so
      sparse ones too); with neither, the parameters are named by their place in the groups.
    - ``wire_dtype``: floating-point gradients travel in this dtype (``torch.float16``:
      Horovod's ``Compression.fp16``) and come back in their parameter's dtype.

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

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module | None, *,
                 comm: Communicator | None = None, reduction: str = "dense_allreduce",
                 bucket_kib: float = 1024, backward_passes_per_step: int = 1,
                 op: str = "average",
                 on_choice: Callable[[str, str], None] | None = None,
                 gradient_predivide_factor: float = 1.0,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                 wire_dtype: torch.dtype | None = None) -> None:
        super().__init__(optimizer)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"DistributedOptimizer(optimizer, model): model must be the "
                            f"torch.nn.Module being trained, got {type(model).__name__}")
        if model is not None and named_parameters is not None:
            raise ValueError("DistributedOptimizer: pass model or named_parameters, not both")
        self._named_parameters = None if named_parameters is None else list(named_parameters)
        if self._named_parameters is not None:
            names = [n for n, _ in self._named_parameters]
            if len(set(names)) != len(names):
                raise ValueError("named_parameters: parameter names must be unique")
        if gradient_predivide_factor != 1.0 and op != "average":
            raise ValueError(f"gradient_predivide_factor={gradient_predivide_factor}: only "
                             "with op='average'")
        if not gradient_predivide_factor > 0:
            raise ValueError(f"gradient_predivide_factor={gradient_predivide_factor}: must be "
                             "> 0")
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.wire_dtype = wire_dtype
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

    def _names(self) -> list[tuple[str, torch.Tensor]]:
        """Every candidate parameter with its name, in registration order."""
        if self.model is not None:
            return list(self.model.named_parameters())
        if self._named_parameters is not None:
            return self._named_parameters
        return [(f"group{g}.param{i}", p) for g, group in enumerate(self.param_groups)
                for i, p in enumerate(group["params"])]

    def _build_reducer(self) -> GradientReducer:
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        named = [(n, p) for n, p in self._names() if id(p) in optimized]
        stray = len(optimized) - len(named)
        if stray:
            raise ValueError(f"the optimizer holds {stray} parameter(s) that are not parameters "
                             "of the model (not named in named_parameters); pass the model (or "
                             "every name) of the parameters it optimizes")
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
                               sparse=frozenset() if self.model is None
                               else sparse_parameter_ids(self.model),
                               passes=self.backward_passes_per_step,
                               average=self.op == "average", on_choice=self.on_choice,
                               predivide=self.gradient_predivide_factor,
                               wire_dtype=self.wire_dtype, module=self.model)

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
                    name = next((n for n, q in self._names() if q is p), "?")
                    raise ValueError(f"parameter {name!r} was unfrozen (requires_grad=True) "
                                     "after DistributedOptimizer was built, so its gradient is "
                                     "never averaged; call opt.rebuild() on every rank after "
                                     "changing requires_grad, between steps")

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change the number of backward passes accumulated per step, between steps (on every
        rank alike)."""
        if int(passes) != passes or passes < 1:
            raise ValueError(f"backward_passes_per_step={passes}: must be an integer >= 1")
        if self.reducer.pending:
            raise RuntimeError("set_backward_passes_per_step() between backward() and step(); "
                               "call it between steps")
        self.backward_passes_per_step = self.reducer.passes = int(passes)

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
