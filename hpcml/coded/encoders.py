"""Encoding matrices S ((N x n), N ~ beta n) and their per-worker row blocks S_i.

Karakus et al. (NeurIPS 2017; JMLR 2019, arXiv 1803.05397) encode the data X, y as SX, Sy and
give worker i of m the rows ``blocks[i]`` of the result. Every encoder here is a tight frame or
close to one: S.T @ S = beta I exactly (uncoded, replication, Hadamard at any n, ETF) or only
in expectation (Gaussian, sparse: never tight, so even with every worker awaited their solution
differs from the uncoded one; see :func:`frame_note`). ``beta`` is that frame constant.

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
    """Randomized Hadamard code, an exact tight frame at any n. The n rows are zero-padded to
    whole blocks of B = min(2^ceil(log2 n), ``max_block``) rows (one block up to 4096 rows:
    mixing over the whole block keeps every k-of-m subset well conditioned, where blocks of
    16-64 rows lose rank for a quarter of the subsets; beyond, the padding stays under 4096
    rows); each block x_b gets L = beta (a whole
    number) independent random sign diagonals D_{b,l} and is encoded as
    [H D_{b,1}; ...; H D_{b,L}] x_b / sqrt(B): L B rows whose restriction to the block's real
    rows has orthonormal columns per copy, so S.T @ S = beta I exactly (the effective beta
    every solver uses); ``rows / n`` = L ceil(n / B) B / n >= beta is the storage
    redundancy. A block's L B rows are shuffled (seeded) and dealt round-robin to the m
    workers, rotated by the block index, so
    any k workers hold k / m of every block (full rank whenever k beta >= m). Each column
    costs L n_pad log2(B) operations (FWHT), never a B x B matrix."""

    kind = "hadamard"
    max_block = 4096

    def __init__(self, n: int, m: int, beta: float = 2.0, seed: int = 0) -> None:
        if beta != int(beta):
            raise ValueError(f"hadamard: beta = {beta} must be a whole number of sign copies "
                             "(the code is then an exact tight frame)")
        self.block = min(next_power_of_two(n), self.max_block)
        self.nblocks = math.ceil(n / self.block)
        super().__init__(n, m, beta, seed)
        copies = int(self.beta)
        rng = np.random.default_rng([seed, 1])
        self.signs = rng.choice([-1.0, 1.0], size=(copies, self.nblocks * self.block))
        per = copies * self.block
        self.shuffle = np.concatenate([b * per + rng.permutation(per)
                                       for b in range(self.nblocks)])
        block, row = np.divmod(np.arange(self.rows), per)
        owner = (row + block) % m
        self.blocks = [np.flatnonzero(owner == w) for w in range(m)]

    def _rows(self) -> int:
        return int(self.beta) * self.nblocks * self.block

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        c, copies, size = x.shape[1], int(self.beta), self.block
        padded = np.zeros((self.nblocks * size, c))
        padded[: self.n] = x
        signed = self.signs[:, :, None] * padded[None]
        out = np.empty((self.nblocks, copies, size, c))
        for b in range(self.nblocks):
            part = signed[:, b * size:(b + 1) * size].transpose(1, 0, 2).reshape(size, -1)
            out[b] = fwht(part).reshape(size, copies, c).transpose(1, 0, 2)
        return out.reshape(self.rows, c)[self.shuffle] / np.sqrt(size)


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


TIGHT = ("uncoded", "replication", "hadamard", "etf")


def frame_note(kind: str, beta: float, enc: Encoder | None = None) -> str:
    """One line for the run log: whether S.T S = beta I exactly (with the Hadamard code's
    padding when ``enc`` is given)."""
    if kind not in TIGHT:
        return (f"{kind} code: S.T S = beta I only in expectation (not a tight frame), so even "
                f"with every worker awaited the solution differs from the uncoded one")
    note = f"{kind} code: tight frame, S.T S = {beta:g} I exactly"
    if isinstance(enc, Hadamard):
        blocks = f"{enc.nblocks} zero-padded block{'s' if enc.nblocks > 1 else ''}"
        note += (f" ({blocks} of {enc.block} rows: {enc.rows} encoded "
                 f"rows for n = {enc.n}, storage redundancy {enc.rows / enc.n:.3f})")
    return note


def subset_spectrum(s: np.ndarray, blocks: list[np.ndarray], subset: list[int],
                    beta: float) -> tuple[float, float]:
    """Extreme eigenvalues of S_A.T S_A / (eta beta), eta = ``|A|`` / m, for the workers in
    ``subset``: the quantities 1 - eps and 1 + eps of the paper's
    subset condition (1 - eps) I <= S_A.T S_A / (eta beta) <= (1 + eps) I."""
    rows = np.concatenate([blocks[i] for i in subset])
    eta = len(subset) / len(blocks)
    sa = s[rows]
    vals = np.linalg.eigvalsh(sa.T @ sa / (eta * beta))
    return float(vals[0]), float(vals[-1])
