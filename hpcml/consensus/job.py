"""``hpcml run jobs/consensus.toml``: one DP consensus run, one node per rank.

Collective over the world communicator. Builds the graph and W (identical on every rank), a
distributed-graph communicator, the task's local data, and the noise plan; runs
:func:`hpcml.consensus.algorithm.run_node` with node i's noise from
:func:`hpcml.privacy.noise.noise_rng` (secret OS entropy unless ``privacy.noise =
"reproducible"``); logs the MSE every ``log_every`` rounds (metrics.jsonl); writes
``privacy.json`` (the privacy ledger: requested and spent budget, per-round sensitivity, noise
scale and cost) and ``graph.json`` (edges, W, spectral gap).

Privacy boundary. With ``metrics = "released"`` (default) the metrics score the round's noised
messages ``x_i^t + n_i^t``: at each logged round every rank contributes its message, which the
accountant already charges for, to one ``Allgather``, so no true iterate leaves its rank. With
``metrics = "evaluation"`` the true iterates are gathered instead (outside the guarantee). The
run is private (``"private": true`` in summary.json and on the console) only with secret noise,
released metrics and a noise mechanism; otherwise the summary lists why not. With ``verify =
true`` (needs reproducible noise) rank 0 also runs the single-process simulation and reports
whether every gathered value and the release equal it exactly.

Preemption (SIGUSR1/SIGTERM, :mod:`hpcml.preemption`): every logged round's ``Allgather``
carries each rank's signal flag (one float64) too, so the ranks agree to stop at a logged round
at no extra collective (within ``log_every`` rounds of the signal). The stopped run releases
its round-t message, which carries that round's planned noise
(:func:`~hpcml.consensus.algorithm.run_node`): ``privacy.json`` reports what rounds 0..t spent,
the verification compares with the simulation of those rounds, and the summary names
``stopped_by`` and ``rounds_done`` (status ``preempted``). A signal during the last logged
interval lets the run finish.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hpcml.comm import StragglerConfig
from hpcml.config import JobConfig, option
from hpcml.consensus.accounting import plan_noise
from hpcml.consensus.algorithm import graph_comm, mse, run_node, simulate, step_sizes
from hpcml.consensus.config import GraphConfig, OptimConfig, PrivacyConfig
from hpcml.consensus.mixing import mixing_matrix, spectral_gap
from hpcml.consensus.tasks import load_task
from hpcml.consensus.topology import build_graph
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.privacy.noise import node_rngs, noise_rng, privacy_status, reproducible_reason

METRICS = ("released", "evaluation")


@dataclasses.dataclass
class ConsensusConfig(JobConfig):
    graph: GraphConfig = option(GraphConfig())
    privacy: PrivacyConfig = option(PrivacyConfig())
    optim: OptimConfig = option(OptimConfig())
    log_every: int = option(1, min=1, help="rounds between MSE records in metrics.jsonl")
    metrics: str = option("released", choices=METRICS,
                          help="released: score the noised messages (private); evaluation: "
                               "gather and score every node's true iterate (outside the "
                               "guarantee: the run is not private)")
    verify: bool = option(False, help="compare with the single-process simulation on rank 0 "
                                      "(needs privacy.noise = \"reproducible\")")
    stragglers: StragglerConfig = option(StragglerConfig())

    def check(self, size: int) -> None:
        self.privacy.check()
        if self.verify and self.privacy.noise == "secret" and self.privacy.mechanism != "none":
            raise ConfigError("verify", "the simulation must redraw every node's noise, which "
                              "a private run keeps secret", "set privacy.noise = "
                              "\"reproducible\" (the run is then not private) or verify = false")
        build_graph(self.graph.kind, size, degree=self.graph.degree, p=self.graph.p,
                    seed=self.graph.seed, edges=self.graph.edges)

    def not_private_because(self) -> list[str]:
        """Why this run gives no privacy guarantee; empty for a private run."""
        reasons = (["privacy.mechanism = \"none\": the messages carry no noise"]
                   if self.privacy.mechanism == "none"
                   else reproducible_reason(self.privacy.noise, self.seed))
        if self.metrics == "evaluation":
            reasons.append("metrics = \"evaluation\": every node's true iterate is gathered "
                           "to every rank and written to metrics.jsonl and summary.json")
        return reasons


def setup(cfg: Any, nodes: int) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray, Any]:
    """(adjacency, W, task, step sizes, noise plan) for ``nodes`` nodes; pure, same on all
    ranks."""
    g, o, p = cfg.graph, cfg.optim, cfg.privacy
    adj = build_graph(g.kind, nodes, degree=g.degree, p=g.p, seed=g.seed, edges=g.edges)
    w = mixing_matrix(adj, g.mixing)
    task = load_task(o.task, nodes, o.lam)
    steps = step_sizes(o.alpha, o.decay, o.rounds)
    plan = plan_noise(p.mechanism, p.epsilon, p.delta, steps, p.clip, task.dim)
    return adj, w, task, steps, plan


def gather_states(comm: Any, x: np.ndarray) -> np.ndarray:
    """Collective: every rank's vector ``x`` (same size everywhere), ``(size, d)`` on every
    rank."""
    out = np.empty(comm.size * x.size)
    comm.Allgather(np.ascontiguousarray(x, dtype=float), out)
    return out.reshape(comm.size, x.size)


def gather_states_and_flag(comm: Any, x: np.ndarray, flag: bool) -> tuple[np.ndarray, bool]:
    """Collective: (every rank's ``x`` ``(size, d)``, whether any rank's ``flag`` is set),
    both from one ``Allgather`` of ``d + 1`` float64 per rank."""
    rows = gather_states(comm, np.append(x, float(flag)))
    return rows[:, :-1], bool(rows[:, -1].any())


def _gap(task: Any, x: np.ndarray) -> float:
    return task.objective(x) - task.objective(task.optimum)


def run(cfg: ConsensusConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    adj, w, task, steps, plan = setup(cfg, comm.size)
    gap = spectral_gap(w)
    status, line = privacy_status(cfg.not_private_because())
    evaluation = cfg.metrics == "evaluation"
    ctx.log(f"  {cfg.graph.kind} graph, {comm.size} nodes, {cfg.graph.mixing} weights, "
            f"spectral gap {gap:.4f}; task {task.name} (d = {task.dim}); "
            f"{plan.mechanism} noise for epsilon = {cfg.privacy.epsilon}")
    ctx.log(line + ("; metrics score the released (noised) messages" if status["private"]
                    else ""))
    graph = graph_comm(comm, adj)
    logged: list[tuple[int, np.ndarray]] = []  # (round, gathered rows): first, last, verify
    rounds = len(steps)

    def observe(t: int, x: np.ndarray, msg: np.ndarray) -> bool:
        nonlocal rounds
        if t % cfg.log_every and t != len(steps):
            return False
        rows, stop = gather_states_and_flag(comm, x if evaluation else msg,
                                            ctx.preemption.local)
        stop = stop and 0 < t < len(steps)  # run_node ends after this round
        if cfg.verify or len(logged) < 2:
            logged.append((t, rows))
        else:
            logged[-1] = (t, rows)
        if ctx.is_root:
            ctx.run_dir.log_metrics(round=t, mse=mse(rows, task.optimum),
                                    objective_gap=_gap(task, rows.mean(axis=0)))
        if stop:
            rounds = t
        return stop

    x, released = run_node(graph, task, w, plan, steps, cfg.privacy.clip,
                           noise_rng(cfg.privacy.noise, cfg.seed, comm.rank),
                           observe=observe, straggle=comm.straggle)
    plan, stopped = plan.prefix(rounds), ctx.preemption.reason() if rounds < len(steps) else None
    # the last logged round is round `rounds`: its rows are the releases (released metrics) or
    # the final iterates (evaluation, which gathers the releases too)
    out = gather_states(comm, released) if evaluation else logged[-1][1]
    summary = {"nodes": comm.size, "graph": cfg.graph.kind, "spectral_gap": gap,
               "task": task.name, **status, "noise": cfg.privacy.noise,
               "metrics_of": "true iterates x_i^t" if evaluation
               else "released messages x_i^t + n_i^t",
               "mse_start": mse(logged[0][1], task.optimum),
               "mse_released": mse(out, task.optimum),
               "objective_gap_start": _gap(task, np.zeros(task.dim)),
               "objective_gap_released": _gap(task, out.mean(axis=0)),
               "privacy": plan.spent(), "rounds_done": rounds, "stopped_by": stopped}
    if evaluation:
        summary["mse_final"] = mse(logged[-1][1], task.optimum)
    if cfg.verify and ctx.is_root:
        ref = simulate(task, w, plan, steps[:rounds], cfg.privacy.clip,
                       node_rngs("reproducible", cfg.seed, comm.size))
        expect = ref.states if evaluation else ref.states + ref.noise
        summary["matches_simulation"] = bool(
            all(np.array_equal(expect[t], rows) for t, rows in logged)
            and np.array_equal(ref.released, out))
    if ctx.is_root:
        ctx.run_dir.write_json("privacy.json", plan.ledger())
        ctx.run_dir.write_json("graph.json", {"kind": cfg.graph.kind, "spectral_gap": gap,
                                              "edges": np.argwhere(np.triu(adj)).tolist(),
                                              "mixing": w})
        spent = plan.spent()
        iterates = f"iterates {summary['mse_final']:.4g}, " if evaluation else ""
        ctx.log(f"  MSE start {summary['mse_start']:.4g} -> {iterates}released "
                f"{summary['mse_released']:.4g}; objective gap f(mean released) - f* "
                f"{summary['objective_gap_start']:.4g} -> {summary['objective_gap_released']:.4g}"
                f"; epsilon spent {spent['epsilon']:.4g} (delta {spent['delta']:g})"
                + (f"; stopped by {stopped} after {rounds} of {len(steps)} rounds"
                   if stopped else ""))
    return summary


JOB = JobKind(config=ConsensusConfig, run=run,
              description="differentially private consensus optimization over a rank graph")
