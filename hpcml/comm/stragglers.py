"""Seeded straggler injection: how long rank r is delayed at iteration t.

Every model is a pure function of (seed, rank, iteration), so a run is reproducible and any rank
can compute any other rank's delay without communication. Algorithms call
``Communicator.straggle(t)``, which sleeps for this rank's delay and records it in the ledger.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hpcml.config.schema import option
from hpcml.errors import ConfigError, UsageError

DELAY_KINDS = ("none", "fixed", "exponential", "pareto", "trace")


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
    seed: int = option(0, min=0, help="seed of the delay streams")


class DelayModel:
    """Delay in seconds of ``rank`` at ``iteration``; subclasses implement :meth:`sample`."""

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
    """Replays a recorded trace; iterations past the last row wrap around."""

    def __init__(self, config: StragglerConfig) -> None:
        super().__init__(config)
        path = Path(config.trace)
        if not path.is_file():
            raise UsageError(f"stragglers.trace: file {config.trace!r} not found (give a CSV of "
                             "delays in seconds, one row per iteration, one column per rank)")
        try:
            table = np.loadtxt(path, delimiter=",", ndmin=2, dtype=float)
        except ValueError as exc:
            raise UsageError(f"stragglers.trace: {config.trace}: not a numeric CSV "
                             f"({exc})") from None
        if table.size == 0 or (table < 0).any():
            raise UsageError(f"stragglers.trace: {config.trace}: needs non-negative delays")
        self.table = table

    def sample(self, rank: int, iteration: int) -> float:
        if rank >= self.table.shape[1]:
            raise UsageError(f"stragglers.trace: {self.config.trace} has {self.table.shape[1]} "
                             f"columns but rank {rank} needs one (one column per rank)")
        return float(self.table[iteration % self.table.shape[0], rank])


_MODELS = {"none": DelayModel, "fixed": FixedDelay, "exponential": ExponentialDelay,
           "pareto": ParetoDelay, "trace": TraceDelay}


def make_delay_model(config: StragglerConfig, size: int | None = None) -> DelayModel:
    """The delay model ``config`` describes; with ``size`` also checks ranks exist."""
    if config.kind == "fixed" and size is not None:
        bad = [r for r in config.slow_ranks if not 0 <= r < size]
        if bad:
            raise ConfigError("stragglers.slow_ranks", f"ranks {bad} do not exist in a job of "
                              f"{size} ranks", "use ranks 0..size-1")
    if config.kind == "trace" and not config.trace:
        raise ConfigError("stragglers.trace", "kind = 'trace' needs a trace file", "set trace")
    return _MODELS[config.kind](config)
