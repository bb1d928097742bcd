"""``hpcml bench consensus``: accuracy of DP consensus against its privacy budget, per graph.

Runs mean estimation (the numerical study of the paper) with one node per rank, for every node
count of ``ranks`` (the first p ranks of the launch, split off as a sub-communicator; default:
all of them), on every graph of ``graphs`` and for every budget of ``epsilons``, ``trials``
times with independent noise, over the real distributed-graph communicator. Reported per (node
count, graph, epsilon): the measured mean MSE of the released estimates and of the iterates,
the closed-form expected MSE of :mod:`hpcml.consensus.theory` (exact while the clip is
inactive), their ratio, the epsilon spent by the ledger, and, with ``privacy.noise =
"reproducible"``, whether the MPI iterates equal the single-process simulation exactly (secret
noise cannot be redrawn: the column then says so). The figure shows, per node count, MSE vs
round at ``epsilon`` and released MSE vs epsilon, with theory dashed.

The benchmark is an evaluation: it gathers every node's true iterate to score it, so its runs
are never private (``"private": false`` in summary.json, with the reasons).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hpcml.bench.report import markdown_table, pyplot, save_figure
from hpcml.comm import Communicator
from hpcml.config import JobConfig, option
from hpcml.consensus.accounting import plan_noise
from hpcml.consensus.algorithm import graph_comm, mse, run_node, simulate, step_sizes
from hpcml.consensus.config import GraphConfig, OptimConfig, PrivacyConfig
from hpcml.consensus.job import gather_states
from hpcml.consensus.mixing import mixing_matrix, spectral_gap
from hpcml.consensus.tasks import load_task
from hpcml.consensus.theory import expected_mse
from hpcml.consensus.topology import GRAPHS, build_graph
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.privacy.noise import node_rngs, noise_rng, privacy_status, reproducible_reason


@dataclasses.dataclass
class ConsensusBenchConfig(JobConfig):
    graphs: list[str] = option(["ring", "torus", "complete", "erdos_renyi"], choices=GRAPHS,
                               nonempty=True, help="graphs to compare")
    epsilons: list[float] = option([1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0], gt=0.0,
                                   nonempty=True,
                                   help="privacy budgets of the MSE-vs-epsilon curve")
    epsilon: float = option(100.0, gt=0.0, help="budget of the MSE-vs-round curve (one of "
                                                "epsilons)")
    trials: int = option(5, min=1, help="independent noise draws per point")
    ranks: list[int] = option([], min=1, help="node counts to run (each <= the launch size); "
                                              "empty = the launch size")
    graph: GraphConfig = option(GraphConfig())
    privacy: PrivacyConfig = option(PrivacyConfig(clip=0.5))
    optim: OptimConfig = option(OptimConfig(rounds=20))

    def check(self, size: int) -> None:
        if self.epsilon not in self.epsilons:
            raise ConfigError("epsilon", f"{self.epsilon} is not in epsilons {self.epsilons}",
                              "add it to epsilons")
        if self.privacy.mechanism == "none":
            raise ConfigError("privacy.mechanism", "the benchmark sweeps epsilon",
                              "use gaussian or laplace")
        PrivacyConfig(self.privacy.mechanism, min(self.epsilons), self.privacy.delta).check()
        if self.optim.task != "mean":
            raise ConfigError("optim.task", "the closed-form theory covers mean estimation only",
                              "set optim.task = \"mean\"")
        too_many = [p for p in self.ranks if p > size]
        if too_many:
            raise ConfigError("ranks", f"{too_many} exceed the {size} ranks launched",
                              f"use node counts <= {size} or launch more ranks")
        g = self.graph
        for nodes in self.ranks or [size]:
            for kind in self.graphs:
                build_graph(kind, nodes, degree=g.degree, p=g.p, seed=g.seed, edges=g.edges)


def _measure(ctx: RunContext, comm: Communicator, cfg: ConsensusBenchConfig,
             kind: str) -> list[dict[str, Any]]:
    """Collective over ``comm`` (one node per rank); the rows are complete on its rank 0."""
    n, g, o = comm.size, cfg.graph, cfg.optim
    adj = build_graph(kind, n, degree=g.degree, p=g.p, seed=g.seed, edges=g.edges)
    w = mixing_matrix(adj, g.mixing)
    task = load_task(o.task, n, o.lam)
    thetas = np.stack([-task.grad(i, np.zeros(task.dim)) for i in range(n)])
    steps = step_sizes(o.alpha, o.decay, o.rounds)
    graph = graph_comm(comm, adj)
    rows = []
    for eps in cfg.epsilons:
        plan = plan_noise(cfg.privacy.mechanism, eps, cfg.privacy.delta, steps, cfg.privacy.clip,
                          task.dim)
        curves, finals, releases = [], [], []
        match: bool | None = True if cfg.privacy.noise == "reproducible" else None
        for trial in range(cfg.trials):
            seed = cfg.seed + 1000 * trial
            curve: list[float] = []
            x, rel = run_node(graph, task, w, plan, steps, cfg.privacy.clip,
                              noise_rng(cfg.privacy.noise, seed, comm.rank),
                              observe=lambda t, x, m, out=curve: out.append(
                                  mse(gather_states(comm, x), task.optimum)))
            final, released = gather_states(comm, x), gather_states(comm, rel)
            curves.append(curve)
            finals.append(mse(final, task.optimum))
            releases.append(mse(released, task.optimum))
            if comm.rank == 0 and match is not None:
                ref = simulate(task, w, plan, steps, cfg.privacy.clip,
                               node_rngs("reproducible", seed, n))
                match &= bool(np.array_equal(ref.states[-1], final)
                              and np.array_equal(ref.released, released))
        theory_curve, theory_released = expected_mse(w, thetas, steps, plan)
        released_mean = float(np.mean(releases))
        rows.append({"graph": kind, "nodes": n, "gap": spectral_gap(w), "epsilon": eps,
                     "epsilon_spent": plan.spent()["epsilon"], "mse_released": released_mean,
                     "mse_iterates": float(np.mean(finals)), "theory_released": theory_released,
                     "ratio": released_mean / theory_released,
                     "curve": np.mean(curves, axis=0).tolist(),
                     "theory_curve": theory_curve.tolist(), "matches_simulation": match})
    ctx.log(f"  {kind:<12} on {n} ranks done")
    return rows


def run(cfg: ConsensusBenchConfig, ctx: RunContext) -> dict[str, Any]:
    comm, rows = ctx.comm, []
    for nodes in cfg.ranks or [comm.size]:
        sub = comm.split(0 if comm.rank < nodes else 1, name=f"nodes{nodes}")
        if comm.rank < nodes:
            rows += [r for kind in cfg.graphs for r in _measure(ctx, sub, cfg, kind)]
        comm.barrier()
    if not ctx.is_root:
        return {}  # the rows are complete on rank 0, which writes the summary
    checked = cfg.privacy.noise == "reproducible"
    status, line = privacy_status(
        ["benchmark: every node's true iterate is gathered to score it (an evaluation)",
         *reproducible_reason(cfg.privacy.noise, cfg.seed)])
    summary = {"rows": rows, **status, "noise": cfg.privacy.noise,
               "mpi_equals_simulation": (all(r["matches_simulation"] for r in rows)
                                         if checked else None),
               "start_mse": rows[0]["curve"][0]}
    for r in rows:
        r["same"] = ("not checked (secret noise)" if r["matches_simulation"] is None
                     else "yes" if r["matches_simulation"] else "NO")
    table = markdown_table(rows, [
        ("graph", "graph", ""), ("nodes", "ranks", "d"), ("gap", "spectral gap", ".3f"),
        ("epsilon", "epsilon", "g"), ("epsilon_spent", "epsilon spent", ".4g"),
        ("mse_released", "MSE released", ".4g"), ("mse_iterates", "MSE iterates", ".4g"),
        ("theory_released", "E[MSE] theory", ".4g"), ("ratio", "measured/theory", ".3f"),
        ("same", "MPI = simulation", "")])
    ctx.run_dir.write_text("table.md", table + "\n")
    print(table)
    print(f"\nMSE at start (x = 0): {summary['start_mse']:.4g}; {cfg.optim.rounds} rounds, "
          f"{cfg.privacy.mechanism} noise, clip {cfg.privacy.clip}, delta "
          f"{cfg.privacy.delta:g}, {cfg.trials} trials, node counts "
          f"{sorted({r['nodes'] for r in rows})} of {ctx.comm.size} ranks launched\n{line}")
    _plot(rows, cfg, ctx)
    return summary


def _plot(rows: list[dict[str, Any]], cfg: ConsensusBenchConfig, ctx: RunContext) -> None:
    plt = pyplot()

    sizes = list(dict.fromkeys(r["nodes"] for r in rows))
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 4.2 * len(sizes)), squeeze=False)
    for (left, right), nodes in zip(axes, sizes, strict=True):
        for i, kind in enumerate(cfg.graphs):
            color = f"C{i}"
            sel = [r for r in rows if r["graph"] == kind and r["nodes"] == nodes]
            at = next(r for r in sel if r["epsilon"] == cfg.epsilon)
            left.plot(at["curve"], "-", color=color, label=f"{kind} measured")
            left.plot(at["theory_curve"], "--", color=color, label=f"{kind} theory (no clip)")
            eps = [r["epsilon"] for r in sel]
            right.plot(eps, [r["mse_released"] for r in sel], "o-", color=color,
                       label=f"{kind} measured")
            right.plot(eps, [r["theory_released"] for r in sel], "--", color=color,
                       label=f"{kind} theory (no clip)")
        left.set(yscale="log", xlabel="round t", ylabel="MSE of iterates",
                 title=f"MSE vs rounds, epsilon = {cfg.epsilon:g}, {nodes} ranks")
        right.set(xscale="log", yscale="log", xlabel="epsilon (whole run)",
                  ylabel="MSE of released estimate",
                  title=f"MSE vs epsilon, delta = {cfg.privacy.delta:g}, {nodes} ranks")
        for ax in (left, right):
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir.path / "consensus.png")


JOB = JobKind(config=ConsensusBenchConfig, run=run,
              description="DP consensus: MSE vs rounds and vs epsilon per graph, with theory")
