"""Preemption: checkpoint when Slurm asks, resume when the job is requeued.

The templates ask Slurm for ``--signal=B:USR1@<seconds>`` (SIGUSR1 to the batch shell that many
seconds before the time limit) and ``--requeue``. The batch shell forwards the signal to the
launcher (Hydra's ``mpiexec`` and ``srun`` both pass SIGUSR1 and SIGTERM on to every rank), waits
for hpcml to exit, and runs ``scontrol requeue`` so the same job id runs again; that run finds
the previous run directory and passes ``--resume`` to it.

How a job uses this (``hpcml/slurm/scaling.py`` is the worked example)::

    stop = Preemption.install()                 # every rank, before the loop
    for step in range(start, cfg.steps):
        ...work...
        if stop.requested(comm):                # collective: all ranks agree
            save_checkpoint(...); return {"status": "preempted", ...}

``requested`` is collective (one small allreduce of the local flags) so every rank leaves the loop
at the same step even though signals reach ranks at different moments. A job that returns
``status = "preempted"`` makes ``summary.json`` say so, which the template and ``hpcml sweep
status`` read.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

from hpcml.comm import Communicator

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """A flag set by SIGUSR1/SIGTERM. Create with :meth:`install` (one per process)."""

    def __init__(self) -> None:
        self.received: int | None = None

    @classmethod
    def install(cls) -> Preemption:
        """Install handlers for SIGUSR1 and SIGTERM on this process (not collective)."""
        flag = cls()
        for sig in SIGNALS:
            signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @property
    def local(self) -> bool:
        """Whether this rank has received a signal (no communication)."""
        return self.received is not None

    def requested(self, comm: Communicator) -> bool:
        """True on every rank when any rank has received a signal. Collective over ``comm``."""
        return bool(comm.allreduce(int(self.local), op="max"))


def restart_count() -> int:
    """How many times Slurm has requeued this job (``SLURM_RESTART_COUNT``; 0 outside Slurm)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0
