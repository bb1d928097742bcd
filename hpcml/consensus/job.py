"""``hpcml run jobs/consensus.toml``: one DP consensus run, one node per rank.

Collective over the world communicator. Builds the graph and W (identical on every rank), a
distributed-graph communicator, the task's local data, and the noise plan; runs
:func:`hpcml.consensus.algorithm.run_node`; logs the network MSE every ``log_every`` rounds
(metrics.jsonl); writes ``privacy.json`` (the privacy ledger: requested and spent budget,
per-round sensitivity, noise scale and cost) and ``graph.json`` (edges, W, spectral gap). With
``verify = true`` rank 0 also runs the single-process simulation and reports whether the
distributed iterates equal it exactly.

Preemption (SIGUSR1/SIGTERM, :mod:`hpcml.preemption`): every logged round's ``Allgather`` of the
iterates carries each rank's signal flag too, so the ranks agree to stop at a logged round at no
extra collective (within ``log_every`` rounds of the signal). The stopped run releases its
current iterates with that round's planned noise (:func:`~hpcml.consensus.algorithm.run_node`):
``privacy.json`` reports what rounds 0..t spent, the verification compares with the simulation
of those rounds, and the summary names ``stopped_by`` and ``rounds_done`` (status
``preempted``). A signal during the last logged interval lets the run finish.
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
from hpcml.jobs import JobKind, RunContext


@dataclasses.dataclass
class ConsensusConfig(JobConfig):
    graph: GraphConfig = option(GraphConfig())
    privacy: PrivacyConfig = option(PrivacyConfig())
    optim: OptimConfig = option(OptimConfig())
    log_every: int = option(1, min=1, help="rounds between MSE records in metrics.jsonl")
    verify: bool = option(True, help="compare with the single-process simulation on rank 0")
    stragglers: StragglerConfig = option(StragglerConfig())

    def check(self, size: int) -> None:
        self.privacy.check()
        build_graph(self.graph.kind, size, degree=self.graph.degree, p=self.graph.p,
                    seed=self.graph.seed, edges=self.graph.edges)


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
    """Collective: every rank's iterate, ``(size, d)`` on every rank."""
    out = np.empty(comm.size * x.size)
    comm.Allgather(np.ascontiguousarray(x, dtype=float), out)
    return out.reshape(comm.size, x.size)


def gather_states_and_flag(comm: Any, x: np.ndarray, flag: bool) -> tuple[np.ndarray, bool]:
    """Collective: (every rank's iterate ``(size, d)``, whether any rank's ``flag`` is set),
    both from one ``Allgather``."""
    rows = gather_states(comm, np.append(x, float(flag)))
    return rows[:, :-1], bool(rows[:, -1].any())


def _gap(task: Any, x: np.ndarray) -> float:
    return task.objective(x) - task.objective(task.optimum)


def run(cfg: ConsensusConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    adj, w, task, steps, plan = setup(cfg, comm.size)
    gap = spectral_gap(w)
    ctx.log(f"  {cfg.graph.kind} graph, {comm.size} nodes, {cfg.graph.mixing} weights, "
            f"spectral gap {gap:.4f}; task {task.name} (d = {task.dim}); "
            f"{plan.mechanism} noise for epsilon = {cfg.privacy.epsilon}")
    graph = graph_comm(comm, adj)
    history: list[float] = []
    rounds = len(steps)

    def observe(t: int, x: np.ndarray) -> bool:
        nonlocal rounds
        if t % cfg.log_every and t != len(steps):
            return False
        states, stop = gather_states_and_flag(comm, x, ctx.preemption.local)
        history.append(mse(states, task.optimum))
        if ctx.is_root:
            ctx.run_dir.log_metrics(round=t, mse=history[-1],
                                    objective_gap=_gap(task, states.mean(axis=0)))
        if stop and 0 < t < len(steps):  # run_node ends after this round
            rounds = t
        return stop

    x, released = run_node(graph, task, w, plan, steps, cfg.privacy.clip, cfg.seed,
                           observe=observe, straggle=comm.straggle)
    plan, stopped = plan.prefix(rounds), ctx.preemption.reason() if rounds < len(steps) else None
    final, out = gather_states(comm, x), gather_states(comm, released)
    summary = {"nodes": comm.size, "graph": cfg.graph.kind, "spectral_gap": gap,
               "task": task.name, "mse_final": mse(final, task.optimum),
               "mse_released": mse(out, task.optimum), "mse_start": history[0],
               "objective_gap_start": _gap(task, np.zeros(task.dim)),
               "objective_gap_released": _gap(task, out.mean(axis=0)),
               "privacy": plan.spent(), "rounds_done": rounds, "stopped_by": stopped}
    if cfg.verify and ctx.is_root:
        ref = simulate(task, w, plan, steps[:rounds], cfg.privacy.clip, cfg.seed)
        summary["matches_simulation"] = bool(np.array_equal(ref.states[-1], final)
                                             and np.array_equal(ref.released, out))
    if ctx.is_root:
        ctx.run_dir.write_json("privacy.json", plan.ledger())
        ctx.run_dir.write_json("graph.json", {"kind": cfg.graph.kind, "spectral_gap": gap,
                                              "edges": np.argwhere(np.triu(adj)).tolist(),
                                              "mixing": w})
        spent = plan.spent()
        ctx.log(f"  MSE start {history[0]:.4g} -> iterates {summary['mse_final']:.4g}, released "
                f"{summary['mse_released']:.4g}; objective gap f(mean released) - f* "
                f"{summary['objective_gap_start']:.4g} -> {summary['objective_gap_released']:.4g}"
                f"; epsilon spent {spent['epsilon']:.4g} (delta {spent['delta']:g})"
                + (f"; stopped by {stopped} after {rounds} of {len(steps)} rounds"
                   if stopped else ""))
    return summary


JOB = JobKind(config=ConsensusConfig, run=run,
              description="differentially private consensus optimization over a rank graph")
