"""``hpcml bench coded``: time to epsilon of encoded optimization against the paper's baselines.

For each delay model (default: exponential and Pareto, injected with ``comm.straggle``) and each
strategy, one solve of the same problem with the same delay realization:
  uncoded-all   uncoded data, wait for all m workers (the synchronous baseline)
  uncoded-k     uncoded data, wait for the first k (ignore stragglers)
  replication   each partition on 2 workers, first k
  gaussian, hadamard, etf, sparse   encoded data (beta = 2), first k
  async         uncoded data, asynchronous updates (each reply applied on arrival)
Reported per run: time and iterations to reach suboptimality (f - f*) / f* <= eps, final
suboptimality and relative error ||w - w*|| / ||w*|| against the exact solution of the full
problem, late replies discarded, and the speedup over uncoded-all. Rank 0 is the master,
ranks 1..m the workers (``mpiexec -n 5``: m = 4); on one rank the workers are simulated and
times are virtual (injected delays only). Also reported: the FWHT's encoding throughput against
memcpy of the same bytes on one core.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from hpcml.bench.report import human_bytes, markdown_table, median, save_figure
from hpcml.coded.config import CodeConfig, ProblemConfig, SolverConfig
from hpcml.coded.fwht import fwht
from hpcml.coded.job import check_hdf5, make_problem
from hpcml.coded.solver import solve
from hpcml.comm import StragglerConfig, make_delay_model
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext

STRATEGIES = ("uncoded-all", "uncoded-k", "replication", "gaussian", "hadamard", "etf", "sparse",
              "async")


@dataclasses.dataclass
class BenchCodedConfig(JobConfig):
    problem: ProblemConfig = option(ProblemConfig(data="synthetic"))
    solver: SolverConfig = option(SolverConfig(iterations=80))
    strategies: list[str] = option(list(STRATEGIES), choices=STRATEGIES, help="runs per model")
    delay_models: list[str] = option(["exponential", "pareto"],
                                     choices=("exponential", "pareto", "fixed"),
                                     help="straggler models to compare under")
    workers: int = option(0, min=0, help="m; 0 = ranks - 1 (4 on one rank, simulated)")
    wait_for: int = option(0, min=0, help="k for the k-of-m strategies; 0 = m - 1")
    mean: float = option(0.02, min=0.0, help="exponential: mean delay (s)")
    scale: float = option(0.005, min=0.0, help="pareto: minimum delay x_m (s)")
    shape: float = option(1.1, gt=0.0, help="pareto: tail index")
    slow_delay: float = option(0.05, min=0.0, help="fixed: delay of rank 1 (s)")
    max_delay: float = option(0.3, gt=0.0, help="cap on one injected delay (s)")
    async_step: float = option(0.5, gt=0.0, help="async: step in units of 1 / L (each reply "
                               "applies one worker's share, 1/m of the gradient)")
    eps: float = option(1e-2, gt=0.0, help="target suboptimality (f - f*) / f*")
    fwht_log2: list[int] = option([12, 16, 20], min=1, max=26,
                                  help="FWHT throughput: log2 of the transform lengths")
    fwht_columns: int = option(8, min=1, help="FWHT throughput: columns transformed at once")

    def check(self, size: int) -> None:
        check_hdf5(self.problem)
        base = CodeConfig(workers=self.workers)
        base.check(size, prefix="workers")
        m = base.workers_for(size)
        if self.wait_for > m:
            raise ConfigError("wait_for", f"k = {self.wait_for} > m = {m} workers",
                              "choose k <= m (m = ranks - 1)")
        if "replication" in self.strategies and m % 2:
            raise ConfigError("strategies", f"replication needs an even number of workers, "
                              f"m = {m}", "run with an odd number of ranks or drop it")
        if self.problem.kind != "ridge" or self.solver.algorithm not in ("gd", "lbfgs"):
            raise ConfigError("solver.algorithm", "the benchmark compares data-parallel "
                              "solvers on ridge regression", "use problem.kind = 'ridge' and "
                              "solver.algorithm = 'gd' or 'lbfgs'")


def strategy_code(name: str, m: int, k: int) -> tuple[CodeConfig, str | None]:
    """The code section of a strategy, and the solver algorithm it forces (async)."""
    if name == "uncoded-all":
        return CodeConfig(encoder="uncoded", beta=1.0, wait_for=m), None
    if name in ("uncoded-k", "async"):
        return CodeConfig(encoder="uncoded", beta=1.0, wait_for=k), (
            "async" if name == "async" else None)
    return CodeConfig(encoder=name, beta=2.0, wait_for=k), None


def delay_config(cfg: BenchCodedConfig, kind: str) -> StragglerConfig:
    return StragglerConfig(kind=kind, mean=cfg.mean, scale=cfg.scale, shape=cfg.shape,
                           slow_ranks=[1], delay=cfg.slow_delay, max_delay=cfg.max_delay,
                           seed=cfg.seed)


def run(cfg: BenchCodedConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    m = CodeConfig(workers=cfg.workers).workers_for(comm.size)
    k = cfg.wait_for or max(1, m - 1)
    problem = make_problem(cfg.problem, cfg.seed) if comm.rank == 0 else None
    w_star = problem.exact() if problem is not None else None
    rows, curves = [], {}
    for model in cfg.delay_models:
        comm.set_delays(make_delay_model(delay_config(cfg, model), max(comm.size, m + 1)))
        for name in cfg.strategies:
            code, forced = strategy_code(name, m, k)
            solver = dataclasses.replace(cfg.solver, algorithm=forced or cfg.solver.algorithm,
                                         step=cfg.async_step if forced else cfg.solver.step)
            res = solve(comm, problem, code, solver, ctx.run_dir.path / "shards", cfg.seed,
                        w_star)
            comm.barrier()
            if res is None:
                continue
            t_eps = res.time_to(cfg.eps)
            it_eps = None if t_eps is None else res.seconds.index(t_eps) + 1
            rows.append({"delays": model, "strategy": name, "k": code.wait_for or m, "m": m,
                         "time_to_eps": t_eps, "iters_to_eps": it_eps,
                         "final_subopt": res.suboptimality[-1],
                         "final_rel_err": res.relative_error[-1], "seconds": res.seconds[-1],
                         "discarded": res.discarded, "encode_s": res.encode_seconds})
            curves[(model, name)] = (res.seconds, res.suboptimality)
            ctx.log(f"  {model:<11} {name:<12} time to eps {_fmt(t_eps)} s, final subopt "
                    f"{res.suboptimality[-1]:.2e}, rel err {res.relative_error[-1]:.2e}")
    summary: dict[str, Any] = {"rows": rows, "eps": cfg.eps, "workers": m, "wait_for": k,
                               "simulated": comm.size == 1}
    if ctx.is_root:
        _speedups(rows)
        summary["fwht"] = fwht_throughput(cfg.fwht_log2, cfg.fwht_columns)
        _report(cfg, ctx, rows, curves, summary)
    return comm.bcast(summary)


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.3f}"


def _speedups(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        base = [r["time_to_eps"] for r in rows
                if r["delays"] == row["delays"] and r["strategy"] == "uncoded-all"]
        ok = base and base[0] is not None and row["time_to_eps"] is not None
        row["speedup"] = base[0] / row["time_to_eps"] if ok else None


def fwht_throughput(log2_sizes: list[int], columns: int, repeats: int = 5) -> list[dict]:
    """Median FWHT and memcpy throughput (GB/s of input) on (2^j, columns) float64 arrays."""
    out = []
    for j in log2_sizes:
        x = np.random.default_rng(j).standard_normal((1 << j, columns))
        dst = np.empty_like(x)
        t_fwht, t_copy = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            fwht(x)
            t_fwht.append(time.perf_counter() - start)
            start = time.perf_counter()
            np.copyto(dst, x)
            t_copy.append(time.perf_counter() - start)
        gb = x.nbytes / 1e9
        out.append({"n": 1 << j, "bytes": x.nbytes, "size": human_bytes(x.nbytes),
                    "fwht_GBs": gb / median(t_fwht), "memcpy_GBs": gb / median(t_copy),
                    "ratio": median(t_copy) / median(t_fwht), "passes": j})
    return out


def _report(cfg: BenchCodedConfig, ctx: RunContext, rows: list[dict[str, Any]],
            curves: dict, summary: dict[str, Any]) -> None:
    table = markdown_table(rows, [
        ("delays", "delays", ""), ("strategy", "strategy", ""), ("k", "k", "d"),
        ("m", "m", "d"), ("time_to_eps", f"time to eps={cfg.eps:g} (s)", ".3f"),
        ("iters_to_eps", "iters", "d"), ("speedup", "speedup vs uncoded-all", ".2f"),
        ("final_subopt", "final subopt", ".2e"), ("final_rel_err", "final rel err", ".2e"),
        ("seconds", "run s", ".2f"), ("discarded", "late replies", "d")])
    fw = markdown_table(summary["fwht"], [
        ("n", "n", "d"), ("size", "size", ""), ("fwht_GBs", "FWHT GB/s", ".3f"),
        ("memcpy_GBs", "memcpy GB/s", ".2f"), ("ratio", "FWHT / memcpy", ".3f"),
        ("passes", "log2 n passes", "d")])
    where = "simulated workers, virtual time" if summary["simulated"] else \
        f"1 master + {summary['workers']} workers"
    text = f"{table}\n\nFWHT encoding throughput (one core, {cfg.fwht_columns} columns):\n\n{fw}\n"
    ctx.run_dir.write_text("table.md", f"hpcml bench coded ({where})\n\n{text}")
    print(text, flush=True)
    _plot(cfg, ctx, curves)


def _plot(cfg: BenchCodedConfig, ctx: RunContext, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    plt.close(fig)


JOB = JobKind(config=BenchCodedConfig, run=run,
              description="encoded vs uncoded/replicated/async time to epsilon under stragglers")
