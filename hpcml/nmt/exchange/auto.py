"""``auto``: per-tensor choice between sparse allgather and dense allreduce from a cost model.

For a gradient of ``rows`` rows of ``b`` bytes whose largest per-rank sparse payload has ``n``
rows, on P ranks (bandwidth terms of the ring algorithms of Thakur, Rabenseifner & Gropp 2005,
the argument arXiv 1905.04035 makes for replacing the gather):

- allgather receives ``(P - 1) n (b + 8)`` bytes per rank (each of the other ranks' rows plus an
  int64 index) and needs ``P n (b + 8)`` bytes of receive buffer;
- allreduce moves ``2 (P - 1) / P x rows x b`` bytes per rank with a ``rows x b`` buffer.

:func:`allgather_cheaper` picks allgather only when it moves strictly fewer bytes *and* needs no
more buffer memory; at P = 1 nothing moves and the dense path (no payload copies) is taken.
The density is measured every step (the max over ranks of the local number of rows), so all
ranks decide alike, and the exchange logs every change of decision.
"""

from __future__ import annotations

from hpcml.nmt.exchange.strategy import ALLGATHER, ALLREDUCE, Strategy


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


class Auto(Strategy):
    """Sparse-capable tensors exchanged one by one, by the cheaper method each step."""

    name = "auto"

    def fused(self, sparse: bool) -> bool:
        return not sparse

    def choose(self, nnz_max: int, rows: int, row_bytes: int, size: int) -> str:
        return ALLGATHER if allgather_cheaper(nnz_max, rows, row_bytes, size) else ALLREDUCE
