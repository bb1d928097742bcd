"""Collaborative filtering with missing entries, encoded per user and per item (pure, no MPI).

Problem (Karakus et al., JMLR 2019, the matrix-factorization experiment: alternating
minimization whose half steps are collections of least-squares problems, each solved on
encoded data). R is observed on Omega (N = ``|Omega|`` entries of an n x d matrix)::

    f(U, V) = 1/(2N) sum_{(i,j) in Omega} (R_ij - u_i . v_j)^2 + lam/2 (||U||_F^2 + ||V||_F^2).

With V fixed, f is a sum of n independent ridge problems, user i's with design V[Omega_i]
(``|Omega_i|`` x r) and target r_i; with U fixed, d problems, one per item. A :class:`Side` holds
one half step's view: the observations sorted by their *owner* (the user for the U-step, the
item for the V-step) and the *other* index of each.

Encoding (:func:`encode_side`): each owner's problem gets its own code, S = diag(S^(1), ...,
S^(n)), S^(i) from :func:`~hpcml.coded.encoders.make_encoder` on ``|Omega_i|`` observations; an
owner with more than ``chunk`` observations is encoded in pieces of at most ``chunk`` (S^(i)
itself block diagonal, each piece its own code) so encoding and every worker product cost
O(chunk) per observation whatever the owner's popularity. Hadamard pieces have power-of-two
lengths (the binary expansion of each chunk), where the subsampled Hadamard code with integer
beta keeps all beta n rows and is an exact tight frame; other lengths would leave a per-owner
bias S^(i).T S^(i) != beta I that no number of awaited workers removes. The row blocks of each
piece go to the m workers (rotated by the piece index, so the load is balanced): worker l holds
the sparse C_l = blockdiag_i(S^(i)_l) and b_l = C_l r, encoded once. S.T S = beta I exactly for
the tight frames (uncoded, replication, ETF, Hadamard with integer beta), so with every worker
awaited the encoded gradient is the uncoded one.

Worker task (:func:`side_gradient`): with the owners' factors W and the fixed factors F,
predictions p_o = w_owner(o) . f_other(o) on the columns C_l touches, e = C_l p - b_l,
q = C_l.T e and the reply sum_{o owned by i} q_o f_other(o) for every owner i, plus ||e||^2.
The master sums the first k replies, scales by 1 / (eta beta N) (eta = k / m), adds lam W and
steps owner i by 1 / L_i, L_i = lambda_max(F_i.T S^(i).T S^(i) F_i) / (beta N) + lam
(:func:`step_sizes`; for a tight frame lambda_max(F_i.T F_i) / N + lam, the smoothness of
owner i's ridge problem).

Reference (:func:`als`): exact alternating least squares on the unencoded data, every owner's
ridge problem solved in closed form, (F_i.T F_i + lam N I) w_i = F_i.T r_i, batched over
owners.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from hpcml.coded.encoders import make_encoder
from hpcml.coded.ratings import Ratings


@dataclasses.dataclass
class Side:
    """Observations sorted by owner: ``owner[o]``, ``other[o]``, ``values[o]``."""

    owner: np.ndarray
    other: np.ndarray
    values: np.ndarray
    n_owner: int

    def owner_matrix(self) -> sp.csr_matrix:
        """P (n_owner x N), P[i, o] = 1 when observation o belongs to owner i."""
        return owner_matrix(self.owner, self.n_owner)


def owner_matrix(owner: np.ndarray, n_owner: int) -> sp.csr_matrix:
    cols = np.arange(len(owner))
    return sp.csr_matrix((np.ones(len(owner)), (owner, cols)), shape=(n_owner, len(owner)))


def sides(r: Ratings) -> tuple[Side, Side]:
    """(U-step side, V-step side): observations sorted by user, then by item."""
    by_user = np.lexsort((r.items, r.users))
    by_item = np.lexsort((r.users, r.items))
    return (Side(r.users[by_user], r.items[by_user], r.values[by_user], r.n),
            Side(r.items[by_item], r.users[by_item], r.values[by_item], r.d))


def predictions(r: Ratings, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.einsum("or,or->o", u[r.users], v[r.items])


def objective(r: Ratings, u: np.ndarray, v: np.ndarray, lam: float) -> float:
    """f(U, V) on the observed entries of ``r``."""
    res = r.values - predictions(r, u, v)
    return float(0.5 * res @ res / len(r) + 0.5 * lam * (np.sum(u**2) + np.sum(v**2)))


def rmse(r: Ratings, u: np.ndarray, v: np.ndarray) -> float:
    return float(np.sqrt(np.mean((r.values - predictions(r, u, v)) ** 2)))


def grams(side: Side, f: np.ndarray, weights: sp.spmatrix | None = None) -> np.ndarray:
    """(n_owner, r, r): F_i.T W_ii F_i for every owner i, with W the block-diagonal
    (N x N) weights (None = identity), F_i = f[other] restricted to owner i."""
    fo = f[side.other]
    wf = fo if weights is None else weights @ fo
    rank = f.shape[1]
    outer = (fo[:, :, None] * wf[:, None, :]).reshape(len(fo), rank * rank)
    g = np.asarray(side.owner_matrix() @ outer).reshape(side.n_owner, rank, rank)
    return 0.5 * (g + g.transpose(0, 2, 1))


def ridge_solve(side: Side, f: np.ndarray, lam: float, n_obs: int) -> np.ndarray:
    """Every owner's exact ridge solution: (F_i.T F_i + lam N I) w_i = F_i.T r_i."""
    rank = f.shape[1]
    lhs = grams(side, f) + lam * n_obs * np.eye(rank)
    rhs = np.asarray(side.owner_matrix() @ (side.values[:, None] * f[side.other]))
    return np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]


def als(r: Ratings, u: np.ndarray, v: np.ndarray, lam: float, tol: float = 1e-12,
        max_sweeps: int = 2000) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Exact ALS from (u, v) until the relative decrease of f is below ``tol`` (or
    ``max_sweeps``): (U, V, f after each sweep, starting with f(u, v))."""
    side_u, side_v = sides(r)
    history = [objective(r, u, v, lam)]
    for _ in range(max_sweeps):
        u = ridge_solve(side_u, v, lam, len(r))
        v = ridge_solve(side_v, u, lam, len(r))
        history.append(objective(r, u, v, lam))
        if history[-2] - history[-1] <= tol * abs(history[-1]):
            break
    return u, v, history


def step_sizes(side: Side, f: np.ndarray, encoded_gram: sp.spmatrix, beta: float, lam: float,
               n_obs: int) -> np.ndarray:
    """1 / L_i per owner, L_i = lambda_max(F_i.T (S^(i).T S^(i)) F_i) / (beta N) + lam, with
    ``encoded_gram`` = S.T S (N x N, block diagonal)."""
    top = np.linalg.eigvalsh(grams(side, f, encoded_gram))[:, -1]
    return 1.0 / (np.maximum(top, 0.0) / (beta * n_obs) + lam)


def encode_side(side: Side, encoder: str, m: int, beta: float, seed: int, *, chunk: int,
                etf_q: int = 13, sparse_nnz: int = 2) -> list[sp.csr_matrix]:
    """C_l (rows_l x N, CSR) for the m workers: S = blockdiag over owners (and pieces of at
    most ``chunk`` observations) of codes ``make_encoder(encoder, size, m, beta, seed_piece)``,
    worker l holding rows ``blocks[(l + piece) % m]`` of each piece's code."""
    bounds = [*np.flatnonzero(np.diff(side.owner, prepend=-1)), len(side.owner)]
    pieces = [piece for a, b in zip(bounds[:-1], bounds[1:], strict=True)
              for piece in _pieces(int(a), int(b), chunk, encoder == "hadamard")]
    parts: list[list[np.ndarray]] = [[] for _ in range(m)]
    offsets = [0] * m
    for piece, (start, end) in enumerate(pieces):
        piece_seed = int(np.random.SeedSequence([seed, piece]).generate_state(1)[0])
        enc = make_encoder(encoder, end - start, m, beta, piece_seed, etf_q=etf_q,
                           sparse_nnz=sparse_nnz)
        s = enc.matrix()
        for worker in range(m):
            block = s[enc.blocks[(worker + piece) % m]]
            rows, cols = np.nonzero(block)
            parts[worker].append(np.stack([rows + offsets[worker], cols + start,
                                           block[rows, cols]]))
            offsets[worker] += block.shape[0]
    out = []
    for worker in range(m):
        rows, cols, vals = np.concatenate(parts[worker], axis=1)
        out.append(sp.csr_matrix((vals, (rows.astype(np.int64), cols.astype(np.int64))),
                                 shape=(offsets[worker], len(side.owner))))
    return out


def _pieces(start: int, end: int, chunk: int, powers_of_two: bool) -> list[tuple[int, int]]:
    """[start, end) cut into pieces of at most ``chunk``; with ``powers_of_two`` every piece
    length is a power of two (the binary expansion of each chunk's length)."""
    out = []
    for a in range(start, end, chunk):
        b = min(a + chunk, end)
        if not powers_of_two:
            out.append((a, b))
            continue
        while a < b:
            size = 1 << ((b - a).bit_length() - 1)
            out.append((a, a + size))
            a += size
    return out


@dataclasses.dataclass
class WorkerSide:
    """One worker's encoded data for one side, restricted to the observations its rows touch:
    ``c`` (rows x s, CSR), ``b = c @ r`` and the owner/other index of each of the s columns."""

    c: sp.csr_matrix
    b: np.ndarray
    owner: np.ndarray
    other: np.ndarray
    n_owner: int

    def __post_init__(self) -> None:
        self.gather = owner_matrix(self.owner, self.n_owner)

    @classmethod
    def from_encoded(cls, c: sp.csr_matrix, side: Side) -> WorkerSide:
        support = np.unique(c.indices)
        return cls(c[:, support].tocsr(), c @ side.values, side.owner[support],
                   side.other[support], side.n_owner)


def side_gradient(data: WorkerSide, w: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, float]:
    """(sum_o q_o f_other(o) per owner (n_owner, r), ||e||^2) with e = C p - b, q = C.T e,
    p_o = w_owner(o) . f_other(o): the gradient of ||C p(W) - b||^2 / 2 in W."""
    fo = f[data.other]
    p = np.einsum("or,or->o", w[data.owner], fo)
    e = data.c @ p - data.b
    q = data.c.T @ e
    grad = np.asarray(data.gather @ (q[:, None] * fo))
    return grad, float(e @ e)
