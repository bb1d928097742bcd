"""``hpcml bench coded``: time to epsilon of encoded optimization against the paper's baselines.

Each strategy's data are encoded and loaded by the workers once; then, for each delay model
(injected with ``comm.straggle``: a worker sleeps its delay before it computes, so a delay costs
no CPU and each worker behaves as its own node whatever the core count) and each of ``repeats``
delay realizations (seeds seed, seed + 1, ...), every strategy solves the same problem under the
same realization::

  uncoded-all   uncoded data, wait for all m workers (the synchronous baseline)
  uncoded-k     uncoded data, wait for the first k (ignore stragglers)
  replication   each partition on 2 workers, first k
  gaussian, hadamard, etf, sparse   encoded data (beta = 2), first k
  async         uncoded data, asynchronous updates (each reply applied on arrival)

The k-of-m strategies run once per k in ``wait_for``; k = m / beta = 2 of 4 is the most
stragglers a beta = 2 code tolerates with the k fastest still holding n encoded rows
(eta beta = 1). Delay model ``none`` measures the round cost without delays (compute and
messaging), the part the injected delays must dominate to model the paper's stragglers.
Reported per strategy, as medians over the realizations: time and iterations to reach
suboptimality (f - f*) / f* <= eps, seconds per round, final suboptimality and relative error
||w - w*|| / ||w*|| against the exact solution of the full problem, late replies discarded;
how many realizations reached eps; and the speedup over uncoded-all (per realization: the
per-round speedup times the ratio of iterations to eps), its median and range. Rank 0 is the
master, ranks 1..m the workers (``mpiexec -n 5``: m = 4); on one rank the workers are
simulated and times are virtual (injected delays only). Delay model ``fault`` is a real fault:
rank 1 freezes (SIGSTOP) once per solve for ``freeze`` seconds (see
:mod:`hpcml.comm.stragglers`). Also reported: the FWHT's encoding throughput against the
previous FWHT and memcpy of the same bytes (CPU time of one process), and the machine (cores,
load average) the run saw.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import numpy as np
import scipy.linalg
import threadpoolctl

from hpcml.bench.report import human_bytes, markdown_table, median, pyplot, save_figure
from hpcml.coded.config import CodeConfig, ProblemConfig, SolverConfig
from hpcml.coded.fwht import fwht, memory_passes
from hpcml.coded.job import check_hdf5, make_problem, validate_problem
from hpcml.coded.regime import (
    StragglerBenchConfig,
    finite_median,
    never_as_inf,
    paired_speedups,
    require_responsive,
    strategy_code,
)
from hpcml.coded.solver import encode, optimize
from hpcml.comm import make_delay_model
from hpcml.config import option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext

STRATEGIES = ("uncoded-all", "uncoded-k", "replication", "gaussian", "hadamard", "etf", "sparse",
              "async")
K_FREE = ("uncoded-all", "async")


@dataclasses.dataclass
class BenchCodedConfig(StragglerBenchConfig):
    problem: ProblemConfig = option(ProblemConfig(data="synthetic"))
    solver: SolverConfig = option(SolverConfig(iterations=80))
    strategies: list[str] = option(list(STRATEGIES), choices=STRATEGIES, nonempty=True,
                                    help="runs per model")
    wait_for: list[int] = option([0], min=0, help="k values for the k-of-m strategies "
                                 "(each one run); 0 = m - 1")
    async_step: float = option(0.5, gt=0.0, help="async: step in units of 1 / L (each reply "
                               "applies one worker's share, 1/m of the gradient)")
    eps: float = option(1e-2, gt=0.0, help="target suboptimality (f - f*) / f*")
    fwht_log2: list[int] = option([12, 16, 20], min=1, max=26,
                                  help="FWHT throughput: log2 of the transform lengths")
    fwht_columns: int = option(8, min=1, help="FWHT throughput: columns transformed at once")

    def check(self, size: int) -> None:
        check_hdf5(self.problem)
        if not self.wait_for:
            raise ConfigError("wait_for", "no k values", "give a list of k <= m, e.g. [2, 3]")
        self.check_strategies(size, self.strategies, max(self.wait_for))
        if self.problem.kind != "ridge" or self.solver.algorithm not in ("gd", "lbfgs"):
            raise ConfigError("solver.algorithm", "the benchmark compares data-parallel "
                              "solvers on ridge regression", "use problem.kind = 'ridge' and "
                              "solver.algorithm = 'gd' or 'lbfgs'")


def plan(strategies: list[str], ks: list[int]) -> list[tuple[str, int]]:
    """(strategy, k) runs per delay model: uncoded-all first, then every k-of-m strategy per
    k, then async (neither depends on k)."""
    first = [(s, 0) for s in strategies if s == "uncoded-all"]
    last = [(s, 0) for s in strategies if s == "async"]
    return first + [(s, k) for k in ks for s in strategies if s not in K_FREE] + last


def run(cfg: BenchCodedConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    m = CodeConfig(workers=cfg.workers).workers_for(comm.size)
    ks = list(dict.fromkeys(k or max(1, m - 1) for k in cfg.wait_for))
    load = os.getloadavg()[0]
    problem = make_problem(cfg.problem, cfg.seed) if comm.rank == 0 else None
    w_star = problem.exact() if problem is not None else None
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    curves = {}
    simulated = comm.size == 1
    models = [d for d in cfg.delay_models if not (simulated and d == "none")]
    if len(models) < len(cfg.delay_models):
        ctx.log("bench coded: delay model 'none' skipped: simulated rounds without delays "
                "take no virtual time")
    runs_plan = plan(cfg.strategies, ks)
    codes = {name: strategy_code(name, m, m) for name, _ in runs_plan}
    for encoder in dict.fromkeys(code.encoder for code, _ in codes.values()):
        enc = encode(comm, problem, next(c for c, _ in codes.values() if c.encoder == encoder),
                     False, ctx.run_dir.path / "shards", cfg.seed)
        for model in models:
            for rep in range(cfg.repeats):
                comm.set_delays(make_delay_model(cfg.delays(model, cfg.seed + rep),
                                                 max(comm.size, m + 1)))
                for name, k in runs_plan:
                    code, forced = codes[name]
                    if code.encoder != encoder:
                        continue
                    solver = dataclasses.replace(cfg.solver,
                                                 algorithm=forced or cfg.solver.algorithm,
                                                 step=cfg.async_step if forced else
                                                 cfg.solver.step)
                    res = optimize(comm, enc, solver, k or m, w_star)
                    require_responsive(res)
                    comm.barrier()
                    if res is None:
                        continue
                    runs.setdefault((model, name, k), []).append(_record(res, cfg.eps))
                    if rep == 0:
                        curves[(model, f"{name} k={k}" if k else name)] = (res.seconds,
                                                                           res.suboptimality)
                    ctx.log(f"  {model:<11} {name:<12} k={k or '-'} delay seed "
                            f"{cfg.seed + rep}: time to eps {_fmt(res.time_to(cfg.eps))} s, "
                            f"final subopt {res.suboptimality[-1]:.2e}")
    order = {key: i for i, key in enumerate((model, name, k) for model in models
                                            for name, k in runs_plan)}
    runs = dict(sorted(runs.items(), key=lambda item: order[item[0]]))
    curves = dict(sorted(curves.items(), key=lambda item: models.index(item[0][0])))
    rows = [_aggregate(model, name, None if name == "async" else (k or m), m, recs,
                       runs[(model, "uncoded-all", 0)])
            for (model, name, k), recs in runs.items()]
    summary: dict[str, Any] = {"rows": rows, "eps": cfg.eps, "workers": m, "wait_for": ks,
                               "repeats": cfg.repeats, "simulated": simulated,
                               "ranks": comm.size, "cores": os.cpu_count(),
                               "load_average_1min": load, "regime": cfg.regime()}
    if ctx.is_root:
        summary["fwht"] = fwht_throughput(cfg.fwht_log2, cfg.fwht_columns)
        _report(cfg, ctx, rows, curves, summary)
    return comm.bcast(summary)


def _record(res: Any, eps: float) -> dict[str, Any]:
    """One solve's numbers; time and iterations to eps are inf when eps is never reached."""
    t_eps, it_eps = res.time_to(eps), res.iterations_to(eps)
    return {"time_to_eps": never_as_inf(t_eps), "iters_to_eps": never_as_inf(it_eps),
            "round_s": res.seconds[-1] / len(res.seconds), "seconds": res.seconds[-1],
            "final_subopt": res.suboptimality[-1], "final_rel_err": res.relative_error[-1],
            "discarded": res.discarded}


def _aggregate(model: str, name: str, k: int | None, m: int, recs: list[dict[str, Any]],
               base: list[dict[str, Any]]) -> dict[str, Any]:
    """A table row: medians over the delay realizations (None where the median run never
    reached eps), how many reached eps, and the median and range of the speedup over
    uncoded-all paired by delay realization (None unless the baseline always reached eps and
    the strategy did in most realizations)."""
    speed = paired_speedups([b["time_to_eps"] for b in base], [r["time_to_eps"] for r in recs])
    finite = [s for s in speed if math.isfinite(s)]
    ok = finite and median(speed) > 0 and all(math.isfinite(b["time_to_eps"]) for b in base)
    row = {"delays": model, "strategy": name, "k": k, "m": m,
           "reached": f"{sum(math.isfinite(r['time_to_eps']) for r in recs)}/{len(recs)}",
           "speedup": median(speed) if ok else None,
           "speedup_range": f"{min(finite):.2f}-{max(finite):.2f}" if ok else None}
    for key in ("time_to_eps", "iters_to_eps", "round_s", "final_subopt", "final_rel_err",
                "seconds", "discarded"):
        row[key] = finite_median([r[key] for r in recs])
    return row


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.3f}"


def fwht_previous(x: np.ndarray) -> np.ndarray:
    """The FWHT hpcml shipped before the radix-16 schedule, kept as the peer of the throughput
    table: a 32-point base case as one batched 32 x 32 product, then one radix-2 butterfly
    pass over memory per remaining level (log2(n) - 4 passes)."""
    a = np.array(x, dtype=np.float64, copy=True)
    n = a.shape[0]
    flat = a.reshape(n, -1)
    base = min(n, 32)
    blocks = flat.reshape(n // base, base, flat.shape[1])
    blocks[...] = np.matmul(scipy.linalg.hadamard(base).astype(np.float64), blocks)
    h = base
    while h < n:
        view = flat.reshape(n // (2 * h), 2, h, flat.shape[1])
        top = view[:, 0].copy()
        view[:, 0] += view[:, 1]
        np.subtract(top, view[:, 1], out=view[:, 1])
        h *= 2
    return a


def fwht_throughput(log2_sizes: list[int], columns: int) -> list[dict]:
    """Median throughput (GB/s of input) of the FWHT, the previous FWHT and memcpy on
    (2^j, columns) float64 arrays (each method: one warm-up call, then 5 to 51 timed repeats,
    more for small arrays, as an encoder calls it over and over), all timed in CPU seconds of
    this process
    (``time.process_time``) with the BLAS pool limited to one thread (idle OpenBLAS threads
    spin and would be counted): the machine may be shared, and the CPU time of one core is
    what the transform costs whatever else runs."""
    with threadpoolctl.threadpool_limits(limits=1):
        return [_throughput(j, columns, max(5, min(51, (1 << 24) // ((1 << j) * columns))))
                for j in log2_sizes]


def _throughput(j: int, columns: int, repeats: int) -> dict[str, Any]:
    """One row of :func:`fwht_throughput`: transform length 2^j."""
    x = np.random.default_rng(j).standard_normal((1 << j, columns))
    dst = np.empty_like(x)
    times: dict[str, list[float]] = {"fwht": [], "previous": [], "memcpy": []}
    for name, call, args in (("fwht", fwht, (x,)), ("previous", fwht_previous, (x,)),
                             ("memcpy", np.copyto, (dst, x))):
        call(*args)
        for _ in range(repeats):
            start = time.process_time()
            call(*args)
            times[name].append(time.process_time() - start)
    sec = {name: max(median(ts), 1e-9) for name, ts in times.items()}
    gb = x.nbytes / 1e9
    return {"n": 1 << j, "bytes": x.nbytes, "size": human_bytes(x.nbytes),
            "fwht_GBs": gb / sec["fwht"], "previous_GBs": gb / sec["previous"],
            "memcpy_GBs": gb / sec["memcpy"], "speedup": sec["previous"] / sec["fwht"],
            "ratio": sec["memcpy"] / sec["fwht"], "passes": memory_passes(1 << j, columns),
            "previous_passes": max(0, j - 5) + 1}


def _report(cfg: BenchCodedConfig, ctx: RunContext, rows: list[dict[str, Any]],
            curves: dict, summary: dict[str, Any]) -> None:
    table = markdown_table(rows, [
        ("delays", "delays", ""), ("strategy", "strategy", ""), ("k", "k", "d"),
        ("m", "m", "d"), ("reached", "reached eps", ""),
        ("time_to_eps", f"time to eps={cfg.eps:g} (s)", ".3f"),
        ("iters_to_eps", "iters", "g"), ("round_s", "s/round", ".4f"),
        ("speedup", "speedup vs uncoded-all", ".2f"), ("speedup_range", "range", ""),
        ("final_subopt", "final subopt", ".2e"), ("final_rel_err", "final rel err", ".2e"),
        ("seconds", "run s", ".2f"), ("discarded", "late replies", "g")])
    fw = markdown_table(summary["fwht"], [
        ("n", "n", "d"), ("size", "size", ""), ("fwht_GBs", "FWHT GB/s", ".3f"),
        ("previous_GBs", "previous FWHT GB/s", ".3f"), ("speedup", "speedup", ".2f"),
        ("memcpy_GBs", "memcpy GB/s", ".2f"), ("ratio", "FWHT / memcpy", ".3f"),
        ("passes", "passes over memory", "d"), ("previous_passes", "previous", "d")])
    where = "simulated workers, virtual time" if summary["simulated"] else \
        f"1 master + {summary['workers']} workers on {summary['ranks']} ranks"
    head = (f"hpcml bench coded ({where}; machine: {summary['cores']} cores, load average "
            f"{summary['load_average_1min']:.1f} at start)\n\ndelays: {summary['regime']}\n"
            f"\nEach row: medians over {summary['repeats']} delay realizations; speedup = median "
            f"over realizations of uncoded-all's time to eps over the strategy's, range = its "
            f"min-max.\n")
    text = (f"{table}\n\nFWHT encoding throughput ({cfg.fwht_columns} columns; CPU time of one "
            f"process, medians of 5-51 repeats):\n\n{fw}\n")
    ctx.run_dir.write_text("table.md", f"{head}\n{text}")
    print(head, flush=True)
    print(text, flush=True)
    _plot(cfg, ctx, curves)


def _plot(cfg: BenchCodedConfig, ctx: RunContext, curves: dict) -> None:
    plt = pyplot()

    models = list(dict.fromkeys(model for model, _ in curves))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for (mod, name), (sec, sub) in curves.items():
            if mod == model:
                ax.plot(sec, np.maximum(sub, 1e-16), label=name,
                        linestyle="--" if name.startswith(("uncoded", "async")) else "-")
        ax.axhline(cfg.eps, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("(f(w) - f*) / f*")
        ax.set_title(f"{model} delays")
        ax.legend(fontsize=7)
    save_figure(fig, ctx.run_dir.path / "coded.png")


JOB = JobKind(config=BenchCodedConfig, run=run,
              description="encoded vs uncoded/replicated/async time to epsilon under stragglers",
              validate_data=lambda cfg, comm: validate_problem(cfg.problem, comm))
