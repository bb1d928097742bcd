"""``hpcml bench cf``: encoded collaborative filtering against uncoded baselines under stragglers.

For each delay model (injected with ``comm.straggle``, seeded, so every strategy meets the same
delay realization) and each strategy, one run of :func:`hpcml.coded.mf.solve_cf` on the same
ratings from the same initialization::

  uncoded-all   uncoded data, wait for all m workers (the synchronous baseline)
  uncoded-k     uncoded data, wait for the first k (ignore stragglers)
  replication, gaussian, hadamard, etf, sparse   per-user/per-item codes (beta = 2), first k

Reported per run: time to suboptimality (f - f_ref) / f_ref <= eps for each eps (f_ref: exact
ALS on the full training data to convergence, computed once), the speedup over uncoded-all
(its time to the same eps / the strategy's; "-" where either never got there), seconds per
round, the final signed suboptimality, the final test RMSE against exact ALS's, and late
replies discarded. Rank 0 is the master, ranks 1..m the workers (``mpiexec -n 5``: m = 4); on
one rank the workers are simulated and times are virtual (injected delays only). Writes
table.md and cf.png (``|suboptimality|`` and test RMSE against time) into the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from hpcml.bench.report import markdown_table, pyplot, save_figure
from hpcml.coded.config import CodeConfig, ProblemConfig, SolverConfig, check_problem
from hpcml.coded.mf import load_ratings, reference, solve_cf
from hpcml.coded.regime import (
    StragglerBenchConfig,
    finite_median,
    never_as_inf,
    paired_speedups,
    require_responsive,
    strategy_code,
)
from hpcml.comm import make_delay_model
from hpcml.config import option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext

STRATEGIES = ("uncoded-all", "uncoded-k", "replication", "gaussian", "hadamard", "etf", "sparse")


@dataclasses.dataclass
class BenchCFConfig(StragglerBenchConfig):
    problem: ProblemConfig = option(ProblemConfig(kind="mf", data="synthetic", n=2000, p=500,
                                                  lam=3e-5))
    solver: SolverConfig = option(SolverConfig(algorithm="als", iterations=15, inner=10))
    strategies: list[str] = option(["uncoded-all", "uncoded-k", "etf", "hadamard"],
                                   choices=STRATEGIES, nonempty=True, help="runs per delay model")
    wait_for: int = option(0, min=0, help="k of the k-of-m strategies; 0 = m - 1")
    eps: list[float] = option([5e-2, 1e-2], gt=0.0, nonempty=True, help="target suboptimalities "
                              "(f - f_ref) / f_ref, each timed")

    def check(self, size: int) -> None:
        if self.problem.kind != "mf":
            raise ConfigError("problem.kind", f"bench cf runs collaborative filtering, not "
                              f"{self.problem.kind!r}", "set problem.kind = 'mf'")
        check_problem(self.problem)
        if not self.eps:
            raise ConfigError("eps", "no target suboptimality", "give e.g. [0.05, 0.01]")
        self.check_strategies(size, self.strategies, self.wait_for)


def run(cfg: BenchCFConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    m = CodeConfig(workers=cfg.workers).workers_for(comm.size)
    k = cfg.wait_for or max(1, m - 1)
    load = os.getloadavg()[0]
    train, test = load_ratings(cfg.problem, cfg.seed) if comm.rank == 0 else (None, None)
    rank, lam = cfg.problem.rank, cfg.problem.lam
    ref = reference(train, test, rank, lam, cfg.seed) if train is not None else None
    simulated = comm.size == 1
    models = [d for d in cfg.delay_models if not (simulated and d == "none")]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    curves = {}
    for model in models:
        for rep in range(cfg.repeats):
            comm.set_delays(make_delay_model(cfg.delays(model, cfg.seed + rep),
                                             max(comm.size, m + 1)))
            for name in cfg.strategies:
                code, _ = strategy_code(name, m, k)
                res = solve_cf(comm, train, test, code, rank, lam, cfg.solver.iterations,
                               cfg.solver.inner, cfg.solver.step, ctx.run_dir.path / "shards",
                               cfg.seed, ref)
                require_responsive(res)
                comm.barrier()
                if res is None:
                    continue
                record = {**{e: never_as_inf(res.time_to(e)) for e in cfg.eps},
                          "round_s": res.seconds[-1] / len(res.seconds),
                          "final_subopt": res.suboptimality[-1], "test_rmse": res.test_rmse[-1],
                          "seconds": res.seconds[-1], "discarded": res.discarded}
                runs.setdefault((model, name), []).append(record)
                if rep == 0:
                    curves[(model, name)] = (res.seconds, res.suboptimality, res.test_rmse)
                times = ", ".join(f"{_fmt(res.time_to(e))} s to {e:g}" for e in cfg.eps)
                ctx.log(f"  {model:<11} {name:<12} k={code.wait_for} delay seed "
                        f"{cfg.seed + rep}: {times}, final subopt "
                        f"{res.suboptimality[-1]:+.2e}, test RMSE {res.test_rmse[-1]:.4f}")
    rows = [_row(cfg, model, name, m, m if name == "uncoded-all" else k, recs,
                 runs[(model, "uncoded-all")], ref)
            for (model, name), recs in runs.items()]
    summary: dict[str, Any] = {"rows": rows, "eps": cfg.eps, "workers": m, "wait_for": k,
                               "repeats": cfg.repeats, "simulated": simulated,
                               "ranks": comm.size, "cores": os.cpu_count(),
                               "load_average_1min": load, "regime": cfg.regime(),
                               "reference": ref}
    if ctx.is_root:
        _report(cfg, ctx, rows, curves, summary)
    return comm.bcast(summary)


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.3f}"


def _row(cfg: BenchCFConfig, model: str, name: str, m: int, k: int,
         recs: list[dict[str, Any]], base: list[dict[str, Any]],
         ref: dict[str, Any] | None) -> dict[str, Any]:
    """Medians over the delay realizations; speedup_<eps> = median over realizations of
    uncoded-all's time to eps over the strategy's (None unless uncoded-all always got there
    and the strategy did in most realizations)."""
    row: dict[str, Any] = {"delays": model, "strategy": name, "k": k, "m": m,
                           "ref_test_rmse": ref["test_rmse"] if ref else None}
    for e in cfg.eps:
        row[f"time_to_{e:g}"] = finite_median([r[e] for r in recs])
        speed = paired_speedups([b[e] for b in base], [r[e] for r in recs])
        ok = all(math.isfinite(b[e]) for b in base) and float(np.median(speed)) > 0
        row[f"speedup_{e:g}"] = float(np.median(speed)) if ok else None
    for key in ("round_s", "final_subopt", "test_rmse", "seconds", "discarded"):
        row[key] = float(np.median([r[key] for r in recs]))
    return row


def _report(cfg: BenchCFConfig, ctx: RunContext, rows: list[dict[str, Any]], curves: dict,
            summary: dict[str, Any]) -> None:
    table = markdown_table(rows, [
        ("delays", "delays", ""), ("strategy", "strategy", ""), ("k", "k", "d"),
        ("m", "m", "d"),
        *[col for e in cfg.eps for col in ((f"time_to_{e:g}", f"time to {e:g} (s)", ".3f"),
                                           (f"speedup_{e:g}", "speedup", ".2f"))],
        ("round_s", "s/round", ".4f"),
        ("final_subopt", "final subopt", "+.2e"), ("test_rmse", "test RMSE", ".4f"),
        ("ref_test_rmse", "exact ALS test RMSE", ".4f"), ("seconds", "run s", ".2f"),
        ("discarded", "late replies", "g")])
    where = "simulated workers, virtual time" if summary["simulated"] else \
        f"1 master + {summary['workers']} workers on {summary['ranks']} ranks"
    p = cfg.problem
    data = (f"{p.n} users x {p.p} items, density {p.density:g}" if p.data == "synthetic" else
            f"digits 1797 x 64, {p.observed:g} observed")
    head = (f"hpcml bench cf ({where}; machine: {summary['cores']} cores, load average "
            f"{summary['load_average_1min']:.1f} at start)\n\n{data}, rank {p.rank}, lam "
            f"{p.lam:g}, {cfg.solver.iterations} sweeps x {cfg.solver.inner} steps per half "
            f"step; suboptimality is signed (non-convex: a run may stop at another stationary "
            f"point than exact ALS)\n\ndelays: {summary['regime']}\n\nEach row: medians over "
            f"{summary['repeats']} delay realizations; speedup = median over realizations of "
            f"uncoded-all's time to eps over the strategy's.\n")
    ctx.run_dir.write_text("table.md", f"{head}\n{table}\n")
    print(head, flush=True)
    print(table, flush=True)
    _plot(cfg, ctx, curves, summary["simulated"])


def _plot(cfg: BenchCFConfig, ctx: RunContext, curves: dict, simulated: bool) -> None:
    plt = pyplot()
    models = list(dict.fromkeys(model for model, _ in curves))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        for (mod, name), (sec, sub, test_rmse) in curves.items():
            if mod == model:
                style = "--" if name.startswith("uncoded") else "-"
                top.plot(sec, np.maximum(np.abs(sub), 1e-16), label=name, linestyle=style)
                bottom.plot(sec, test_rmse, label=name, linestyle=style)
        for e in cfg.eps:
            top.axhline(e, color="grey", linewidth=0.8)
        top.set_yscale("log")
        top.set_ylabel("|f - f_ref| / f_ref")
        top.set_title(f"{model} delays")
        bottom.set_ylabel("test RMSE")
        bottom.set_xlabel("virtual time (s, injected delays)" if simulated else "wall time (s)")
        top.legend(fontsize=7)
    save_figure(fig, ctx.run_dir.path / "cf.png")


JOB = JobKind(config=BenchCFConfig, run=run,
              description="encoded collaborative filtering vs uncoded baselines under stragglers")
