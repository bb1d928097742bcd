"""Identical state on every rank, checkpoints and exact resumption.

- :func:`broadcast_state`: rank 0's parameters and optimizer state are broadcast (``Bcast`` of
  every tensor, in a fixed order) so all ranks start identical; collective.
- :func:`save`: one :mod:`hpcml.checkpoint` step directory: rank 0's parameters, optimizer
  state and extras (history, epoch) as the shared payload, every rank's RNG streams as its own
  payload. Collective.
- :func:`restore`: from the checkpoint the launcher verified and loaded (``weights_only``),
  set the parameters, optimizer state and this rank's RNG; then :func:`broadcast_state` makes
  the parameters and optimizer state bitwise rank 0's. Collective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcml.checkpoint import Restored, rng_state, set_rng_state
from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.jobs import RunContext


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.data for p in model.parameters()]
    for p in model.parameters():
        state = optimizer.state.get(p, {})
        tensors += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    return tensors


def broadcast_state(comm: Communicator, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Make every rank's parameters and optimizer state equal to rank 0's. Collective; all
    ranks must have the same optimizer-state structure (both empty, or both loaded)."""
    for t in _state_tensors(model, optimizer):
        comm.Bcast(t)


def save(ctx: RunContext, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
         extra: dict[str, Any]) -> None:
    """Checkpoint ``step`` into ``ctx.run_dir`` (collective; see module docstring)."""
    ctx.save_checkpoint(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               **extra}, {"rng": rng_state()})


def restore(comm: Communicator, restored: Restored, model: nn.Module,
            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load ``restored`` into ``model``, ``optimizer`` and this rank's RNG; returns the shared
    payload (its extras). Collective."""
    shared = restored.shared
    try:
        model.load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UsageError(f"{restored.manifest.path}: does not fit this model "
                         f"({str(exc).splitlines()[0]}); resume with the same job file") from None
    set_rng_state(restored.local["rng"])
    broadcast_state(comm, model, optimizer)
    return shared
