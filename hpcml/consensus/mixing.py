"""Mixing matrices W for consensus on a graph, and the checks the algorithm relies on.

Both rules give a symmetric, non-negative, doubly stochastic W with a positive diagonal whose
off-diagonal support is the graph's edges; on a connected graph such a W has a spectral gap
``1 - max(|lambda_2|, |lambda_n|) > 0`` and ``W^t -> 11^T / n`` (the convergence rate of plain
averaging is governed by the gap).

- Metropolis–Hastings: ``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``W_ii = 1 - sum_j W_ij``.
- Lazy max-degree ("lazy uniform"): ``W_ij = 1 / (2 d_max)`` on edges,
  ``W_ii = 1 - d_i / (2 d_max) >= 1/2``; on a regular graph this is ``(I + D^-1 A) / 2``.
"""

from __future__ import annotations

import numpy as np

from hpcml.errors import UsageError

RULES = ("metropolis", "lazy")


def metropolis(adj: np.ndarray) -> np.ndarray:
    deg = adj.sum(axis=1)
    w = np.where(adj, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def lazy_uniform(adj: np.ndarray) -> np.ndarray:
    deg = adj.sum(axis=1)
    dmax = max(int(deg.max()), 1)
    w = np.where(adj, 1.0 / (2.0 * dmax), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def mixing_matrix(adj: np.ndarray, rule: str) -> np.ndarray:
    """W for ``rule`` in :data:`RULES`, checked by :func:`check_mixing`."""
    if rule not in RULES:
        raise UsageError(f"mixing: unknown rule {rule!r}; choose from {', '.join(RULES)}")
    w = metropolis(adj) if rule == "metropolis" else lazy_uniform(adj)
    check_mixing(w, adj)
    return w


def check_mixing(w: np.ndarray, adj: np.ndarray, tol: float = 1e-12) -> None:
    """Raise ``ValueError`` unless W is symmetric, non-negative, doubly stochastic and supported
    on the graph's edges plus the diagonal."""
    n = adj.shape[0]
    if w.shape != (n, n):
        raise ValueError(f"mixing matrix has shape {w.shape}, expected {(n, n)}")
    if np.any(w < -tol):
        raise ValueError("mixing matrix has negative entries")
    if not np.allclose(w, w.T, atol=tol):
        raise ValueError("mixing matrix is not symmetric")
    if not (np.allclose(w.sum(axis=0), 1, atol=tol) and np.allclose(w.sum(axis=1), 1, atol=tol)):
        raise ValueError("mixing matrix is not doubly stochastic")
    off = w.copy()
    np.fill_diagonal(off, 0.0)
    if np.any((np.abs(off) > tol) & ~adj):
        raise ValueError("mixing matrix has weight on a pair that is not an edge")


def spectral_gap(w: np.ndarray) -> float:
    """``1 - max(|lambda_2|, |lambda_n|)`` of a symmetric W; 1 for a single node."""
    if w.shape[0] == 1:
        return 1.0
    eig = np.sort(np.linalg.eigvalsh(w))[::-1]
    return float(1.0 - max(abs(eig[1]), abs(eig[-1])))
