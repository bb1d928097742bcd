"""What the coded benchmarks (``hpcml bench coded``, ``hpcml bench cf``) share: the straggler
regime they compare under (job-file keys, the delay model per kind and seed, its description)
and the code section each strategy stands for."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hpcml.coded.config import CodeConfig
from hpcml.comm import StragglerConfig
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError

DELAY_MODELS = ("none", "exponential", "pareto", "fixed", "fault")


@dataclasses.dataclass
class StragglerBenchConfig(JobConfig):
    """Job-file keys of a straggler benchmark: the delay models to compare under and their
    parameters, m, and how many delay realizations each strategy meets."""

    delay_models: list[str] = option(["none", "exponential", "pareto"], choices=DELAY_MODELS,
                                     nonempty=True, help="straggler models to compare under")
    workers: int = option(0, min=0, help="m; 0 = ranks - 1 (4 on one rank, simulated)")
    mean: float = option(0.02, min=0.0, help="exponential: mean delay (s)")
    scale: float = option(0.005, min=0.0, help="pareto: minimum delay x_m (s)")
    shape: float = option(1.1, gt=0.0, help="pareto: tail index")
    slow_delay: float = option(0.05, min=0.0, help="fixed: delay of rank 1 (s)")
    max_delay: float = option(0.3, gt=0.0, help="cap on one injected delay (s)")
    freeze: float = option(1.0, gt=0.0, help="fault: seconds rank 1 is frozen (SIGSTOP on "
                           "MPI, once per solve; not capped by max_delay)")
    freeze_after: int = option(10, min=0, help="fault: the freeze starts at a seeded "
                               "iteration in [freeze_after, 2 * freeze_after]")
    repeats: int = option(3, min=1, help="delay realizations (seeds seed, seed + 1, ...) per "
                          "model; every strategy sees the same ones; the table shows medians")

    def check_strategies(self, size: int, strategies: list[str], largest_k: int) -> int:
        """Validate the delay models, m, k and the strategy list for ``size`` ranks; returns
        m. One rank simulates the workers in virtual time, where model 'none' takes no time
        and is skipped, so it must not be the only one."""
        if size == 1 and set(self.delay_models) == {"none"}:
            raise ConfigError("delay_models", "['none'] alone measures nothing on one rank "
                              "(simulated workers take no time without injected delays)",
                              "add e.g. 'exponential', or launch with mpiexec -n 5")
        base = CodeConfig(workers=self.workers)
        base.check(size, prefix="workers")
        m = base.workers_for(size)
        if largest_k > m:
            raise ConfigError("wait_for", f"k = {largest_k} > m = {m} workers",
                              "choose k <= m (m = ranks - 1, or workers on one rank)")
        if "uncoded-all" not in strategies:
            raise ConfigError("strategies", "no 'uncoded-all': the baseline every speedup is "
                              "measured against", "add 'uncoded-all' to strategies")
        if "replication" in strategies and m % 2:
            raise ConfigError("strategies", f"replication needs an even number of workers, "
                              f"m = {m}", "run with an odd number of ranks or drop it")
        return m

    def delays(self, kind: str, seed: int) -> StragglerConfig:
        """The ``[stragglers]`` section of delay model ``kind`` with seed ``seed``."""
        return StragglerConfig(kind=kind, mean=self.mean, scale=self.scale, shape=self.shape,
                               slow_ranks=[1], delay=self.slow_delay, max_delay=self.max_delay,
                               freeze=self.freeze, freeze_after=self.freeze_after, seed=seed)

    def regime(self) -> str:
        """The delay models, in words, for a report's header."""
        words = {"none": "none: no injected delay (the cost of a round itself)",
                 "exponential": f"exponential: i.i.d. per worker and round, mean "
                                f"{self.mean * 1e3:g} ms",
                 "pareto": f"pareto: i.i.d. per worker and round, P(D > x) = (x_m / x)^alpha, "
                           f"x_m {self.scale * 1e3:g} ms, alpha {self.shape:g} (infinite "
                           f"variance when alpha < 2)",
                 "fixed": f"fixed: rank 1 (the first worker) {self.slow_delay * 1e3:g} ms "
                          f"every round",
                 "fault": f"fault: rank 1 frozen (SIGSTOP; simulated: a delay) for "
                          f"{self.freeze:g} s once per solve, from a seeded iteration in "
                          f"[{self.freeze_after}, {2 * self.freeze_after}], no other delay"}
        return "; ".join(words[d] for d in self.delay_models) + \
            f"; every delay capped at {self.max_delay:g} s; delay seeds {self.seed} .. " \
            f"{self.seed + self.repeats - 1} (one realization per repeat, the same for every " \
            f"strategy)"


def strategy_code(name: str, m: int, k: int) -> tuple[CodeConfig, str | None]:
    """The code section of a strategy for m workers and k awaited, and the solver algorithm
    it forces (async)::

      uncoded-all   uncoded data, wait for all m workers (the synchronous baseline)
      uncoded-k     uncoded data, wait for the first k (ignore stragglers)
      async         uncoded data, each reply applied on arrival
      replication, gaussian, hadamard, etf, sparse   encoded data (beta = 2), first k
    """
    if name == "uncoded-all":
        return CodeConfig(encoder="uncoded", beta=1.0, workers=m, wait_for=m), None
    if name in ("uncoded-k", "async"):
        return CodeConfig(encoder="uncoded", beta=1.0, workers=m, wait_for=k), (
            "async" if name == "async" else None)
    return CodeConfig(encoder=name, beta=2.0, workers=m, wait_for=k), None


def require_responsive(result: Any) -> None:
    """A benchmark's next solve needs every worker: raise (the job aborts) naming the worker
    ranks that never acknowledged the end of this one (``result.unresponsive``; rank 0)."""
    if result is not None and result.unresponsive:
        raise RuntimeError(f"worker ranks {result.unresponsive} never acknowledged the end of a "
                           "solve (frozen or dead); the benchmark needs every worker")


def paired_speedups(base: list[float], times: list[float]) -> list[float]:
    """Per delay realization, time to eps of the baseline over that of the strategy (0 where
    the strategy never reached eps, inf where only the baseline never did; with simulated
    workers a time can be 0, before any injected delay: 1 when both are, inf when only the
    strategy's is)."""
    return [0.0 if not math.isfinite(t) else b / t if t > 0 else 1.0 if b == 0 else math.inf
            for b, t in zip(base, times, strict=True)]


def never_as_inf(value: float | None) -> float:
    """A time or count to eps, with "never reached" (None) as inf so medians rank it last."""
    return math.inf if value is None else value


def finite_median(values: list[float]) -> float | None:
    """The median, None where it is infinite (most realizations never got there)."""
    value = float(np.median(values))
    return value if math.isfinite(value) else None
