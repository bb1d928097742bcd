"""Encoding matrices S ((N x n), N ~ beta n) and their per-worker row blocks S_i.

Karakus et al. (NeurIPS 2017; JMLR 2019, arXiv 1803.05397) encode the data X, y as SX, Sy and
give worker i of m the rows ``blocks[i]`` of the result. Every encoder here is a tight frame or
close to one: S.T @ S = beta I exactly (uncoded, replication, Hadamard when N = L * 2^j, ETF) or
in expectation (Gaussian, sparse, subsampled Hadamard). ``beta`` is that frame constant.

An encoder is pure and deterministic given ``seed``; ``apply`` maps any (n, c) column chunk to
its (N, c) encoding, so data are encoded a few columns at a time (see :mod:`hpcml.coded.shards`)
and never need S in memory except where S is inherently dense (Gaussian, generated in row
blocks from the seed). Hadamard uses the fast Walsh-Hadamard transform, O(n log n) per column.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from hpcml.coded.etf import paley_etf
from hpcml.coded.fwht import fwht, next_power_of_two
from hpcml.comm.chunk import chunk_bounds

ENCODERS = ("uncoded", "replication", "gaussian", "hadamard", "etf", "sparse")


class Encoder:
    """S of shape (rows, n) split into ``m`` worker row blocks (``blocks[i]`` = index array)."""

    kind = "base"

    def __init__(self, n: int, m: int, beta: float, seed: int) -> None:
        if n < 1 or m < 1:
            raise ValueError(f"encoder: need n >= 1 and m >= 1, got n={n}, m={m}")
        if beta < 1:
            raise ValueError(f"encoder: redundancy beta = {beta} < 1")
        self.n, self.m, self.seed = n, m, seed
        self.beta = float(beta)
        self.rows = self._rows()
        self.blocks = [np.arange(*chunk_bounds(self.rows, m, i)) for i in range(m)]

    def _rows(self) -> int:
        return max(self.n, int(round(self.beta * self.n)))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """S @ x for x of shape (n, c); returns (rows, c) float64."""
        raise NotImplementedError

    def apply_block(self, x: np.ndarray, worker: int) -> np.ndarray:
        """S_worker @ x: the rows of the encoding that worker ``worker`` stores."""
        return self.apply(x)[self.blocks[worker]]

    def matrix(self) -> np.ndarray:
        """S as a dense matrix (tests and small problems only)."""
        return self.apply(np.eye(self.n))

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != self.n:
            raise ValueError(f"{self.kind}: expected shape ({self.n}, c), got {x.shape}")
        return x


class Uncoded(Encoder):
    """S = I (beta = 1): worker i stores a contiguous slice of the raw rows."""

    kind = "uncoded"

    def __init__(self, n: int, m: int, beta: float = 1.0, seed: int = 0) -> None:
        if beta != 1:
            raise ValueError(f"uncoded: beta must be 1, got {beta}")
        super().__init__(n, m, beta, seed)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self._check(x).copy()


class Replication(Encoder):
    """Each of m / r data partitions is stored on r workers (beta = r): worker w holds
    partition w mod (m / r). S.T @ S = r I exactly."""

    kind = "replication"

    def __init__(self, n: int, m: int, beta: float = 2.0, seed: int = 0) -> None:
        r = int(beta)
        if r != beta or r < 1 or m % r:
            raise ValueError(f"replication: beta = {beta} must be an integer factor r that "
                             f"divides the number of workers m = {m}")
        super().__init__(n, m, beta, seed)
        groups = m // r
        parts = [np.arange(*chunk_bounds(n, groups, g)) for g in range(groups)]
        self.source = np.concatenate([parts[w % groups] for w in range(m)])
        sizes = [len(parts[w % groups]) for w in range(m)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self.blocks = [np.arange(starts[w], starts[w + 1]) for w in range(m)]

    def _rows(self) -> int:
        return int(self.beta) * self.n

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self._check(x)[self.source]


class Gaussian(Encoder):
    """i.i.d. N(0, 1/n) entries, so E[S.T @ S] = (rows / n) I; rows are generated in blocks
    of ``block_rows`` from (seed, block) so S is never held whole."""

    kind = "gaussian"
    block_rows = 2048

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        out = np.empty((self.rows, x.shape[1]))
        for b, start in enumerate(range(0, self.rows, self.block_rows)):
            stop = min(start + self.block_rows, self.rows)
            rng = np.random.default_rng([self.seed, b])
            out[start:stop] = rng.standard_normal((stop - start, self.n)) @ x / np.sqrt(self.n)
        return out


class Hadamard(Encoder):
    """Subsampled randomized Hadamard transform. With n2 = 2^ceil(log2 n) and
    L = ceil(rows / n2) independent sign diagonals D_l, the stacked orthogonal transform
    [H D_1; ...; H D_L] / sqrt(n2) (rows zero-padded to n2) is restricted to ``rows`` randomly
    chosen rows and scaled by sqrt(n2 / n): E[S.T @ S] = (rows / n) I, exact when rows = L n2.
    Each column costs L n2 log2(n2) operations (FWHT), never an n2 x n2 matrix."""

    kind = "hadamard"

    def __init__(self, n: int, m: int, beta: float = 2.0, seed: int = 0) -> None:
        super().__init__(n, m, beta, seed)
        self.n2 = next_power_of_two(n)
        self.copies = math.ceil(self.rows / self.n2)
        rng = np.random.default_rng([seed, 1])
        self.signs = rng.choice([-1.0, 1.0], size=(self.copies, self.n2))
        self.keep = rng.permutation(self.copies * self.n2)[: self.rows]

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        padded = np.zeros((self.n2, x.shape[1]))
        padded[: self.n] = x
        full = np.concatenate([fwht(s[:, None] * padded) for s in self.signs])
        return full[self.keep] / np.sqrt(self.n)


class ETF(Encoder):
    """Block-diagonal Paley equiangular tight frame (beta = 2): the rows are split into
    blocks of d = (q+1)/2 (the last zero-padded); each block is encoded by sqrt(2) F.T
    ((q+1) x d, unit-norm rows, F from :func:`paley_etf`), so S.T @ S = 2 I exactly. The
    encoded rows are shuffled (seeded) so every worker holds a share of every ETF block."""

    kind = "etf"

    def __init__(self, n: int, m: int, beta: float = 2.0, seed: int = 0, q: int = 13) -> None:
        if beta != 2:
            raise ValueError(f"etf: the Paley ETF has redundancy beta = 2, got {beta}")
        self.q = q
        self.frame = np.sqrt(2.0) * paley_etf(q).T
        self.d = (q + 1) // 2
        self.nblocks = math.ceil(n / self.d)
        super().__init__(n, m, beta, seed)
        block, row = np.divmod(np.arange(self.rows), q + 1)
        owner = (row + block) % m
        self.blocks = [np.flatnonzero(owner == w) for w in range(m)]

    def _rows(self) -> int:
        return self.nblocks * (self.q + 1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        padded = np.zeros((self.nblocks * self.d, x.shape[1]))
        padded[: self.n] = x
        out = np.einsum("rd,bdc->brc", self.frame, padded.reshape(self.nblocks, self.d, -1))
        return out.reshape(self.rows, -1)


class Sparse(Encoder):
    """Each input row is added, with a random sign, to one random encoded row in each of
    ``nnz`` distinct workers' blocks, scaled by sqrt(beta / nnz) (a sparse embedding spread
    over workers, so losing fewer than ``nnz`` workers never loses a row): the columns of S
    have squared norm beta, E[S.T @ S] = beta I, and encoding costs nnz operations per entry."""

    kind = "sparse"

    def __init__(self, n: int, m: int, beta: float = 2.0, seed: int = 0, nnz: int = 2) -> None:
        super().__init__(n, m, beta, seed)
        nnz = min(nnz, m)
        rng = np.random.default_rng([seed, 3])
        workers = np.argsort(rng.random((n, m)), axis=1)[:, :nnz]
        starts = np.array([b[0] for b in self.blocks])
        sizes = np.array([len(b) for b in self.blocks])
        rows = starts[workers] + (rng.random((n, nnz)) * sizes[workers]).astype(int)
        vals = rng.choice([-1.0, 1.0], size=(n, nnz)) * np.sqrt(self.beta / nnz)
        cols = np.repeat(np.arange(n), nnz)
        self.s = sp.csr_matrix((vals.ravel(), (rows.ravel(), cols)), shape=(self.rows, n))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.s @ self._check(x))


def make_encoder(kind: str, n: int, m: int, beta: float, seed: int = 0, *, etf_q: int = 13,
                 sparse_nnz: int = 2) -> Encoder:
    """The encoder named ``kind`` for n data rows, m workers and redundancy ``beta``.
    Raises ValueError for a combination the encoder cannot build."""
    if kind == "uncoded":
        return Uncoded(n, m, beta, seed)
    if kind == "replication":
        return Replication(n, m, beta, seed)
    if kind == "gaussian":
        return Gaussian(n, m, beta, seed)
    if kind == "hadamard":
        return Hadamard(n, m, beta, seed)
    if kind == "etf":
        return ETF(n, m, beta, seed, q=etf_q)
    if kind == "sparse":
        return Sparse(n, m, beta, seed, nnz=sparse_nnz)
    raise ValueError(f"unknown encoder {kind!r}; choose from {', '.join(ENCODERS)}")


def subset_spectrum(s: np.ndarray, blocks: list[np.ndarray], subset: list[int],
                    beta: float) -> tuple[float, float]:
    """Extreme eigenvalues of S_A.T S_A / (eta beta), eta = |A| / m, for the workers in
    ``subset``: the quantities 1 - eps and 1 + eps of the paper's
    subset condition (1 - eps) I <= S_A.T S_A / (eta beta) <= (1 + eps) I."""
    rows = np.concatenate([blocks[i] for i in subset])
    eta = len(subset) / len(blocks)
    sa = s[rows]
    vals = np.linalg.eigvalsh(sa.T @ sa / (eta * beta))
    return float(vals[0]), float(vals[-1])
