"""The interface of a gradient-exchange strategy: which tensors are fused, and how each
separate tensor travels."""

from __future__ import annotations

ALLREDUCE, ALLGATHER = "allreduce", "allgather"


class Strategy:
    """How each tensor travels; subclasses override :meth:`fused` and :meth:`choose`."""

    name = "strategy"

    def fused(self, sparse: bool) -> bool:
        """Whether a parameter (whose gradient is sparse when ``sparse``) goes in the buckets."""
        return True

    def choose(self, nnz_max: int, rows: int, row_bytes: int, size: int) -> str:
        """``ALLGATHER`` or ``ALLREDUCE`` for a sparse gradient of ``rows`` x ``row_bytes``
        whose largest per-rank payload has ``nnz_max`` rows, on ``size`` ranks."""
        return ALLREDUCE
