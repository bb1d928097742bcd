"""Fast Walsh-Hadamard transform: ``H @ x`` in O(n log n) without forming the n x n matrix.

``H`` is the unnormalized Sylvester-ordered Hadamard matrix (``H_1 = [1]``,
``H_2n = [[H_n, H_n], [H_n, -H_n]]``), the same matrix as ``scipy.linalg.hadamard(n)``; it is
symmetric and ``H @ H = n I``. Used by the subsampled randomized Hadamard encoder
(Karakus et al., JMLR 2019: fast transforms make encoding O(n log n) per column).

Schedule. ``H_n`` is a Kronecker product of small Hadamard matrices, so its log2(n) butterfly
levels can be grouped and ordered freely: each *pass* applies ``H_r`` (radix r = 16, 4 levels at
once; the first pass takes the remaining 1-3 levels) along the middle axis of the array viewed as
(n / (r h), r, h c), as one batched matrix product with the r x r matrix. Passes whose blocks
(r h rows) exceed a cache-sized chunk (``CACHE_BYTES``) run first, each streaming the array
once (the first from the input into the result, later ones in place through a cache-sized
buffer); then all the others run chunk by chunk on cache-sized slices (ping-pong between two
chunk buffers, the last writing back into the result), one more stream through memory for all
of them. n = 2^20 rows of 8 columns: 3 passes over memory instead of the 16 of a radix-2
transform, and no n x n matrix (nor a second n-row array) is ever formed.
"""

from __future__ import annotations

import numpy as np


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= ``n`` (``n`` >= 1)."""
    if n < 1:
        raise ValueError(f"next_power_of_two: n = {n} must be >= 1")
    return 1 << (n - 1).bit_length()


RADIX = 16
CACHE_BYTES = 1 << 18


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


_H = {1 << j: _sylvester(1 << j) for j in range(RADIX.bit_length())}


def _radices(n: int) -> list[int]:
    """Radix of each pass, in order: all RADIX, the remainder (if any) first."""
    levels, per = n.bit_length() - 1, RADIX.bit_length() - 1
    first = levels % per
    return ([1 << first] if first else []) + [RADIX] * (levels // per)


def _plan(n: int, c: int) -> tuple[list[int], list[int], int, int]:
    """(radix and stride h of every pass, chunk rows, how many passes run chunk by chunk)."""
    radices = _radices(n)
    chunk = min(n, max(RADIX, next_power_of_two(max(1, CACHE_BYTES // (8 * c)))))
    strides = np.cumprod([1, *radices]).tolist()[:-1]
    inner = sum(r * h <= chunk for r, h in zip(radices, strides, strict=True))
    return radices, strides, chunk, inner


def memory_passes(n: int, c: int) -> int:
    """How many times :func:`fwht` streams an (n, c) array through memory (radix 2: log2 n)."""
    radices, _, _, inner = _plan(n, c)
    return (inner > 0) + len(radices) - inner


def _pass(src: np.ndarray, dst: np.ndarray, r: int, h: int) -> None:
    """dst = (I ⊗ H_r ⊗ I_h) src for (rows, c) arrays (rows a multiple of r h). A pass on
    single elements (h c = 1) is one (rows / r, r) x (r, r) product (H_r is symmetric) instead of
    rows / r products of an r-vector, which cost a call each."""
    width = h * src.shape[1]
    if width == 1:
        np.matmul(src.reshape(-1, r), _H[r], out=dst.reshape(-1, r))
    else:
        np.matmul(_H[r], src.reshape(-1, r, width), out=dst.reshape(-1, r, width))


def _pass_in_place(a: np.ndarray, r: int, h: int, buf: np.ndarray) -> None:
    """a = (I ⊗ H_r ⊗ I_h) a, streamed through ``buf`` (r x B) one column block at a time, so
    no second array of a's size is needed."""
    view = a.reshape(-1, r, h * a.shape[1])
    step = buf.shape[1]
    for block in view:
        for start in range(0, block.shape[1], step):
            part = block[:, start:start + step]
            res = buf[:, :part.shape[1]]
            np.matmul(_H[r], part, out=res)
            part[...] = res


def fwht(x: np.ndarray) -> np.ndarray:
    """Return ``H @ x`` for ``x`` of shape (n,) or (n, c) with n a power of two.

    The input is not modified; the result is a new float64 array of the same shape. Memory:
    the result and three cache-sized buffers. Cost: O(n log n) per column (r multiply-adds per
    element for each pass of log2 r levels)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: length {n} is not a power of two (pad with zeros first)")
    src = x.reshape(n, -1)
    c = src.shape[1]
    out = np.empty((n, c))
    radices, strides, chunk, inner = _plan(n, c)
    outer = list(zip(radices[inner:], strides[inner:], strict=True))
    if outer:
        _pass(src, out, *outer[0])
        buf = np.empty((RADIX, max(1, CACHE_BYTES // (8 * RADIX))))
        for r, h in outer[1:]:
            _pass_in_place(out, r, h, buf)
        src = out
    elif inner == 0:
        out[...] = src
    a, b = np.empty((chunk, c)), np.empty((chunk, c))
    for start in range(0, n, chunk):  # a single inner pass on out: numpy buffers the overlap
        part = src[start:start + chunk]
        for i in range(inner):
            nxt = out[start:start + chunk] if i == inner - 1 else (b if part is a else a)
            _pass(part, nxt, radices[i], strides[i])
            part = nxt
    return out.reshape(x.shape)
