"""Progress of a training loop: a tqdm bar on a terminal, sparse plain lines in a batch job.

On a terminal (the stream is a tty) :class:`Progress` is a tqdm bar. Otherwise (a Slurm log, a
file, a pipe) a carriage-return bar would write one update per step onto one huge log line, so
it prints one plain line each time the loop passes another tenth of its steps, or 60 s after
the last line, whichever comes first: the step, the latest values given to :meth:`update`
(e.g. the loss) and the rate since the start::

    train: step 120/600 (20%), loss 3.142, 8.4 steps/s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm


class Progress:
    """Progress of ``total`` steps starting after ``initial`` (a resumed run). Not collective:
    create it on every rank with ``enabled`` true on one (rank 0); a disabled one prints
    nothing. ``stream`` defaults to stderr (where tqdm writes); ``tty`` overrides the
    terminal check, ``clock`` the time source (both for tests)."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True,
                 desc: str = "train", stream: TextIO | None = None, tty: bool | None = None,
                 every_s: float = 60.0, fraction: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.step, self.start_step = total, initial, initial
        self.enabled, self.desc, self.every_s, self.clock = enabled, desc, every_s, clock
        self.tick = max(1, round(total * fraction))
        self.next_mark = (initial // self.tick + 1) * self.tick
        self.started = self.last_line = clock()
        self.values: dict[str, float] = {}
        self.bar: Any = None
        if enabled and (self.stream.isatty() if tty is None else tty):
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream,
                            dynamic_ncols=True)

    def update(self, n: int = 1, **values: float) -> None:
        """Advance by ``n`` steps; ``values`` (e.g. ``loss=2.3``) are shown with the step."""
        self.step += n
        self.values.update(values)
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in self.values.items()})
            return
        now = self.clock()
        if not self.enabled or (self.step < self.next_mark and self.step < self.total
                                and now - self.last_line < self.every_s):
            return
        while self.next_mark <= self.step:
            self.next_mark += self.tick
        self.last_line = now
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def line(self, now: float) -> str:
        """The batch-mode line for the current step (pure)."""
        parts = [f"{self.desc}: step {self.step}/{self.total} "
                 f"({100 * self.step / max(self.total, 1):.0f}%)"]
        parts += [f"{k} {v:.4g}" for k, v in self.values.items()]
        elapsed = now - self.started
        if elapsed > 0:
            parts.append(f"{(self.step - self.start_step) / elapsed:.3g} steps/s")
        return ", ".join(parts)

    def write(self, message: str) -> None:
        """Print ``message`` on its own line (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar (a no-op in batch mode: the last step already printed its line)."""
        if self.bar is not None:
            self.bar.close()
