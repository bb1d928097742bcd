"""``hpcml run jobs/coded.toml`` (kind ``coded``): one encoded solve with stragglers as erasures.

Launch with 1 rank (workers simulated with a virtual clock) or ``mpiexec -n M+1`` (rank 0 is the
master, ranks 1..M the workers). Writes ``trace.jsonl``-style metrics (one record per iteration:
seconds, suboptimality, relative error) and a summary with the final errors.

Preemption (SIGUSR1/SIGTERM, :mod:`hpcml.preemption`): the master checks its own signal flag
after every iteration (no communication) and ends the solve through the runtime's stop message
(a frozen worker is left behind after ``solver.close_timeout``); the metrics and summary then
cover the iterations done (``iterations_done``; ``mf``: rounds) and name
``stopped_by`` (status ``preempted``). On MPI the master also reads the flag while it waits for
replies, so a signal ends the solve even when too few workers answer.

Too few workers (more than m - k frozen or dead): after ``solver.progress_timeout`` seconds
without any reply the master ends the solve; the metrics and summary cover the iterations done,
``failed_by`` says why (status ``failed``), ``unresponsive_ranks`` names the silent workers and
the job ends with exit code 3 once the results are written (see :mod:`hpcml.launch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hpcml.coded.config import CodeConfig, ProblemConfig, SolverConfig, check_problem
from hpcml.coded.encoders import frame_note
from hpcml.coded.mf import load_ratings, solve_cf
from hpcml.coded.problems import Problem, load_data
from hpcml.coded.shards import check_input
from hpcml.coded.solver import solve
from hpcml.comm import Communicator, StragglerConfig, make_delay_model
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext


@dataclasses.dataclass
class CodedConfig(JobConfig):
    problem: ProblemConfig = option(ProblemConfig())
    code: CodeConfig = option(CodeConfig())
    solver: SolverConfig = option(SolverConfig())
    stragglers: StragglerConfig = option(StragglerConfig())

    def check(self, size: int) -> None:
        self.code.check(size)
        self.solver.check(self.problem.kind)
        check_problem(self.problem)
        check_hdf5(self.problem)


def check_hdf5(cfg: ProblemConfig) -> None:
    """For ``data = 'hdf5'``: a file is named (raises a one-line ``ConfigError`` otherwise);
    its contents are checked by :func:`validate_problem`."""
    if cfg.data == "hdf5" and not cfg.path:
        raise ConfigError("problem.path", "data = 'hdf5' needs a file", "set problem.path")


def validate_problem(cfg: ProblemConfig, comm: Communicator) -> None:
    """The input data, before the run directory exists: rank 0, which alone loads it, checks
    an HDF5 input in full (:func:`~hpcml.coded.shards.check_input`); other sources are
    generated or bundled. Raises a one-line ``UsageError`` (no communication)."""
    if cfg.data == "hdf5" and comm.rank == 0:
        check_input(cfg.path, cfg.x_key, cfg.y_key, cfg.kind)


def validate_data(cfg: CodedConfig, comm: Communicator) -> None:
    """:func:`validate_problem`, and with simulated workers (one rank) a straggler model that
    covers them: the virtual clock asks for the delay of workers 1..m, so a trace needs m + 1
    columns (the launcher checks a column per MPI rank)."""
    validate_problem(cfg.problem, comm)
    if comm.size == 1:
        make_delay_model(cfg.stragglers, cfg.code.workers_for(1) + 1)


def make_problem(cfg: ProblemConfig, seed: int) -> Problem:
    """The problem a ``[problem]`` section describes (loads the data)."""
    x, y = load_data(cfg.data, kind=cfg.kind, n=cfg.n, p=cfg.p, noise=cfg.noise,
                     spread=cfg.spread, seed=seed, path=cfg.path, x_key=cfg.x_key,
                     y_key=cfg.y_key)
    if cfg.order == "by_target":
        rows = np.argsort(y, kind="stable")
        x, y = x[rows], y[rows]
    return Problem(cfg.kind, x, y, lam=cfg.lam, l1=cfg.l1)


def run(cfg: CodedConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    m, k = cfg.code.workers_for(comm.size), cfg.code.wait_for_k(comm.size)
    ctx.log(f"coded: {cfg.problem.kind} on {cfg.problem.data}, {cfg.code.encoder} beta="
            f"{cfg.code.beta}, {cfg.solver.algorithm}, wait for k={k} of m={m} workers"
            + (" (simulated)" if comm.size == 1 else ""))
    if cfg.problem.kind == "mf":
        ctx.log(f"coded: {frame_note(cfg.code.encoder, cfg.code.beta)}")
        return _run_mf(cfg, ctx, m, k)
    problem = make_problem(cfg.problem, cfg.seed) if comm.rank == 0 else None
    result = solve(comm, problem, cfg.code, cfg.solver, ctx.run_dir.path / "shards", cfg.seed,
                   on_start=lambda enc: ctx.log(
                       f"coded: {frame_note(cfg.code.encoder, enc.beta, enc.encoder)}; data "
                       f"encoded and loaded by the workers; solving ({cfg.solver.iterations} "
                       f"iterations)"), stop=lambda: ctx.preemption.received)
    if result is None:
        return {}
    for t, (sec, sub, rel) in enumerate(zip(result.seconds, result.suboptimality,
                                            result.relative_error, strict=True)):
        ctx.run_dir.log_metrics(iteration=t, seconds=sec, suboptimality=sub,
                                relative_error=rel)
    summary = {"workers": m, "wait_for": k, "simulated": comm.size == 1, **result.summary()}
    ctx.log(f"final suboptimality {num(summary['final_suboptimality'], '.3e')}, relative "
            f"error {num(summary['final_relative_error'], '.3e')}, "
            f"{num(summary['seconds'], '.2f')} s, {result.discarded} late replies discarded"
            + stopped_note(summary))
    log_unresponsive(ctx, summary)
    return summary


def num(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; ``none`` when no iteration gave one."""
    return "none" if value is None else format(value, spec)


def stopped_note(summary: dict[str, Any]) -> str:
    """``"; stopped by SIGUSR1 after 12 iterations"`` for a run that stopped early (or
    ``"; failed after ...: <why>"`` when too few workers answered), else ''."""
    done = summary["iterations_done"]
    if summary["failed_by"]:
        return f"; failed after {done} iterations: {summary['failed_by']}"
    if not summary["stopped_by"]:
        return ""
    return f"; stopped by {summary['stopped_by']} after {done} iterations"


def log_unresponsive(ctx: RunContext, summary: dict[str, Any]) -> None:
    """Say which worker ranks went silent or never acknowledged the end of the solve (the
    job then ends by aborting them once the results are written, exit code 3)."""
    ranks = summary["unresponsive_ranks"]
    if ranks and summary["failed_by"]:
        ctx.log(f"workers on ranks {ranks} stopped answering (frozen or dead) and too few "
                f"were left: the results cover the {summary['iterations_done']} iterations "
                "done; the job aborts them to end (exit code 3)")
    elif ranks:
        ctx.log(f"workers on ranks {ranks} never acknowledged the end of the solve (frozen or "
                f"dead): the results are complete; the job aborts them to end (exit code 3)")


def _run_mf(cfg: CodedConfig, ctx: RunContext, m: int, k: int) -> dict[str, Any]:
    train, test = load_ratings(cfg.problem, cfg.seed) if ctx.comm.rank == 0 else (None, None)
    if train is not None:
        ctx.log(f"coded: {train.n} users x {train.d} items, {len(train)} training and "
                f"{len(test)} test ratings")
    out = solve_cf(ctx.comm, train, test, cfg.code, cfg.problem.rank, cfg.problem.lam,
                   cfg.solver.iterations, cfg.solver.inner, cfg.solver.step,
                   ctx.run_dir.path / "shards", cfg.seed,
                   close_timeout=cfg.solver.close_timeout, stop=lambda: ctx.preemption.received,
                   progress_timeout=cfg.solver.progress_timeout)
    if out is None:
        return {}
    for t, (sec, sub, train_rmse, test_rmse) in enumerate(zip(
            out.seconds, out.suboptimality, out.train_rmse, out.test_rmse, strict=True)):
        ctx.run_dir.log_metrics(round=t, seconds=sec, suboptimality=sub, train_rmse=train_rmse,
                                test_rmse=test_rmse)
    summary = {"workers": m, "wait_for": k, "simulated": ctx.comm.size == 1, **out.summary()}
    ctx.log(f"final suboptimality {num(summary['final_suboptimality'], '.3e')} (signed, vs "
            f"exact ALS), test RMSE {num(summary['final_test_rmse'], '.4f')} (exact ALS "
            f"{out.reference['test_rmse']:.4f}), {num(summary['seconds'], '.2f')} s, "
            f"{out.discarded} late replies discarded" + stopped_note(summary))
    log_unresponsive(ctx, summary)
    return summary


JOB = JobKind(config=CodedConfig, run=run,
              description="encoded optimization with stragglers as erasures (Karakus et al.)",
              validate_data=validate_data)
