"""``WrappedOptimizer``: a ``torch.optim.Optimizer`` that wraps another one.

The distributed optimizers of hpcml (:class:`~hpcml.parallel.DistributedOptimizer`, Qsparse's
:class:`~hpcml.qsparse.QsparseLocalSGD` and :class:`~hpcml.qsparse.optimizer.AllreduceSGD`) are
*instances* of ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` *are*
the wrapped optimizer's (properties reading its current attributes, so they stay shared even
after the wrapped optimizer's own ``load_state_dict`` replaces them), so everything written for
torch optimizers works unchanged:
LR schedulers (they pass the ``isinstance`` check and edit the shared groups), ``zero_grad``,
``state_dict`` / ``load_state_dict`` (delegated to the wrapped optimizer, which knows how to
cast its own state; a subclass adds its own entries under :attr:`WrappedOptimizer.extra_key`),
``add_param_group`` (delegated; subclasses hear of new parameters through
:meth:`WrappedOptimizer._added`) and step hooks. Subclasses implement ``step``.

Unlike Horovod, which builds its wrapper with ``type(...)`` as a subclass of the user's
optimizer class, the wrapper is one ordinary class whatever it wraps.
"""

from __future__ import annotations

from typing import Any

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    """Base of hpcml's optimizer wrappers (see module docstring)."""

    extra_key = "hpcml"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer to wrap, got "
                            f"{type(optimizer).__name__}; build it first, e.g. "
                            "torch.optim.SGD(model.parameters(), lr=0.1)")
        self.optimizer = optimizer
        self._wrapping = True  # Optimizer.__init__ must not touch the wrapped optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._wrapping = False

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self._wrapping:
            self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if not self._wrapping:
            self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if not self._wrapping:
            self.optimizer.defaults = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (all ranks must add the same groups)."""
        if self._wrapping:  # torch.optim.Optimizer.__init__ replaying the existing groups
            return
        self.optimizer.add_param_group(param_group)
        self._added(self.param_groups[-1]["params"])

    def _added(self, params: list[torch.Tensor]) -> None:
        """Hook for subclasses: ``params`` were added by :meth:`add_param_group`."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, plus :meth:`extra_state` under ``extra_key``
        when a subclass has any (plain tensors and Python numbers, loadable with
        ``torch.load(weights_only=True)``)."""
        state = self.optimizer.state_dict()
        extra = self.extra_state()
        if extra:
            state[self.extra_key] = extra
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        extra = state.pop(self.extra_key, None)
        self.optimizer.load_state_dict(state)
        if extra is not None:
            self.load_extra_state(extra)

    def extra_state(self) -> dict[str, Any]:
        """State of the wrapper itself (empty by default)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
