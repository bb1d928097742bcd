"""Equiangular tight frames from Paley conference matrices, with coherence and the Welch bound.

For a prime q = 1 (mod 4) the Paley conference matrix C (order N = q + 1) is symmetric with zero
diagonal, +-1 elsewhere and C @ C = q I. Then P = (I + C / sqrt(q)) / 2 is an orthogonal
projection of rank d = N / 2 whose Gram entries have equal magnitude off the diagonal, so the N
columns of any F (d x N) with F.T @ F = P form an equiangular tight frame: F @ F.T = I_d, every
column has squared norm 1/2 and every pair has coherence 1/sqrt(q), which meets the Welch bound
sqrt((N - d) / (d (N - 1))) with equality. Karakus et al. (JMLR 2019) show ETFs are
near-optimal encoders: subsets of their rows stay well conditioned.
"""

from __future__ import annotations

import numpy as np


def is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % f for f in range(2, int(q**0.5) + 1))


def paley_conference(q: int) -> np.ndarray:
    """The symmetric Paley conference matrix of order q + 1 (q prime, q = 1 mod 4)."""
    if not is_prime(q) or q % 4 != 1:
        raise ValueError(f"paley_conference: q = {q} must be a prime = 1 (mod 4), e.g. 5, 13, 17")
    squares = {(i * i) % q for i in range(1, q)}
    diff = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    jacobsthal = np.where(diff == 0, 0.0, np.where(np.isin(diff, list(squares)), 1.0, -1.0))
    c = np.zeros((q + 1, q + 1))
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = jacobsthal
    return c


def paley_etf(q: int) -> np.ndarray:
    """Frame F of shape (d, N) = ((q+1)/2, q+1): F @ F.T = I_d, columns equiangular."""
    c = paley_conference(q)
    proj = (np.eye(q + 1) + c / np.sqrt(q)) / 2.0
    vals, vecs = np.linalg.eigh(proj)
    d = (q + 1) // 2
    return vecs[:, vals > 0.5].T[:d]


def coherence(vectors: np.ndarray) -> float:
    """Largest ``|<f_i, f_j>| / (|f_i| |f_j|)`` over distinct columns of ``vectors`` (d x N)."""
    unit = vectors / np.linalg.norm(vectors, axis=0, keepdims=True)
    gram = np.abs(unit.T @ unit)
    np.fill_diagonal(gram, 0.0)
    return float(gram.max())


def welch_bound(n_vectors: int, dim: int) -> float:
    """Lower bound on the coherence of ``n_vectors`` unit vectors in R^dim (n_vectors > dim)."""
    return float(np.sqrt((n_vectors - dim) / (dim * (n_vectors - 1))))
