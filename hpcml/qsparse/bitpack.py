"""Exact-width bit packing: the wire format of every compressed payload.

A payload is a sequence of *fields*; a field is ``n`` unsigned integers of ``w`` bits each. The
fields are written back to back, least significant bit first, into ``ceil(total_bits / 8)``
bytes, so the bytes an MPI message carries are the payload's exact bit count rounded up to a
whole byte, once. Pure numpy, no MPI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def index_bits(d: int) -> int:
    """Bits to address one of ``d`` coordinates: ``ceil(log2 d)`` (0 when ``d == 1``)."""
    if d < 1:
        raise ValueError(f"index_bits: dimension must be >= 1, got {d}")
    return (d - 1).bit_length()


def _check(values: np.ndarray, width: int) -> np.ndarray:
    v = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    if not 0 <= width <= 64:
        raise ValueError(f"pack: field width {width} is not in 0..64")
    if width < 64 and v.size and int(v.max()) >> width:
        raise ValueError(f"pack: value {int(v.max())} does not fit in {width} bits")
    return v


def pack(fields: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """Pack ``(values, width)`` fields into bytes; returns ``(uint8 buffer, total bits)``.

    ``values`` are non-negative integers below ``2**width`` (checked); ``width`` is 0..64. A
    field whose width is a whole number of bytes and that starts on a byte boundary is copied
    as little-endian bytes (the same bits, no per-bit work): put such fields (raw floats) first.
    """
    out: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    total = 0
    for values, width in fields:
        native = np.asarray(values)
        if native.dtype.kind == "u" and native.dtype.itemsize * 8 == width and total % 8 == 0:
            if pending:
                out.append(np.packbits(np.concatenate(pending), bitorder="little"))
                pending = []
            out.append(np.ascontiguousarray(native, dtype=native.dtype.newbyteorder("<"))
                       .view(np.uint8).ravel())
            total += native.size * width
            continue
        v = _check(values, width)
        if width % 8 == 0 and total % 8 == 0:
            if pending:
                out.append(np.packbits(np.concatenate(pending), bitorder="little"))
                pending = []
            out.append(v.astype("<u8").view(np.uint8).reshape(-1, 8)[:, : width // 8].ravel())
        else:
            shifts = np.arange(width, dtype=np.uint64)
            pending.append(v.astype(np.uint8) if width == 1 else
                           ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel())
        total += v.size * width
    if pending:
        out.append(np.packbits(np.concatenate(pending), bitorder="little"))
    return (np.concatenate(out) if out else np.zeros(0, dtype=np.uint8)), total


def unpack(buf: np.ndarray, layout: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of :func:`pack`: ``layout`` is ``(count, width)`` per field; returns one unsigned
    integer array per field (``uint8/16/32`` for those exact widths, else ``uint64``).
    Raises ``ValueError`` when ``buf`` is not exactly the packed size."""
    total = sum(n * w for n, w in layout)
    if buf.size != (total + 7) // 8:
        raise ValueError(f"unpack: {buf.size} bytes, but the layout needs {(total + 7) // 8}")
    buf = np.asarray(buf, dtype=np.uint8)
    out, pos = [], 0
    for n, w in layout:
        if w in (8, 16, 32, 64) and pos % 8 == 0:
            chunk = buf[pos // 8: (pos + n * w) // 8]
            out.append(chunk.view(f"<u{w // 8}").astype(f"=u{w // 8}"))
        elif w % 8 == 0 and pos % 8 == 0:
            raw = np.zeros((n, 8), dtype=np.uint8)
            raw[:, : w // 8] = buf[pos // 8: (pos + n * w) // 8].reshape(n, w // 8)
            out.append(raw.view("<u8").ravel().astype(np.uint64))
        else:
            first, last = pos // 8, -(-(pos + n * w) // 8)
            bits = np.unpackbits(buf[first:last], bitorder="little")[pos - 8 * first:]
            block = bits[: n * w].reshape(n, w).astype(np.uint64)
            out.append((block << np.arange(w, dtype=np.uint64)).sum(axis=1, dtype=np.uint64))
        pos += n * w
    return out


def float_field(x: np.ndarray) -> tuple[np.ndarray, int]:
    """A float32/float64 array as a field of its raw IEEE words (32 or 64 bits each)."""
    x = np.ascontiguousarray(x)
    words = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
    if x.dtype not in words:
        raise TypeError(f"float_field: float32 or float64 expected, got {x.dtype}")
    return x.view(words[x.dtype]), x.dtype.itemsize * 8


def field_floats(words: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`float_field`."""
    dtype = np.dtype(dtype)
    unsigned = np.uint32 if dtype.itemsize == 4 else np.uint64
    return words.astype(unsigned).view(dtype)
