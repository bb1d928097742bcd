"""Preemption: SIGUSR1 (Slurm's ``--signal`` pre-timeout warning) and SIGTERM become a flag that
a job reads at its next step boundary, so it can checkpoint and stop instead of dying mid-step.

:func:`hpcml.launch.execute` activates one flag for the whole run, before the job file is
validated, so a signal that arrives before a job's loop starts or after it ends is kept (the
job stops at its first step boundary, or finishes) rather than killing the rank; the job reads
it as ``ctx.preemption`` / ``ctx.stop_requested()`` and names the signal as ``stopped_by`` in its
summary, which makes the run's ``status`` ``"preempted"`` (:func:`run_status`).

The Slurm templates ask for ``--signal=B:USR1@<seconds>`` and ``--requeue``; the batch shell
forwards SIGUSR1 to the launcher (Hydra's ``mpiexec`` and ``srun`` both pass it on to every
rank), waits for hpcml to exit and requeues the job when the run's summary says ``"preempted"``
and the shell was not sent SIGTERM (a plain ``scancel`` ends the job for good); the next run
passes ``--resume`` to the run directory it left. A job uses it like this::

    for step in range(start, cfg.steps):        # every rank
        ...work...
        stopped = ctx.stop_requested()          # collective: all ranks agree
        if stopped:
            ctx.save_checkpoint(...); return {"stopped_by": stopped, ...}

Signals reach ranks at different moments, so the decision must be collective: ``requested`` is
one small allreduce, or a job may fold ``stop.local`` into a collective it already makes (the
NMT step's token count, the consensus round's ``Allgather``), or poll every K iterations (qsparse:
at evaluations). In master/worker jobs (coded, async qsparse) the master reads its own flag
(``received``, no communication) and tells the workers through its protocol. Either way the
summary keeps the shape of a finished run, for the iterations done, plus ``stopped_by``.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcml.comm import Communicator

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_early: list[str] = []  # SIGUSR1s caught by catch_early_usr1 before a Preemption was active


def _record_early(signum: int, _frame: FrameType | None) -> None:
    _early.append(signal.Signals(signum).name)


def catch_early_usr1() -> None:
    """Make SIGUSR1 harmless for the whole ``hpcml`` process (its default action kills it): a
    SIGUSR1 that arrives before a run has installed its :class:`Preemption` (while Python starts
    and imports torch and MPI) is kept and becomes that run's preemption signal, and one that
    arrives after the run ended (Slurm's ``--signal`` warning, late) is ignored instead of
    failing a finished job. The command-line entry point calls it first; library use does not."""
    signal.signal(signal.SIGUSR1, _record_early)


class Preemption:
    """A flag set by SIGUSR1/SIGTERM while the context is active (previous handlers are restored
    on exit)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        if _early:
            self.received = _early[0]
            _early.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    @property
    def local(self) -> bool:
        """Whether this rank has received a signal (no communication)."""
        return self.received is not None

    def requested(self, comm: Communicator) -> bool:
        """True on every rank when any rank has received a signal. Collective over ``comm``."""
        return bool(comm.allreduce(int(self.local), op="max"))

    def agreed(self, comm: Communicator) -> str | None:
        """:meth:`requested` as a reason: this rank's signal name, ``"signal on another rank"``,
        or None on every rank when no rank has one. Collective over ``comm``."""
        return self.reason() if self.requested(comm) else None

    def reason(self) -> str:
        """Why this rank stops once the ranks agreed to (not collective)."""
        return self.received or "signal on another rank"


def run_status(summary: dict[str, object]) -> str:
    """``"failed"`` when the job could not go on (its summary names ``failed_by``, e.g. too few
    coded workers answering), ``"preempted"`` when it stopped early (``stopped_by``), else
    ``"complete"``: the ``status`` of every run's ``summary.json``."""
    if summary.get("failed_by"):
        return "failed"
    return "preempted" if summary.get("stopped_by") else "complete"


def restart_count() -> int:
    """How many times Slurm has requeued this job (``SLURM_RESTART_COUNT``; 0 outside Slurm)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0
