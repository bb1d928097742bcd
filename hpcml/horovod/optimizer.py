"""Horovod's ``DistributedOptimizer``, ``broadcast_parameters`` and
``broadcast_optimizer_state``, built on :class:`hpcml.parallel.DistributedOptimizer` (its fused
buckets reduced while backward runs) and :mod:`hpcml.parallel.broadcast`.

Differences from ``horovod.torch``, all deliberate:

- the wrapper is an instance of :class:`hpcml.parallel.DistributedOptimizer` (a
  ``torch.optim.Optimizer`` sharing the wrapped one's groups and state), not of a subclass of
  the wrapped optimizer's class;
- ``step()`` after ``synchronize()`` outside ``skip_synchronize()`` warns as Horovod does but
  does not reduce the gradients a second time (Horovod would: with ``op=Sum`` that multiplies
  them by the size);
- ``step()`` inside ``skip_synchronize()`` without a ``synchronize()`` first is refused (the
  gradients are not reduced yet; Horovod would step on local or half-reduced ones);
- ``num_groups``/``groups`` are accepted and change nothing (hpcml fuses by bucket size); every
  gradient is reduced densely, sparse ones too (the numbers of ``sparse_as_dense=True``, which
  equal those of the sparse allgather).

``broadcast_optimizer_state`` on an optimizer with no state yet first takes Horovod's start-up
step (``horovod_start=True``, the default): every trainable parameter's gradient is set to zeros
and the wrapped optimizer steps once, to create its state, before the root's state is
broadcast. That step is not free: weight decay moves the parameters, Adam's step count starts at
1, and the zero gradients are left in ``.grad``. ``horovod_start=False`` broadcasts only the
state that exists (hpcml's behaviour: the parameters stay as they are).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from hpcml.comm.watch import WATCH
from hpcml.horovod.basics import OP_NAMES, Average, Sum, communicator, set_rank
from hpcml.horovod.compression import Compression
from hpcml.horovod.join import OPTIMIZER, negotiate, register_optimizer
from hpcml.parallel import broadcast as _broadcast
from hpcml.parallel.optimizer import DistributedOptimizer as _ParallelOptimizer
from hpcml.parallel.wrapper import WrappedOptimizer


class _HorovodOptimizer(_ParallelOptimizer):
    """hpcml's data-parallel optimizer with Horovod's ``skip_synchronize``."""

    _skip_sync = False
    _synced_by_user = False  # synchronize() was called by the user since the last step()
    _join_index: int | None = None  # over the global set: its index for join()

    @property
    def _parameter_names(self) -> dict[torch.Tensor, str]:
        """Horovod's map from each reduced parameter to its name (read by its tests)."""
        return {p: self.reducer.names[id(p)] for _, p in self.reducer.params}

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside does not reduce: call ``synchronize()`` before it."""
        previous, self._skip_sync = self._skip_sync, True
        try:
            yield
        finally:
            self._skip_sync = previous

    def step(self, closure: Any = None) -> Any:
        if self._skip_sync:
            if not self.reducer.synchronized and self.reducer.pending:
                raise RuntimeError("hpcml.horovod: step() inside skip_synchronize() before "
                                   "synchronize(): the gradients are not reduced yet (call "
                                   "optimizer.synchronize() first)")
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.optimizer.step()
            self._synced_by_user = False
            return loss
        if self._synced_by_user:
            warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                          "context after optimizer.synchronize(); hpcml.horovod does not "
                          "reduce the gradients again (Horovod would)", stacklevel=2)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._reduce()
        self.optimizer.step()
        WATCH.optimizer_steps += 1
        self._synced_by_user = False
        return loss

    def synchronize(self) -> None:
        """Finish reducing the gradients now (collective)."""
        self._reduce()
        self._synced_by_user = True

    def _reduce(self) -> None:
        if self._join_index is not None and not self.reducer.synchronized:
            negotiate("DistributedOptimizer", None, OPTIMIZER, index=self._join_index)
        super().synchronize()

    def contribute_nothing(self) -> None:
        """On a rank inside ``join()``: take part in the other ranks' gradient reduction with
        zero gradients (this rank's ``.grad`` are replaced; it does not step)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        super().synchronize()


class _Bystander(WrappedOptimizer):
    """Horovod's ``DistributedOptimizer`` on a rank outside its process set: nothing is
    reduced, ``step()`` steps the wrapped optimizer on this rank's own gradients."""

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        yield

    def synchronize(self) -> None:
        """Nothing to reduce on a rank outside the process set (not collective)."""

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Nothing accumulates across ranks here; accepted for Horovod's API."""

    def step(self, closure: Any = None) -> Any:
        return self.optimizer.step(closure)


def DistributedOptimizer(optimizer: torch.optim.Optimizer,  # noqa: N802 (Horovod's name)
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: int = Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = None) -> _HorovodOptimizer | _Bystander:
    """Wrap ``optimizer`` so that ``step()`` uses the gradients averaged (``op=Average``) or
    summed (``op=Sum``) over the ranks, reduced while backward runs. Collective: every rank
    wraps the same parameters. ``compression=Compression.fp16``: gradients travel as float16.
    On a rank outside ``process_set`` (added, as Horovod requires), the wrapper reduces nothing
    and steps on this rank's gradients (Horovod's behaviour); not collective there."""
    if op not in (Average, Sum):
        raise ValueError(f"hpcml.horovod: DistributedOptimizer(op={OP_NAMES.get(op, op)}): only "
                         "hvd.Average and hvd.Sum are implemented")
    if compression not in (Compression.none, Compression.fp16):
        raise ValueError("hpcml.horovod: compression: only Compression.none and "
                         "Compression.fp16 are implemented")
    if process_set is not None and process_set.added and not process_set.included():
        return _Bystander(optimizer)  # as Horovod: a rank outside the set steps alone
    comm = communicator(process_set)
    negotiate("DistributedOptimizer()", process_set)
    is_global = process_set is None or process_set.ranks is None
    # over the global set the buckets travel on a communicator of their own, so that a rank in
    # join() can answer the step's header first and then post the same bucket reductions
    wrapped = _HorovodOptimizer(
        optimizer, None, comm=comm.split(0, comm.rank, name="hvd_gradients") if is_global
        else comm,
        backward_passes_per_step=backward_passes_per_step,
        op="average" if op == Average else "sum",
        gradient_predivide_factor=gradient_predivide_factor,
        named_parameters=None if named_parameters is None else list(named_parameters),
        wire_dtype=getattr(compression, "wire_dtype", None))
    if is_global:
        wrapped._join_index = register_optimizer(wrapped)
    return wrapped


def broadcast_parameters(params: Mapping[str, torch.Tensor] | Iterable[Any], root_rank: int,
                         process_set: Any = None) -> None:
    """Copy ``root_rank``'s tensors into every rank's, in place. ``params``: a ``state_dict``,
    ``named_parameters()`` pairs, or tensors; the same on every rank. Collective."""
    if isinstance(params, Mapping):
        tensors = list(params.values())
    else:
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    comm, root = communicator(process_set), set_rank(process_set, root_rank)
    negotiate("broadcast_parameters", process_set)
    _broadcast.broadcast_parameters(tensors, comm, root)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              process_set: Any = None, *, horovod_start: bool = True) -> None:
    """Load ``root_rank``'s optimizer state (hyperparameters included) on every rank.
    Collective. See the module docstring for ``horovod_start``."""
    inner = optimizer.optimizer if isinstance(optimizer, _ParallelOptimizer) else optimizer
    if horovod_start and not inner.state_dict()["state"]:
        for group in inner.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        inner.step()
    comm, root = communicator(process_set), set_rank(process_set, root_rank)
    negotiate("broadcast_optimizer_state", process_set)
    _broadcast.broadcast_optimizer_state(optimizer, comm, root)
