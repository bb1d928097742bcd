"""Stop requests from the batch system: SIGTERM and SIGUSR1 (Slurm's ``--signal`` pre-timeout
warning) set a flag that the training loop reads at the next step boundary, where all ranks
agree on it collectively (see :mod:`hpcml.nmt.step`), checkpoint and stop."""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Context manager: while active, the signals above set ``requested`` instead of killing
    the process; the previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
