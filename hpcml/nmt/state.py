"""Identical state on every rank, checkpoints and exact resumption.

- :func:`broadcast_state`: rank 0's parameters and optimizer state are broadcast
  (:mod:`hpcml.parallel.broadcast`) so all ranks start identical; collective.
- :func:`save`: one :mod:`hpcml.checkpoint` step directory: rank 0's parameters, optimizer
  state and extras (history, epoch) as the shared payload; every rank's RNG streams, plus its
  own ``rank_state`` when given (the per-rank model and optimizer of local-SGD runs), as its
  own payload. Collective.
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
from hpcml.parallel import broadcast_optimizer_state, broadcast_parameters


def broadcast_state(comm: Communicator, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Make every rank's parameters and optimizer state equal to rank 0's. Collective."""
    broadcast_parameters(model, comm)
    broadcast_optimizer_state(optimizer, comm)


def save(ctx: RunContext, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
         extra: dict[str, Any], rank_state: dict[str, Any] | None = None) -> None:
    """Checkpoint ``step`` into ``ctx.run_dir`` (collective; see module docstring)."""
    ctx.save_checkpoint(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               **extra}, {"rng": rng_state(), "rank_state": rank_state})


def restore(comm: Communicator, restored: Restored, model: nn.Module,
            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load ``restored`` into ``model``, ``optimizer`` and this rank's RNG; returns the shared
    payload (its extras) and this rank's ``rank_state`` (None if none was saved). Collective."""
    shared = restored.shared
    try:
        model.load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UsageError(f"{restored.manifest.path}: does not fit this model "
                         f"({str(exc).splitlines()[0]}); resume with the same job file") from None
    set_rng_state(restored.local["rng"])
    broadcast_state(comm, model, optimizer)
    return {**shared, "rank_state": restored.local.get("rank_state")}
