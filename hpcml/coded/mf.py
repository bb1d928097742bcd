"""Encoded matrix factorization (collaborative filtering) by alternating least squares.

Problem (n users x d items, rank r):
    f(U, V) = 1/(2 n d) ||R - U V.T||_F^2 + lam/2 (||U||_F^2 + ||V||_F^2).
Its minimum has a closed form: min over U V.T = Z of (||U||^2 + ||V||^2)/2 is ||Z||_* (nuclear
norm), so f* = min_{rank Z <= r} 1/(2nd) ||R - Z||^2 + lam ||Z||_*, attained by soft-thresholding
R's top r singular values by lam n d (:func:`mf_exact`): the reference for the errors.

Encoding (as in Karakus et al.'s matrix-factorization experiment, alternating minimization
with each half step a least-squares problem solved on encoded data): the large, fixed data R
are encoded once, S1 R.T over items for the U-step and S2 R over users for the V-step, and
sharded; each half step minimizes the encoded least squares
    U-step: 1/(2 eta beta n d) sum_{i in A_t} ||(S1_i V) U.T - S1_i R.T||^2 + lam/2 ||U||^2
by ``inner`` gradient steps with the first k of m workers per round. The small factor is
encoded on the fly by the master (S1 V is d x r) and worker i receives its rows S1_i V with
the iterate. With S a tight frame and k = m this is plain ALS-by-gradient on R.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hpcml.coded.config import CodeConfig
from hpcml.coded.encoders import make_encoder
from hpcml.coded.runtime import MPIMaster, SimulatedMaster, serve
from hpcml.coded.shards import encode_to_shards, load_shard
from hpcml.comm import Communicator


def mf_objective(r: np.ndarray, u: np.ndarray, v: np.ndarray, lam: float) -> float:
    n, d = r.shape
    return float(0.5 * np.sum((r - u @ v.T) ** 2) / (n * d)
                 + 0.5 * lam * (np.sum(u**2) + np.sum(v**2)))


def mf_exact(r: np.ndarray, rank: int, lam: float) -> tuple[np.ndarray, float]:
    """(Z*, f*): the optimal product U V.T and the optimal objective value."""
    n, d = r.shape
    left, sv, right = np.linalg.svd(r, full_matrices=False)
    shrunk = np.maximum(sv[:rank] - lam * n * d, 0.0)
    z = (left[:, :rank] * shrunk) @ right[:rank]
    return z, float(0.5 * np.sum((r - z) ** 2) / (n * d) + lam * shrunk.sum())


def _worker(a: np.ndarray, rank: int):
    """Half-step task on encoded data a = S_i R.T (or S_i R): message (S_i F, W) with F the
    fixed factor and W the iterate (columns x rank) -> ((S_i F).T residual).T and loss."""
    rows, cols = a.shape

    def compute(t: int, msg: np.ndarray) -> np.ndarray:
        sf = msg[: rows * rank].reshape(rows, rank)
        w = msg[rows * rank: rows * rank + cols * rank].reshape(cols, rank)
        res = sf @ w.T - a
        return np.concatenate([(res.T @ sf).ravel(), [np.sum(res**2)]])

    return compute


def solve_mf(comm: Communicator, r: np.ndarray | None, code: CodeConfig, rank: int, lam: float,
             outer: int, inner: int, shard_dir: Path, seed: int) -> dict | None:
    """Collective encoded ALS. ``r`` is needed on rank 0 only. Returns, on rank 0, per-round
    seconds and relative suboptimality (f - f*) / f*, and the final relative error of U V.T
    against Z*; None elsewhere."""
    m, k = code.workers_for(comm.size), code.wait_for_k(comm.size)
    shape = comm.bcast(r.shape if comm.rank == 0 else None)
    n, d = shape
    encs = [make_encoder(code.encoder, size, m, code.beta, seed + side, etf_q=code.etf_q,
                         sparse_nnz=code.sparse_nnz) for side, size in enumerate((d, n))]
    if comm.rank == 0:
        encode_to_shards(r.T, np.zeros(d), encs[0], shard_dir / "u", code.chunk)
        encode_to_shards(r, np.zeros(n), encs[1], shard_dir / "v", code.chunk)
    comm.barrier()
    widths = [(len(b), n) for b in encs[0].blocks] + [(len(b), d) for b in encs[1].blocks]
    message_len = max(rows * rank + cols * rank for rows, cols in widths)
    reply_len = max(n, d) * rank + 1

    def task(worker: int):
        side_u = [_worker(load_shard(shard_dir / "u", worker)[0], rank),
                  _worker(load_shard(shard_dir / "v", worker)[0], rank)]
        return lambda t, msg: side_u[int(msg[0])](t, msg[1:])

    if comm.rank > 0:
        compute = task(comm.rank - 1)
        comm.barrier()
        serve(comm, compute, message_len + 1)
        comm.barrier()
        return None
    computes = [task(i) for i in range(m)] if comm.size == 1 else []
    comm.barrier()
    rt = SimulatedMaster(computes, comm.delays) if comm.size == 1 else MPIMaster(comm, reply_len)
    rng = np.random.default_rng([seed, 7])
    u, v = rng.standard_normal((n, rank)) * 0.1, rng.standard_normal((d, rank)) * 0.1
    z_star, f_star = mf_exact(r, rank, lam)
    seconds, sub = [], []
    t = 0
    for _ in range(outer):
        for side in (0, 1):
            fixed, enc = (v, encs[0]) if side == 0 else (u, encs[1])
            encoded = enc.apply(fixed)
            step = 1.0 / (np.linalg.norm(encoded, 2) ** 2 / (enc.beta * n * d) + lam)
            for _ in range(inner):
                w = u if side == 0 else v
                msgs = [np.concatenate([[side], encoded[b].ravel(), w.ravel()])
                        for b in enc.blocks]
                replies = rt.round(t, msgs, k)
                eta = len(replies) / m
                grad = sum(p[:-1] for p in replies.values()).reshape(w.shape)
                w = w - step * (grad / (eta * enc.beta * n * d) + lam * w)
                if side == 0:
                    u = w
                else:
                    v = w
                t += 1
                seconds.append(rt.elapsed())
                sub.append((mf_objective(r, u, v, lam) - f_star) / f_star)
    rt.close()
    comm.barrier()
    shutil.rmtree(shard_dir, ignore_errors=True)
    return {"seconds": seconds, "suboptimality": sub, "discarded": rt.discarded,
            "relative_error": float(np.linalg.norm(u @ v.T - z_star) / np.linalg.norm(z_star))}
