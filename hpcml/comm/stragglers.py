"""Seeded straggler injection: how long rank r is delayed at iteration t.

Every delay model is a pure function of (seed, rank, iteration), so a run is reproducible and any
rank can compute any other rank's delay without communication. Algorithms call
``Communicator.straggle(t)``, which sleeps for this rank's delay and records it in the ledger.

The ``fault`` model is a real fault instead: each rank in ``slow_ranks`` freezes once, for
``freeze`` seconds, at the first iteration >= a seeded start in [freeze_after, 2 freeze_after]
that it works on (again in a later run of iterations, recognized by the counter going back).
``straggle`` then stops the whole process with SIGSTOP (a helper process sends SIGCONT), so the
rank truly neither computes nor receives, as a node that hangs; with simulated workers the
freeze is a delay of ``freeze`` seconds. The freeze is not capped by ``max_delay``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import warnings
from pathlib import Path

import numpy as np

from hpcml.config.schema import option
from hpcml.errors import ConfigError, UsageError

DELAY_KINDS = ("none", "fixed", "exponential", "pareto", "trace", "fault")


@dataclasses.dataclass
class StragglerConfig:
    """The ``[stragglers]`` section of any job file."""

    kind: str = option("none", choices=DELAY_KINDS, help="delay model")
    slow_ranks: list[int] = option([], help="fixed: ranks that are always slow")
    delay: float = option(0.0, min=0.0, help="fixed: seconds added to each slow rank's iteration")
    mean: float = option(0.0, min=0.0, help="exponential: mean delay in seconds")
    shape: float = option(1.5, gt=0.0, help="pareto: tail index alpha (heavier tail when smaller)")
    scale: float = option(0.0, min=0.0, help="pareto: minimum delay x_m in seconds")
    trace: str = option("", help="trace: CSV of seconds, a row per iteration, a column per rank")
    max_delay: float = option(5.0, gt=0.0, help="cap on any single delay in seconds")
    freeze: float = option(1.0, min=0.0, help="fault: seconds each slow rank is frozen")
    freeze_after: int = option(10, min=0, help="fault: the freeze starts at a seeded "
                               "iteration in [freeze_after, 2 * freeze_after]")
    seed: int = option(0, min=0, help="seed of the delay streams")


class DelayModel:
    """Delay in seconds of ``rank`` at ``iteration``; subclasses implement :meth:`sample`.
    ``freezes``: whether the delay is a real freeze of the process (SIGSTOP), not a sleep."""

    freezes = False

    def __init__(self, config: StragglerConfig) -> None:
        self.config = config

    def delay(self, rank: int, iteration: int) -> float:
        """Deterministic, non-negative, capped at ``config.max_delay``."""
        return float(min(max(self.sample(rank, iteration), 0.0), self.config.max_delay))

    def sample(self, rank: int, iteration: int) -> float:
        return 0.0

    def rng(self, rank: int, iteration: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, rank, iteration])


class FixedDelay(DelayModel):
    def sample(self, rank: int, iteration: int) -> float:
        return self.config.delay if rank in self.config.slow_ranks else 0.0


class ExponentialDelay(DelayModel):
    def sample(self, rank: int, iteration: int) -> float:
        return self.rng(rank, iteration).exponential(self.config.mean)


class ParetoDelay(DelayModel):
    """Classical Pareto: x_m * (1 + Lomax(alpha)), so P(D > x) = (x_m / x)^alpha for x >= x_m."""

    def sample(self, rank: int, iteration: int) -> float:
        return self.config.scale * (1.0 + self.rng(rank, iteration).pareto(self.config.shape))


class TraceDelay(DelayModel):
    """Replays a recorded trace; iterations past the last row wrap around. ``size`` (when
    given): the ranks that will ask for a delay, each of which needs its column."""

    def __init__(self, config: StragglerConfig, size: int | None = None) -> None:
        super().__init__(config)
        path = Path(config.trace)
        form = "a CSV of delays in seconds, one row per iteration, one column per rank"
        if not path.is_file():
            raise UsageError(f"stragglers.trace: file {config.trace!r} not found (give {form})")
        try:
            text = path.read_bytes().decode("utf-8")
            with warnings.catch_warnings():  # an empty file is refused below
                warnings.simplefilter("ignore", UserWarning)
                table = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, dtype=float)
        except (ValueError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"stragglers.trace: {config.trace}: not a numeric CSV ({first}; "
                             f"give {form})") from None
        bad = np.argwhere(~(np.isfinite(table) & (table >= 0)))
        if table.size == 0 or len(bad):
            got = "no values" if table.size == 0 else (
                f"{table[tuple(bad[0])]} in row {bad[0][0] + 1}, column {bad[0][1] + 1} "
                f"({len(bad)} such values)")
            raise UsageError(f"stragglers.trace: {config.trace}: needs finite, non-negative "
                             f"delays, got {got} (give {form})")
        if size is not None and table.shape[1] < size:
            raise UsageError(f"stragglers.trace: {config.trace} has {table.shape[1]} columns "
                             f"but ranks 0..{size - 1} each need one (give {form})")
        self.table = table

    def sample(self, rank: int, iteration: int) -> float:
        return float(self.table[iteration % self.table.shape[0], rank])


class FaultDelay(DelayModel):
    """Each slow rank freezes once per run of iterations (see the module docstring)."""

    freezes = True

    def __init__(self, config: StragglerConfig) -> None:
        super().__init__(config)
        self.last: dict[int, int] = {}
        self.fired: set[int] = set()

    def start(self, rank: int) -> int:
        """The seeded iteration from which ``rank`` freezes."""
        after = self.config.freeze_after
        return int(np.random.default_rng([self.config.seed, rank]).integers(after, 2 * after + 1))

    def delay(self, rank: int, iteration: int) -> float:
        if rank not in self.config.slow_ranks:
            return 0.0
        if iteration < self.last.get(rank, -1):
            self.fired.discard(rank)
        self.last[rank] = iteration
        if rank in self.fired or iteration < self.start(rank):
            return 0.0
        self.fired.add(rank)
        return self.config.freeze


def freeze_process(seconds: float) -> None:
    """Stop this process (SIGSTOP) for ``seconds``: a detached ``sh`` waits until the process
    is stopped, then ``seconds``, then sends SIGCONT (so no race can leave it stopped). The
    process neither computes nor makes MPI progress meanwhile. Linux (reads /proc)."""
    pid = os.getpid()
    script = (f"until grep -q '^State:.*T' /proc/{pid}/status 2>/dev/null; do sleep 0.01; done; "
              f"sleep {seconds:.3f}; kill -CONT {pid}")
    subprocess.Popen(["/bin/sh", "-c", script],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    os.kill(pid, signal.SIGSTOP)


_MODELS = {"none": DelayModel, "fixed": FixedDelay, "exponential": ExponentialDelay,
           "pareto": ParetoDelay, "trace": TraceDelay, "fault": FaultDelay}


def make_delay_model(config: StragglerConfig, size: int | None = None) -> DelayModel:
    """The delay model ``config`` describes; with ``size`` also checks that ranks
    ``0..size-1`` exist in it (slow ranks, trace columns)."""
    if config.kind in ("fixed", "fault") and size is not None:
        bad = [r for r in config.slow_ranks if not 0 <= r < size]
        if bad:
            raise ConfigError("stragglers.slow_ranks", f"ranks {bad} do not exist in a job of "
                              f"{size} ranks", "use ranks 0..size-1")
    if config.kind == "trace" and not config.trace:
        raise ConfigError("stragglers.trace", "kind = 'trace' needs a trace file", "set trace")
    if config.kind == "trace":
        return TraceDelay(config, size)
    return _MODELS[config.kind](config)
