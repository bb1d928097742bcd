"""Per-rank accounting of the bytes allocated for the gradient exchange."""

from __future__ import annotations


class ExchangeMemory:
    """Bytes currently allocated for the exchange on this rank, and the peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def alloc(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def free(self, nbytes: int) -> None:
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current
