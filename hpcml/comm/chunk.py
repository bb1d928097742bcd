"""Pure arithmetic of who owns what: no communication, valid for any rank."""

from __future__ import annotations


def chunk_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Half-open range [start, stop) of ``n`` items owned by ``rank`` of ``size`` in a balanced
    block distribution: the first ``n % size`` ranks own one extra item."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a communicator of size {size}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def chunk_counts(n: int, size: int) -> list[int]:
    """Items per rank for :func:`chunk_bounds`; sums to ``n``."""
    return [b - a for a, b in (chunk_bounds(n, size, r) for r in range(size))]
