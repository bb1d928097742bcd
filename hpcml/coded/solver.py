"""One encoded solve, collective over the world communicator: encode, distribute, optimize,
evaluate. Rank 0 encodes the data into per-worker HDF5 shards (streaming, see
:mod:`hpcml.coded.shards`), the workers load their shard and :func:`~hpcml.coded.runtime.serve`,
and rank 0 runs the master side of the algorithm; on one rank the workers are simulated
(:class:`~hpcml.coded.runtime.SimulatedMaster`). The clock starts after a barrier that every
worker reaches holding its shard, so shard loading is not counted as straggling. The reference
solution and every reported error are computed on rank 0 from the full, unencoded data after
the timed loop.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
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
from hpcml.coded.encoders import make_encoder
from hpcml.coded.problems import Problem
from hpcml.coded.runtime import MPIMaster, SimulatedMaster, serve
from hpcml.coded.shards import encode_to_shards, load_shard
from hpcml.comm import Communicator


@dataclasses.dataclass
class SolveResult:
    """Rank 0's record of one solve: per iteration wall (or virtual) seconds, objective
    suboptimality (f - f*) / |f*| and relative error ||w - w*|| / ||w*||."""

    seconds: list[float]
    suboptimality: list[float]
    relative_error: list[float]
    discarded: int
    encode_seconds: float
    w: np.ndarray

    def iterations_to(self, eps: float) -> int | None:
        """First iteration (counted from 1) whose suboptimality is <= eps (None if never)."""
        return next((i + 1 for i, sub in enumerate(self.suboptimality) if sub <= eps), None)

    def time_to(self, eps: float) -> float | None:
        """Time at which the suboptimality is first <= eps (None if never)."""
        it = self.iterations_to(eps)
        return None if it is None else self.seconds[it - 1]

    def summary(self) -> dict[str, Any]:
        return {"final_suboptimality": self.suboptimality[-1],
                "final_relative_error": self.relative_error[-1],
                "seconds": self.seconds[-1], "discarded_late_replies": self.discarded,
                "encode_seconds": self.encode_seconds}


def solve(comm: Communicator, problem: Problem | None, code: CodeConfig, solver: SolverConfig,
          shard_dir: Path, seed: int, w_star: np.ndarray | None = None) -> SolveResult | None:
    """Collective. ``problem`` is needed on rank 0 only (others may pass None). Returns the
    result on rank 0 and None elsewhere. ``w_star`` (rank 0) is the reference solution,
    computed here when None. The shards are deleted once every rank is done."""
    m, k = code.workers_for(comm.size), code.wait_for_k(comm.size)
    model_parallel = solver.algorithm == "bcd"
    n, p = problem.x.shape if comm.rank == 0 else (0, 0)
    n, p = comm.bcast((n, p))
    encoder = None
    header: dict[str, Any] | None = None
    if comm.rank == 0:
        encoder = make_encoder(code.encoder, p if model_parallel else n, m, code.beta, seed,
                               etf_q=code.etf_q, sparse_nnz=code.sparse_nnz)
        start = time.perf_counter()
        encode_to_shards(problem.x, problem.y, encoder, shard_dir, code.chunk,
                         transpose=model_parallel)
        header = {"encode_seconds": time.perf_counter() - start,
                  "step": solver.step / _smoothness(problem, encoder, model_parallel),
                  "blocks": [len(b) for b in encoder.blocks], "beta": encoder.beta,
                  "lam": problem_lam(problem)}
    header = comm.bcast(header)
    step, blocks, beta, lam = header["step"], header["blocks"], header["beta"], header["lam"]

    def task(worker: int) -> Any:
        x, y = load_shard(shard_dir, worker)
        if model_parallel:
            return bcd_worker(x, step, lam * beta)
        return least_squares_worker(x, y)

    message_len = n + max(blocks) if model_parallel else p
    reply_len = max(blocks) + n if model_parallel else p + 1
    if comm.rank > 0:
        compute = task(comm.rank - 1)
        comm.barrier()
        serve(comm, compute, message_len)
        comm.barrier()
        return None
    computes = [task(i) for i in range(m)] if comm.size == 1 else []
    comm.barrier()
    rt = SimulatedMaster(computes, comm.delays) if comm.size == 1 else MPIMaster(comm, reply_len)
    if model_parallel:
        trace, _ = block_coordinate_descent(rt, problem.loss_grad, blocks, n, k=k,
                                            iterations=solver.iterations)
        s_t = encoder.matrix().T
        order = np.concatenate(encoder.blocks)
        iterates = []
        for sec, v in trace:
            full = np.zeros(encoder.rows)
            full[order] = v
            iterates.append((sec, s_t @ full))
    else:
        iterates = data_parallel(rt, solver.algorithm, p, n=n, beta=beta, k=k, step=step,
                                 iterations=solver.iterations, lam=lam,
                                 l1=problem.l1, history=solver.history)
    rt.close()
    comm.barrier()
    shutil.rmtree(shard_dir, ignore_errors=True)
    w_star = problem.exact() if w_star is None else w_star
    f_star = problem.objective(w_star)
    seconds = [s for s, _ in iterates]
    sub = [(problem.objective(w) - f_star) / max(abs(f_star), 1e-300) for _, w in iterates]
    rel = [float(np.linalg.norm(w - w_star) / max(np.linalg.norm(w_star), 1e-300))
           for _, w in iterates]
    return SolveResult(seconds, sub, rel, rt.discarded, header["encode_seconds"],
                       iterates[-1][1])


def problem_lam(problem: Problem) -> float:
    return 0.0 if problem.kind == "lasso" else problem.lam


def _smoothness(problem: Problem, encoder: Any, model_parallel: bool) -> float:
    """L of the encoded objective: sigma_max(S X)^2 / (beta n) + lam (data parallel) or
    c_phi sigma_max(X S.T)^2 + lam beta (model parallel), from the encoded data."""
    lam = problem_lam(problem)
    if model_parallel:
        enc = encoder.apply(problem.x.T)
        return problem.curvature() * np.linalg.norm(enc, 2) ** 2 + lam * encoder.beta
    enc = encoder.apply(problem.x)
    return np.linalg.norm(enc, 2) ** 2 / (encoder.beta * problem.n) + lam
