"""Identical state on every rank, checkpoints and exact resumption.

- :func:`broadcast_state`: rank 0's parameters and optimizer state are broadcast
  (:mod:`hpcml.parallel.broadcast`) so all ranks start identical; collective.
- :func:`save_checkpoint`: rank 0 writes ``checkpoint/model.pt`` (parameters, optimizer, step,
  data position, history) and every rank writes ``checkpoint/rng-<rank>.pt`` (its torch, numpy
  and Python RNG states, plus its own ``rank_state`` when given: the per-rank model and
  optimizer of local-SGD runs); each file is written atomically and a ``checkpoint/step`` marker is
  written last by rank 0 after a barrier, so a checkpoint is complete or absent. Collective.
- :func:`load_checkpoint`: every rank reads the model file and its own RNG file; then
  :func:`broadcast_state` makes the parameters and optimizer state bitwise rank 0's.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel import broadcast_optimizer_state, broadcast_parameters
from hpcml.rundir import atomic_write

CHECKPOINT = "checkpoint"


def broadcast_state(comm: Communicator, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Make every rank's parameters and optimizer state equal to rank 0's. Collective."""
    broadcast_parameters(model, comm)
    broadcast_optimizer_state(optimizer, comm)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def save_checkpoint(comm: Communicator, run_dir: Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any], rank_state: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``step`` into ``run_dir/checkpoint`` (collective);
    ``rank_state`` (this rank's own state, if any) goes into this rank's file."""
    ckpt = run_dir / CHECKPOINT
    if comm.rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    _save(ckpt / f"rng-{comm.rank}.pt", {"step": step, "rank_state": rank_state, **rng_state()})
    if comm.rank == 0:
        _save(ckpt / "model.pt", {"step": step, "model": model.state_dict(),
                                  "optimizer": optimizer.state_dict(), "size": comm.size,
                                  **extra})
    comm.barrier()
    if comm.rank == 0:
        atomic_write(ckpt / "step", f"{step}\n")
    return ckpt


def load_checkpoint(comm: Communicator, run_dir: Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``run_dir/checkpoint``; returns the
    saved record (``step``, the extras and this rank's ``rank_state``). Collective."""
    ckpt = run_dir / CHECKPOINT
    if not (ckpt / "step").is_file():
        raise UsageError(f"--resume {run_dir}: no complete checkpoint in it (nothing to resume; "
                         "start a new run)")
    record = torch.load(ckpt / "model.pt", weights_only=False)
    if record["size"] != comm.size:
        raise UsageError(f"--resume {run_dir}: checkpoint written by {record['size']} ranks, "
                         f"this job has {comm.size} (resume with mpiexec -n {record['size']})")
    rng = torch.load(ckpt / f"rng-{comm.rank}.pt", weights_only=False)
    model.load_state_dict(record["model"])
    optimizer.load_state_dict(record["optimizer"])
    set_rng_state(rng)
    broadcast_state(comm, model, optimizer)
    return {**record, "rank_state": rng.get("rank_state")}
