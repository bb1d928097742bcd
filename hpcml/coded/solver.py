"""One encoded solve, collective over the world communicator: encode, distribute, optimize,
evaluate. Rank 0 encodes the data into per-worker HDF5 shards (streaming, see
:mod:`hpcml.coded.shards`), the workers load their shard (:func:`encode`, once per problem and
code), then for each solve (:func:`optimize`) the workers :func:`~hpcml.coded.runtime.serve` and
rank 0 runs the master side of the algorithm; on one rank the workers are simulated
(:class:`~hpcml.coded.runtime.SimulatedMaster`). The clock starts once every worker told the
master it holds its shard and is ready to answer (:func:`~hpcml.coded.runtime.await_ready`, no
barrier: a worker frozen during setup ends the solve as failed after ``progress_timeout``), so
shard loading is not counted as straggling. The reference
solution and every reported error are computed on rank 0 from the full, unencoded data after
the timed loop.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpcml.coded.algorithms import (
    bcd_worker,
    block_coordinate_descent,
    data_parallel,
    least_squares_worker,
)
from hpcml.coded.config import CodeConfig, SolverConfig
from hpcml.coded.encoders import Encoder, make_encoder
from hpcml.coded.problems import Problem
from hpcml.coded.runtime import (
    PROGRESS_TIMEOUT,
    MPIMaster,
    SetupFailed,
    SimulatedMaster,
    await_ready,
    finish,
    report_ready,
    serve,
)
from hpcml.coded.shards import encode_to_shards, load_shard
from hpcml.comm import Communicator


@dataclasses.dataclass
class SolveResult:
    """Rank 0's record of one solve: per iteration wall (or virtual) seconds since the clock
    started (at Unix time ``started_unix``), objective suboptimality ``(f - f*) / |f*|`` and
    relative error ||w - w*|| / ||w*||; ``unresponsive``: worker ranks that never
    acknowledged the end or went silent; ``stopped_by``: why the solve ended before its last
    iteration (None when it did not); ``failed_by``: why it ended because too few workers
    answered (see :class:`~hpcml.coded.runtime.Runtime`). The lists may be empty when it ended
    in its first iteration; ``w`` is then the starting point and the final values are None."""

    seconds: list[float]
    suboptimality: list[float]
    relative_error: list[float]
    discarded: int
    encode_seconds: float
    w: np.ndarray
    unresponsive: list[int] = dataclasses.field(default_factory=list)
    started_unix: float = 0.0
    stopped_by: str | None = None
    failed_by: str | None = None

    @classmethod
    def not_started(cls, exc: SetupFailed, encode_seconds: float, p: int) -> SolveResult:
        """The result of a solve whose setup ended with ``exc``: no iteration, the clock
        never started (``started_unix`` 0), ``w`` zero, the silent workers named."""
        return cls([], [], [], 0, encode_seconds, np.zeros(p), exc.silent,
                   stopped_by=exc.stopped_by, failed_by=exc.failed_by)

    def iterations_to(self, eps: float) -> int | None:
        """First iteration (counted from 1) whose suboptimality is <= eps (None if never)."""
        return next((i + 1 for i, sub in enumerate(self.suboptimality) if sub <= eps), None)

    def time_to(self, eps: float) -> float | None:
        """Time at which the suboptimality is first <= eps (None if never)."""
        it = self.iterations_to(eps)
        return None if it is None else self.seconds[it - 1]

    def summary(self) -> dict[str, Any]:
        return {"final_suboptimality": last(self.suboptimality),
                "final_relative_error": last(self.relative_error),
                "seconds": last(self.seconds), "discarded_late_replies": self.discarded,
                "encode_seconds": self.encode_seconds,
                "unresponsive_ranks": self.unresponsive, "started_unix": self.started_unix,
                "iterations_done": len(self.seconds), "stopped_by": self.stopped_by,
                "failed_by": self.failed_by}


def last(values: list[float]) -> float | None:
    """The last value of a per-iteration list; None when no iteration was done."""
    return values[-1] if values else None


@dataclasses.dataclass
class Encoded:
    """An encoded problem spread over the workers, ready for any number of solves (each under
    the delays the communicator has then). Built collectively by :func:`encode`; every rank
    holds one: rank 0 the problem and the encoder, each worker rank its own shard (X_i, y_i)
    in ``shards`` (one rank: all m simulated workers' shards; the master of an MPI run: none).
    ``smoothness`` is L of the encoded objective (see :func:`encode`)."""

    n: int
    p: int
    m: int
    beta: float
    lam: float
    smoothness: float
    blocks: list[int]
    model_parallel: bool
    encode_seconds: float
    shards: list[tuple[np.ndarray, np.ndarray]]
    problem: Problem | None = None
    encoder: Encoder | None = None


def encode(comm: Communicator, problem: Problem | None, code: CodeConfig, model_parallel: bool,
           shard_dir: Path, seed: int, progress_timeout: float = PROGRESS_TIMEOUT,
           stop: Callable[[], str | None] | None = None) -> Encoded:
    """Collective. Rank 0 encodes ``problem`` (needed there only) into one HDF5 shard per
    worker under ``shard_dir``; the workers load theirs and the directory is removed. L of the
    encoded objective: data parallel, lambda_max(sum_i X_i.T X_i) / (beta n) + lam from the
    workers' Gram matrices (each worker's p x p in its ready message, L broadcast back); model
    parallel, c_phi sigma_max(X S.T)^2 + lam beta, computed on rank 0. Rank 0 waits for the
    workers' ready messages as :func:`~hpcml.coded.runtime.await_ready` (``progress_timeout``,
    ``stop``) and raises :class:`~hpcml.coded.runtime.SetupFailed` when they do not all come;
    it then enters no further collective with the workers. Rank 0 waits on a worker only
    there (the two broadcasts from it are of a few small objects)."""
    m = code.workers_for(comm.size)
    n, p = comm.bcast(problem.x.shape if comm.rank == 0 else None)
    encoder = None
    header: dict[str, Any] | None = None
    if comm.rank == 0:
        encoder = make_encoder(code.encoder, p if model_parallel else n, m, code.beta, seed,
                               etf_q=code.etf_q, sparse_nnz=code.sparse_nnz)
        start = time.perf_counter()
        encode_to_shards(problem.x, problem.y, encoder, shard_dir, code.chunk,
                         transpose=model_parallel)
        header = {"encode_seconds": time.perf_counter() - start, "beta": encoder.beta,
                  "blocks": [len(b) for b in encoder.blocks], "lam": problem_lam(problem),
                  "smoothness": _model_parallel_smoothness(problem, encoder)
                  if model_parallel else 0.0}
    header = comm.bcast(header)
    mine = range(m) if comm.size == 1 else [comm.rank - 1] if comm.rank > 0 else []
    shards = [load_shard(shard_dir, i) for i in mine]
    beta, lam, smoothness = header["beta"], header["lam"], header["smoothness"]
    gram = np.zeros(1) if model_parallel else \
        sum((x.T @ x for x, _ in shards), np.zeros((p, p))).ravel()
    if comm.rank > 0:
        report_ready(comm, gram)
    elif comm.size > 1:
        try:
            gram = sum(await_ready(comm, gram.size, "loading the shards", progress_timeout,
                                   stop))
        except SetupFailed as exc:
            exc.encode_seconds = header["encode_seconds"]
            raise
        finally:
            shutil.rmtree(shard_dir, ignore_errors=True)
    else:
        shutil.rmtree(shard_dir, ignore_errors=True)
    if not model_parallel:
        smoothness = comm.bcast(float(np.linalg.eigvalsh(gram.reshape(p, p))[-1])
                                / (beta * n) + lam if comm.rank == 0 else None)
    return Encoded(n, p, m, beta, lam, smoothness, header["blocks"], model_parallel,
                   header["encode_seconds"], shards, problem, encoder)


def optimize(comm: Communicator, enc: Encoded, solver: SolverConfig, k: int,
             w_star: np.ndarray | None = None,
             on_start: Callable[[Encoded], None] | None = None,
             stop: Callable[[], str | None] | None = None) -> SolveResult | None:
    """Collective: one solve of ``enc`` waiting for the first k of its m workers per round,
    under the communicator's current delay model. Returns the result on rank 0 (errors against
    ``w_star``, the exact solution, computed when None) and None elsewhere. The clock starts
    once every worker sent its ready message (:func:`~hpcml.coded.runtime.await_ready`); when
    one does not within ``solver.progress_timeout`` (or ``stop()`` gives a reason first) the
    solve ends before its first iteration, the silent workers named in ``unresponsive``.
    When a worker never acknowledged the end (or stayed silent at the start; both in
    ``result.unresponsive``), rank 0 returns without the closing barrier and must enter no
    further collective. ``on_start(enc)`` runs on rank 0 when the
    clock starts. ``stop()`` (rank 0, polled between iterations and while waiting, no
    communication) returns a reason to end the solve early; a solve that gets no reply for
    ``solver.progress_timeout`` seconds ends as failed (see
    :class:`~hpcml.coded.runtime.Runtime`)."""
    step = solver.step / enc.smoothness
    n, p, blocks = enc.n, enc.p, enc.blocks

    def task(shard: tuple[np.ndarray, np.ndarray]) -> Any:
        x, y = shard
        if enc.model_parallel:
            return bcd_worker(x, step, enc.lam * enc.beta)
        return least_squares_worker(x, y)

    message_len = n + max(blocks) if enc.model_parallel else p
    reply_len = max(blocks) + n if enc.model_parallel else p + 1
    if comm.rank > 0:
        compute = task(enc.shards[0])
        report_ready(comm)
        serve(comm, compute, message_len)
        comm.barrier()
        return None
    problem = enc.problem
    computes = [task(shard) for shard in enc.shards]
    if comm.size > 1:
        try:
            await_ready(comm, 1, "start of the solve", solver.progress_timeout, stop)
        except SetupFailed as exc:
            return SolveResult.not_started(exc, enc.encode_seconds, p)
    started = time.time()
    if on_start is not None:
        on_start(enc)
    rt = SimulatedMaster(computes, comm.delays, stop) if comm.size == 1 else \
        MPIMaster(comm, reply_len, solver.close_timeout, stop, solver.progress_timeout)
    if enc.model_parallel:
        trace, _ = block_coordinate_descent(rt, problem.loss_grad, blocks, n, k=k,
                                            iterations=solver.iterations)
        s_t = enc.encoder.matrix().T
        order = np.concatenate(enc.encoder.blocks)
        iterates = []
        for sec, v in trace:
            full = np.zeros(enc.encoder.rows)
            full[order] = v
            iterates.append((sec, s_t @ full))
    else:
        iterates = data_parallel(rt, solver.algorithm, p, n=n, beta=enc.beta, k=k, step=step,
                                 iterations=solver.iterations, lam=enc.lam,
                                 l1=problem.l1, history=solver.history)
    unresponsive = finish(comm, rt)
    w_star = problem.exact() if w_star is None else w_star
    f_star = problem.objective(w_star)
    seconds = [s for s, _ in iterates]
    sub = [(problem.objective(w) - f_star) / max(abs(f_star), 1e-300) for _, w in iterates]
    rel = [float(np.linalg.norm(w - w_star) / max(np.linalg.norm(w_star), 1e-300))
           for _, w in iterates]
    w = iterates[-1][1] if iterates else np.zeros(p)
    return SolveResult(seconds, sub, rel, rt.discarded, enc.encode_seconds, w, unresponsive,
                       started, rt.stopped_by, rt.failed_by)


def solve(comm: Communicator, problem: Problem | None, code: CodeConfig, solver: SolverConfig,
          shard_dir: Path, seed: int, w_star: np.ndarray | None = None,
          on_start: Callable[[Encoded], None] | None = None,
          stop: Callable[[], str | None] | None = None) -> SolveResult | None:
    """Collective: :func:`encode` then one :func:`optimize` with k = ``code``'s wait_for.
    ``problem`` is needed on rank 0 only (others may pass None); the result is on rank 0 (one
    that did not start when a worker stayed silent during setup, see :func:`encode`)."""
    try:
        enc = encode(comm, problem, code, solver.algorithm == "bcd", shard_dir, seed,
                     solver.progress_timeout, stop)
    except SetupFailed as exc:
        return SolveResult.not_started(exc, exc.encode_seconds, problem.x.shape[1])
    return optimize(comm, enc, solver, code.wait_for_k(comm.size), w_star, on_start, stop)


def problem_lam(problem: Problem) -> float:
    return 0.0 if problem.kind == "lasso" else problem.lam


def _model_parallel_smoothness(problem: Problem, encoder: Encoder) -> float:
    """L of the encoded model-parallel objective: c_phi sigma_max(X S.T)^2 + lam beta."""
    enc = encoder.apply(problem.x.T)
    return problem.curvature() * np.linalg.norm(enc, 2) ** 2 + problem_lam(problem) * \
        encoder.beta
