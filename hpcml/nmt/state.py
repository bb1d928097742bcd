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

from hpcml.checkpoint import (
    SHARED,
    Restored,
    check_rng_state,
    rank_file,
    require,
    rng_state,
    set_rng_state,
)
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


def _optimizer_fits(optimizer: torch.optim.Optimizer, state: Any, where: Any) -> None:
    """A trial ``optimizer.load_state_dict(state)`` succeeds and leaves every per-parameter
    state tensor a scalar or of its parameter's shape (``optimizer`` is a fresh one)."""
    try:
        optimizer.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{where}: its optimizer state does not fit this model ({text}); "
                         "resume with the same job file") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.numel() != 1 \
                        and value.shape != param.shape:
                    raise UsageError(f"{where}: optimizer state {name!r} has shape "
                                     f"{tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(param.shape)}; resume with the same job file")


def check(restored: Restored, fresh: Any, rank: int, qsparse: bool) -> None:
    """Everything :func:`restore` and the training loop read from ``restored``, tried before
    anything is written: the model's tensors (names, dtypes, shapes), a trial load of the
    optimizer state, the history and epoch, this rank's RNG state and, with ``qsparse``, its
    ``rank_state`` (model, wrapped optimizer and the wrapper's own state). ``fresh()`` returns
    a new (model, optimizer) of this config. Raises a one-line ``UsageError`` naming the file
    (not collective)."""
    shared_file = restored.manifest.path / SHARED
    own_file = restored.manifest.path / rank_file(rank)
    model, optimizer = fresh()
    require(restored.shared, {"model": model.state_dict(), "optimizer": {}, "history": [],
                              "epoch": 0}, shared_file)
    for entry in restored.shared["history"]:
        require(entry, {"step": 0, "valid_loss": 0.0}, shared_file)
    _optimizer_fits(optimizer, restored.shared["optimizer"], shared_file)
    check_rng_state(restored.local, own_file)
    if not qsparse:
        return
    own = restored.local.get("rank_state")
    if own is None:
        raise UsageError(f"{own_file}: has no per-rank qsparse state (it was written without "
                         "[qsparse]); start a new run")
    model, optimizer = fresh()
    vector = torch.nn.utils.parameters_to_vector(
        [p for p in model.parameters() if p.requires_grad]).detach()  # as QsparseLocalSGD
    require(own, {"model": model.state_dict(), "optimizer": {"qsparse": {
        "x_sync": vector, "memory": vector, "generator": torch.Generator().get_state(),
        "local_steps": 0, "syncs": 0, "bits_sent": 0}}}, own_file)
    _optimizer_fits(optimizer, {k: v for k, v in own["optimizer"].items() if k != "qsparse"},
                    own_file)
