"""Fast Walsh-Hadamard transform: ``H @ x`` in O(n log n) without forming the n x n matrix.

``H`` is the unnormalized Sylvester-ordered Hadamard matrix (``H_1 = [1]``,
``H_2n = [[H_n, H_n], [H_n, -H_n]]``), the same matrix as ``scipy.linalg.hadamard(n)``; it is
symmetric and ``H @ H = n I``. Used by the subsampled randomized Hadamard encoder
(Karakus et al., JMLR 2019: fast transforms make encoding O(n log n) per column).
"""

from __future__ import annotations

import numpy as np


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= ``n`` (``n`` >= 1)."""
    if n < 1:
        raise ValueError(f"next_power_of_two: n = {n} must be >= 1")
    return 1 << (n - 1).bit_length()


BASE = 32


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


_KERNEL = _sylvester(BASE)


def fwht(x: np.ndarray) -> np.ndarray:
    """Return ``H @ x`` for ``x`` of shape (n,) or (n, c) with n a power of two.

    The input is not modified; the result is a new float64 array of the same shape. The
    first log2(32) butterfly levels act inside blocks of 32 consecutive rows and are done as
    one small (32 x 32) matrix product per block; the remaining log2(n / 32) levels are
    in-place butterflies on contiguous halves. Cost: O(n log n) per column."""
    a = np.array(x, dtype=np.float64, copy=True)
    n = a.shape[0]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: length {n} is not a power of two (pad with zeros first)")
    flat = a.reshape(n, -1)
    base = min(n, BASE)
    kernel = _KERNEL[:base, :base] if base == BASE else _sylvester(base)
    blocks = flat.reshape(n // base, base, flat.shape[1])
    blocks[...] = np.matmul(kernel, blocks)
    h = base
    while h < n:
        view = flat.reshape(n // (2 * h), 2, h, flat.shape[1])
        top = view[:, 0].copy()
        view[:, 0] += view[:, 1]
        np.subtract(top, view[:, 1], out=view[:, 1])
        h *= 2
    return a
