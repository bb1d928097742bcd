"""``hvd.elastic``: Horovod's elastic API mapped onto hpcml checkpoints and a restarted (or
Slurm-requeued) MPI job.

An MPI job has a fixed set of ranks: a rank that dies ends the job, and no rank can join a
running one. So what Horovod's elastic mode does *inside* one job (catch a lost worker's
``HorovodInternalError``, roll back to the last commit and go on with the survivors; add workers
found by a discovery script without stopping) is not possible here. What is kept is the state:

- :class:`TorchState` ``commit()`` keeps the state in memory (for ``restore()``) **and** writes
  it as an hpcml checkpoint (``$HPCML_ELASTIC_DIR``, default ``./hvd-elastic``; collective,
  atomic: a job killed at any moment leaves the previous commit or this one);
- ``sync()`` (run by :func:`run` before the training function) loads the newest checkpoint on
  rank 0 the first time, then broadcasts model, optimizer state and the other attributes from
  rank 0, so a job **restarted at any rank count** resumes from the last commit;
- after ``commit()``, when any rank has received SIGUSR1/SIGTERM (Slurm's pre-timeout signal
  with ``--signal``, or ``scancel --signal``), every rank raises :class:`Preempted`, a
  ``SystemExit`` with status 75: the batch script requeues the job on that status and the next
  run resumes from the commit just written.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpcml import checkpoint
from hpcml.horovod.basics import communicator, rank
from hpcml.horovod.ops import broadcast_object
from hpcml.horovod.optimizer import broadcast_optimizer_state, broadcast_parameters
from hpcml.preemption import Preemption

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again", the status a batch script requeues on
CONFIG_HASH = "hpcml.horovod.elastic"


class Preempted(SystemExit):
    """Raised by ``commit()`` on every rank after a preemption signal reached any rank (the
    commit is on disk): the process exits with status 75."""

    def __init__(self, reason: str) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.reason = reason


def elastic_dir() -> Path:
    return Path(os.environ.get("HPCML_ELASTIC_DIR", "hvd-elastic"))


class TorchState:
    """Horovod's ``TorchState(model=None, optimizer=None, **kwargs)``: the model's and the
    optimizer's state plus every keyword (``epoch=0, batch=0``, ...) as an attribute. Keyword
    values must be checkpointable (tensors, numbers, strings, None, and lists/tuples/dicts of
    them). Build it on every rank alike."""

    def __init__(self, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        self.model, self.optimizer = model, optimizer
        self._names = list(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)
        self._reset_callbacks: list[Callable[[], None]] = []
        self._synced_from_disk = False
        self.commits = 0
        self._preemption: Preemption | None = None
        self.save()

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Horovod calls these after a reset (workers added or removed). An MPI job never
        resets in place, so they are kept and never called; after a restart at another size,
        the training function sees the new ``hvd.size()`` from the start."""
        self._reset_callbacks.extend(callbacks)

    def _payload(self) -> dict[str, Any]:
        return {"model": None if self.model is None else self.model.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "attrs": {n: getattr(self, n) for n in self._names}}

    def _load(self, payload: dict[str, Any]) -> None:
        if self.model is not None:
            self.model.load_state_dict(payload["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
        for name, value in payload["attrs"].items():
            setattr(self, name, value)

    def save(self) -> None:
        """Keep a copy of the state in memory (not collective)."""
        self._saved = copy.deepcopy(self._payload())

    def restore(self) -> None:
        """Undo every change since the last ``commit()`` (or ``save()``); not collective."""
        self._load(copy.deepcopy(self._saved))

    def commit(self) -> None:
        """``save()``, then write the state as a checkpoint (collective over the job; rank 0's
        state is written). Raises :class:`Preempted` on every rank, after writing, when a
        preemption signal has reached any rank under :func:`run`."""
        self.save()
        self.commits += 1
        checkpoint.save(communicator(None), elastic_dir(), self.commits, self._saved, {},
                        CONFIG_HASH)
        if self._preemption is not None:
            reason = self._preemption.agreed(communicator(None))
            if reason is not None:
                raise Preempted(reason)

    def sync(self) -> None:
        """Bring every rank to rank 0's state (collective): the first time in a process, rank
        0 first loads the newest checkpoint of ``$HPCML_ELASTIC_DIR`` when there is one."""
        if not self._synced_from_disk:
            self._synced_from_disk = True
            manifest = checkpoint.latest(elastic_dir()) if rank() == 0 else None
            if manifest is not None:
                self._load(checkpoint.read(manifest, 0).shared)
            self.commits = broadcast_object(0 if manifest is None else manifest.step, 0)
        if self.model is not None:
            broadcast_parameters(self.model.state_dict(), root_rank=0)
        if self.optimizer is not None:
            broadcast_optimizer_state(self.optimizer, root_rank=0, horovod_start=False)
        for name, value in broadcast_object({n: getattr(self, n) for n in self._names},
                                            0).items():
            setattr(self, name, value)
        self.save()


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Horovod's ``@hvd.elastic.run``: ``func(state, ...)`` runs after ``state.sync()``, with
    SIGUSR1/SIGTERM turned into a flag that ``state.commit()`` acts on (:class:`Preempted`).
    Collective: every rank calls the wrapped function."""

    @functools.wraps(func)
    def wrapper(state: TorchState, *args: Any, **kwargs: Any) -> Any:
        with Preemption() as flag:
            state._preemption = flag
            try:
                state.sync()
                return func(state, *args, **kwargs)
            finally:
                state._preemption = None

    return wrapper


__all__ = ["PREEMPTED_EXIT", "Preempted", "TorchState", "run"]
