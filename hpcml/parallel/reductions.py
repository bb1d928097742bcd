"""How each gradient travels in data-parallel training: the ``reduction`` strategies of
:class:`~hpcml.parallel.DistributedOptimizer` (arXiv 1905.04035).

A :class:`Reduction` answers two questions for the one mechanism in
:mod:`hpcml.parallel.data_parallel`: does a parameter go into the fused dense buckets
(:meth:`Reduction.fused`), and, for a parameter kept out of them (a sparse gradient), does it
travel by sparse allgather or dense allreduce this step (:meth:`Reduction.choose`).

- ``dense_allreduce``: every gradient, the assumed-sparse embedding's included, is densified into
  the fused buckets and reduced by non-blocking allreduce from the gradient hooks, so the exchange
  buffers are the model's size on every rank, independent of P (the fix of arXiv 1905.04035, the
  Horovod ``sparse_as_dense`` modification).
- ``sparse_allgather``: sparse gradients by allgather of their rows, dense ones in the buckets
  (Horovod's default for TensorFlow ``IndexedSlices``, the baseline the paper replaced).
- ``auto``: sparse gradients one by one, by whichever of the two moves fewer bytes this step.

Cost model of ``auto`` for a gradient of ``rows`` rows of ``b`` bytes whose largest per-rank
sparse payload has ``n`` rows, on P ranks (bandwidth terms of the ring algorithms of Thakur,
Rabenseifner & Gropp 2005): allgather receives ``(P - 1) n (b + 8)`` bytes per rank (each other
rank's rows plus an int64 index) into a ``P n (b + 8)``-byte buffer; allreduce moves
``2 (P - 1) / P x rows x b`` bytes with a ``rows x b`` buffer. :func:`allgather_cheaper` picks
allgather only when it moves strictly fewer bytes *and* needs no more memory; at P = 1 nothing
moves and the dense path is taken. Pure functions; no MPI.
"""

from __future__ import annotations

ALLREDUCE, ALLGATHER = "allreduce", "allgather"


class Reduction:
    """How each tensor travels; subclasses override :meth:`fused` and :meth:`choose`."""

    name = "reduction"

    def fused(self, sparse: bool) -> bool:
        """Whether a parameter (whose gradient is sparse when ``sparse``) goes in the buckets."""
        return True

    def choose(self, nnz_max: int, rows: int, row_bytes: int, size: int) -> str:
        """``ALLGATHER`` or ``ALLREDUCE`` for a sparse gradient of ``rows`` x ``row_bytes``
        whose largest per-rank payload has ``nnz_max`` rows, on ``size`` ranks."""
        return ALLREDUCE


class DenseAllreduce(Reduction):
    """All gradients in fused dense buckets."""

    name = "dense_allreduce"


class SparseAllgather(Reduction):
    """Sparse gradients by allgather; dense ones in fused allreduce buckets."""

    name = "sparse_allgather"

    def fused(self, sparse: bool) -> bool:
        return not sparse

    def choose(self, nnz_max: int, rows: int, row_bytes: int, size: int) -> str:
        return ALLGATHER


def allgather_bytes(nnz: int, row_bytes: int, size: int) -> int:
    """Bytes one rank receives in a ring allgather of ``nnz`` rows (+ int64 index) per rank."""
    return (size - 1) * nnz * (row_bytes + 8)


def allreduce_bytes(rows: int, row_bytes: int, size: int) -> float:
    """Bytes one rank sends (= receives) in a ring allreduce of a ``rows x row_bytes`` tensor."""
    return 2 * (size - 1) / size * rows * row_bytes


def allgather_cheaper(nnz: int, rows: int, row_bytes: int, size: int) -> bool:
    """True when the sparse allgather moves fewer bytes and needs no more memory."""
    if size == 1:
        return False
    fewer_bytes = allgather_bytes(nnz, row_bytes, size) < allreduce_bytes(rows, row_bytes, size)
    return fewer_bytes and size * nnz * (row_bytes + 8) <= rows * row_bytes


class Auto(Reduction):
    """Sparse gradients exchanged one by one, by the cheaper method each step."""

    name = "auto"

    def fused(self, sparse: bool) -> bool:
        return not sparse

    def choose(self, nnz_max: int, rows: int, row_bytes: int, size: int) -> str:
        return ALLGATHER if allgather_cheaper(nnz_max, rows, row_bytes, size) else ALLREDUCE


REDUCTIONS: dict[str, type[Reduction]] = {r.name: r for r in (DenseAllreduce, SparseAllgather,
                                                              Auto)}


def make_reduction(name: str) -> Reduction:
    """The strategy called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return REDUCTIONS[name]()
    except KeyError:
        raise ValueError(f"reduction {name!r} is not one of {sorted(REDUCTIONS)}") from None
