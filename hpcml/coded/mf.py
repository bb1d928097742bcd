"""Encoded collaborative filtering with stragglers as erasures: one collective solve.

Karakus et al. (JMLR 2019, matrix-factorization experiment): alternating minimization of
f(U, V) on the observed ratings (see :mod:`hpcml.coded.cf`), each half step a collection of
per-user (per-item) least-squares problems solved on encoded data by ``inner`` gradient steps,
each step using the first k of m workers to answer (the rest are erasures). The master is
oblivious to the encoding: it sums the replies it got and scales by 1 / (eta beta N).

Layout as in :mod:`hpcml.coded.solver`: rank 0 encodes both sides once (each user's and each
item's observations with their own code) and writes one HDF5 shard per worker
(:func:`~hpcml.coded.shards.write_sparse_shards`); ranks 1..m load theirs and serve; with one
rank the workers are simulated with a virtual clock. Every message is (side, U, V), every reply
a side's summed gradient and ||e||^2. The clock starts once every worker told the master it
holds its shard (:func:`~hpcml.coded.runtime.await_ready`: a worker silent for
``progress_timeout`` ends the solve as failed before its first round, never a hang); the
iterates are stored and every metric (suboptimality against exact ALS from the same
initialization, train and test RMSE) is computed after the timed loop.
Suboptimality (f - f_ref) / f_ref is signed: the problem is non-convex, so a run may end at a
different (lower or higher) stationary point than the reference ALS.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpcml.coded.cf import (
    Side,
    WorkerSide,
    als,
    encode_side,
    objective,
    rmse,
    side_gradient,
    sides,
    step_sizes,
)
from hpcml.coded.config import CodeConfig, ProblemConfig
from hpcml.coded.ratings import Ratings, digits_ratings, split, synthetic_ratings
from hpcml.coded.runtime import (
    CLOSE_TIMEOUT,
    PROGRESS_TIMEOUT,
    Compute,
    MPIMaster,
    SetupFailed,
    SimulatedMaster,
    await_ready,
    finish,
    report_ready,
    serve,
)
from hpcml.coded.shards import load_sparse_shard, write_sparse_shards
from hpcml.coded.solver import last
from hpcml.comm import Communicator

EPS = (1e-1, 1e-2, 1e-3)


def load_ratings(cfg: ProblemConfig, seed: int) -> tuple[Ratings, Ratings]:
    """(train, test) for ``problem.kind = 'mf'``, both centered by the training mean (so the
    model predicts mean + u_i . v_j)."""
    if cfg.data == "synthetic":
        ratings = synthetic_ratings(cfg.n, cfg.p, cfg.true_rank or cfg.rank, cfg.density,
                                    cfg.noise, seed)
    else:
        ratings = digits_ratings(cfg.observed, seed)
    train, test = split(ratings, cfg.test_fraction, seed)
    mean = train.values.mean()
    train.values, test.values = train.values - mean, test.values - mean
    return train, test


@dataclasses.dataclass
class CFResult:
    """Rank 0's record of one solve, per round (one encoded gradient step on one side);
    ``stopped_by``: why the solve ended before its last round (None when it did not);
    ``failed_by``: why it ended because too few workers answered (the lists may then be empty
    and the final values None, as in :class:`~hpcml.coded.solver.SolveResult`)."""

    seconds: list[float]
    suboptimality: list[float]
    train_rmse: list[float]
    test_rmse: list[float]
    discarded: int
    encode_seconds: float
    reference: dict[str, float]
    u: np.ndarray
    v: np.ndarray
    unresponsive: list[int] = dataclasses.field(default_factory=list)
    stopped_by: str | None = None
    failed_by: str | None = None

    def time_to(self, eps: float) -> float | None:
        """Seconds at the first round with suboptimality <= eps (None if never)."""
        return next((s for s, f in zip(self.seconds, self.suboptimality, strict=True)
                     if f <= eps), None)

    def summary(self) -> dict[str, Any]:
        return {"final_suboptimality": last(self.suboptimality),
                "final_train_rmse": last(self.train_rmse),
                "final_test_rmse": last(self.test_rmse),
                "reference": self.reference, "seconds": last(self.seconds),
                "seconds_to_suboptimality": {str(e): self.time_to(e) for e in EPS},
                "discarded_late_replies": self.discarded, "encode_seconds": self.encode_seconds,
                "unresponsive_ranks": self.unresponsive, "iterations_done": len(self.seconds),
                "stopped_by": self.stopped_by, "failed_by": self.failed_by}


def _shard_arrays(data: WorkerSide) -> dict[str, np.ndarray]:
    return {"data": data.c.data, "indices": data.c.indices, "indptr": data.c.indptr,
            "shape": np.array(data.c.shape), "b": data.b, "owner": data.owner,
            "other": data.other, "n_owner": np.array(data.n_owner)}


def _worker_side(arrays: dict[str, np.ndarray]) -> WorkerSide:
    c = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                      shape=tuple(arrays["shape"]))
    return WorkerSide(c, arrays["b"], arrays["owner"], arrays["other"], int(arrays["n_owner"]))


def _encode(train: Ratings, code: CodeConfig, m: int, seed: int,
            shard_dir: Path) -> list[tuple[Side, sp.csr_matrix]]:
    """Encode both sides, write the shards; returns each side and its S.T S (for the steps)."""
    out, shards = [], [{} for _ in range(m)]
    for index, (name, side) in enumerate(zip(("u", "v"), sides(train), strict=True)):
        cs = encode_side(side, code.encoder, m, code.beta, seed * 2 + index, chunk=code.chunk,
                         etf_q=code.etf_q, sparse_nnz=code.sparse_nnz)
        for worker, c in enumerate(cs):
            shards[worker][name] = _shard_arrays(WorkerSide.from_encoded(c, side))
        out.append((side, sum(c.T @ c for c in cs).tocsr()))
    write_sparse_shards(shards, shard_dir, {"encoder": code.encoder, "beta": code.beta, "m": m})
    return out


def _task(shard_dir: Path, worker: int, n: int, rank: int) -> Compute:
    """Worker ``worker``'s reply to (side, U, V): that side's summed gradient and ||e||^2."""
    data = load_sparse_shard(shard_dir, worker)
    halves = [_worker_side(data["u"]), _worker_side(data["v"])]

    def compute(t: int, msg: np.ndarray) -> np.ndarray:
        u = msg[1: 1 + n * rank].reshape(n, rank)
        v = msg[1 + n * rank:].reshape(-1, rank)
        w, f = (u, v) if msg[0] == 0 else (v, u)
        grad, loss = side_gradient(halves[int(msg[0])], w, f)
        return np.concatenate([grad.ravel(), [loss]])

    return compute


def initial_factors(n: int, d: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded starting point shared by the encoded run and the reference ALS."""
    rng = np.random.default_rng([seed, 7])
    return rng.standard_normal((n, rank)) * 0.3, rng.standard_normal((d, rank)) * 0.3


def reference(train: Ratings, test: Ratings, rank: int, lam: float,
              seed: int) -> dict[str, float]:
    """Exact ALS on the full training data from :func:`initial_factors`, to convergence:
    its objective f_ref, sweeps, train and test RMSE."""
    u, v, history = als(train, *initial_factors(train.n, train.d, rank, seed), lam)
    return {"objective": history[-1], "sweeps": len(history) - 1,
            "train_rmse": rmse(train, u, v), "test_rmse": rmse(test, u, v)}


def solve_cf(comm: Communicator, train: Ratings | None, test: Ratings | None, code: CodeConfig,
             rank: int, lam: float, outer: int, inner: int, step: float, shard_dir: Path,
             seed: int, ref: dict[str, float] | None = None,
             close_timeout: float = CLOSE_TIMEOUT,
             stop: Callable[[], str | None] | None = None,
             progress_timeout: float = PROGRESS_TIMEOUT) -> CFResult | None:
    """Collective. ``train``/``test`` (centered ratings) are needed on rank 0 only. Runs
    ``outer`` sweeps of (U-step, V-step), each ``inner`` encoded gradient steps of size
    ``step`` / L_i per owner, with the first k of m workers per step. ``ref`` (rank 0) is
    :func:`reference`, computed here when None. Returns the result on rank 0 and None
    elsewhere; the shards are deleted once every rank is done. ``stop()`` (rank 0, polled
    between rounds and while waiting, no communication) returns a reason to end the solve
    early; ``close_timeout`` and ``progress_timeout`` as in
    :class:`~hpcml.coded.runtime.MPIMaster`, also while rank 0 waits for the workers to load
    their shards (a solve that never started names the silent workers, as in
    :func:`~hpcml.coded.solver.optimize`)."""
    m, k = code.workers_for(comm.size), code.wait_for_k(comm.size)
    encoded: list[tuple[Side, sp.csr_matrix]] = []
    encode_seconds = 0.0
    if comm.rank == 0:
        start = time.perf_counter()
        encoded = _encode(train, code, m, seed, shard_dir)
        encode_seconds = time.perf_counter() - start
    n, d = comm.bcast((train.n, train.d) if comm.rank == 0 else None)  # the shards exist now
    message_len, reply_len = 1 + (n + d) * rank, max(n, d) * rank + 1
    if comm.rank > 0:
        compute = _task(shard_dir, comm.rank - 1, n, rank)
        report_ready(comm)
        serve(comm, compute, message_len)
        comm.barrier()
        return None
    computes = [_task(shard_dir, i, n, rank) for i in range(m)] if comm.size == 1 else []
    if comm.size > 1:
        try:
            await_ready(comm, 1, "loading the shards", progress_timeout, stop)
        except SetupFailed as exc:
            shutil.rmtree(shard_dir, ignore_errors=True)
            ref = reference(train, test, rank, lam, seed) if ref is None else ref
            u0, v0 = initial_factors(n, d, rank, seed)
            return CFResult([], [], [], [], 0, encode_seconds, ref, u0, v0, exc.silent,
                            exc.stopped_by, exc.failed_by)
    rt = SimulatedMaster(computes, comm.delays, stop) if comm.size == 1 else \
        MPIMaster(comm, reply_len, close_timeout, stop, progress_timeout)
    u0, v0 = initial_factors(n, d, rank, seed)
    factors = [u0, v0]
    trace: list[tuple[float, np.ndarray, np.ndarray]] = []
    rounds = outer * len(encoded) * inner  # outer sweeps of (inner U-steps, inner V-steps)
    for t in range(rounds):
        which = t // inner % len(encoded)
        w = factors[which]
        if t % inner == 0:
            side, gram = encoded[which]
            steps = step * step_sizes(side, factors[1 - which], gram, code.beta, lam,
                                      len(train))[:, None]
        msg = np.concatenate([[which], factors[0].ravel(), factors[1].ravel()])
        replies = rt.round(t, [msg] * m, k)
        if replies is None:
            break
        total = sum(p[:-1] for p in replies.values()).reshape(w.shape)
        eta = len(replies) / m
        factors[which] = w - steps * (total / (eta * code.beta * len(train)) + lam * w)
        trace.append((rt.elapsed(), factors[0], factors[1]))
        if rt.stop_after(t + 1, rounds):
            break
    unresponsive = finish(comm, rt)
    shutil.rmtree(shard_dir, ignore_errors=True)
    ref = reference(train, test, rank, lam, seed) if ref is None else ref
    f_ref = ref["objective"]
    return CFResult([s for s, _, _ in trace],
                    [(objective(train, u, v, lam) - f_ref) / f_ref for _, u, v in trace],
                    [rmse(train, u, v) for _, u, v in trace],
                    [rmse(test, u, v) for _, u, v in trace],
                    rt.discarded, encode_seconds, ref, factors[0], factors[1], unresponsive,
                    rt.stopped_by, rt.failed_by)
