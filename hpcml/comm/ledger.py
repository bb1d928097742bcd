"""The communication ledger: per-operation calls, bytes and seconds of this rank.

Byte convention (exact, and what the tests check): ``sent`` is the size of the buffer this rank
hands to MPI as input, ``received`` the size of the buffer MPI fills for it. So for P ranks and an
n-byte buffer: Allreduce sends n and receives n; Allgather sends n and receives P*n; Bcast sends n
at the root and receives n elsewhere; Isend sends its buffer; a receive counts the bytes that
actually arrived. Staged 16-bit reductions count the float32 bytes actually moved.

Bound (persistent) operations keep their own :class:`BoundTotals` (a completion costs two adds
instead of four), which the ledger folds into the op's totals whenever it is read.

Time convention: ``seconds`` is the time this rank was *blocked* on the operation (inside the
blocking call; for a non-blocking request, inside ``wait``/``test``), i.e. what communication
cost the caller. ``outstanding_seconds`` is, for non-blocking requests only, the time from
posting to completion: the span in which communication could overlap computation. A request
that finished while the rank computed shows a long ``outstanding_seconds`` and a ``seconds``
near zero; blocking calls record ``outstanding_seconds = 0``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(slots=True)
class OpTotals:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    outstanding_seconds: float = 0.0

    def add(self, sent: int, received: int, seconds: float, outstanding: float = 0.0) -> None:
        self.calls += 1
        self.bytes_sent += sent
        self.bytes_received += received
        self.seconds += seconds
        self.outstanding_seconds += outstanding


ARRIVED = -1  # BoundTotals.received of a receive: count the bytes that actually arrived


@dataclasses.dataclass(slots=True)
class BoundTotals:
    """The counts of one bound operation: ``runs`` completions, of ``sent`` bytes sent and
    ``received`` bytes received each (``ARRIVED``: a receive adds the bytes that arrived to
    ``arrived`` instead), ``seconds`` blocked and ``outstanding_seconds`` in flight."""

    sent: int
    received: int
    runs: int = 0
    arrived: int = 0
    seconds: float = 0.0
    outstanding_seconds: float = 0.0

    @property
    def bytes_sent(self) -> int:
        return self.runs * self.sent

    @property
    def bytes_received(self) -> int:
        return self.arrived if self.received == ARRIVED else self.runs * self.received

    def fold_into(self, totals: OpTotals) -> None:
        """Add these counts to ``totals``."""
        totals.calls += self.runs
        totals.bytes_sent += self.bytes_sent
        totals.bytes_received += self.bytes_received
        totals.seconds += self.seconds
        totals.outstanding_seconds += self.outstanding_seconds

    def reset(self) -> None:
        self.runs = self.arrived = 0
        self.seconds = self.outstanding_seconds = 0.0


class Ledger:
    """Accumulates :class:`OpTotals` per operation name for one rank. Not thread-safe.

    An op's :class:`OpTotals` object, once created, lives as long as the ledger (``reset`` zeroes
    it in place), so a communicator can keep it and add to it on its hot path without a lookup.
    """

    def __init__(self) -> None:
        self.ops: dict[str, OpTotals] = {}
        self.bound: list[tuple[str, BoundTotals]] = []

    def entry(self, op: str) -> OpTotals:
        """The accumulator of ``op``, created at zero if new."""
        totals = self.ops.get(op)
        if totals is None:
            totals = self.ops[op] = OpTotals()
        return totals

    def record(self, op: str, sent: int, received: int, seconds: float,
               outstanding: float = 0.0) -> None:
        """Add one call of ``op``: ``seconds`` blocked, ``outstanding`` from posting to
        completion (non-blocking requests only)."""
        self.entry(op).add(sent, received, seconds, outstanding)

    def bind(self, op: str, sent: int, received: int) -> BoundTotals:
        """Counters for one bound operation of ``op`` (see :class:`BoundTotals`), included in
        every read of the ledger until :meth:`unbind`."""
        counts = BoundTotals(sent, received)
        self.bound.append((op, counts))
        return counts

    def unbind(self, counts: BoundTotals) -> None:
        """Fold a bound operation's counts into its op's totals and stop tracking it."""
        for i, (op, known) in enumerate(self.bound):
            if known is counts:
                counts.fold_into(self.entry(op))
                del self.bound[i]
                return

    def name_of(self, totals: OpTotals | BoundTotals) -> str | None:
        """The op name ``totals`` accumulates under (None when it is not this ledger's). Safe
        to call from another thread than the one that communicates (the copy is made in one
        step under the GIL)."""
        for op, known in [*self.ops.items(), *self.bound]:
            if known is totals:
                return op
        return None

    def reset(self) -> None:
        for totals in self.ops.values():
            totals.calls = totals.bytes_sent = totals.bytes_received = 0
            totals.seconds = totals.outstanding_seconds = 0.0
        for _, counts in self.bound:
            counts.reset()

    def merged(self) -> dict[str, OpTotals]:
        """Every op's totals with the bound operations' counts folded in (copies)."""
        out = {op: dataclasses.replace(t) for op, t in self.ops.items()}
        for op, counts in self.bound:
            counts.fold_into(out.setdefault(op, OpTotals()))
        return out

    def totals(self) -> dict[str, dict[str, Any]]:
        """``{op: {calls, bytes_sent, bytes_received, seconds, outstanding_seconds}}`` of the ops
        called since the last ``reset``, sorted by op name."""
        return {op: dataclasses.asdict(t) for op, t in sorted(self.merged().items()) if t.calls}

    def bytes_sent(self) -> int:
        return (sum(t.bytes_sent for t in self.ops.values())
                + sum(counts.bytes_sent for _, counts in self.bound))

    def bytes_received(self) -> int:
        return (sum(t.bytes_received for t in self.ops.values())
                + sum(counts.bytes_received for _, counts in self.bound))


def format_table(per_rank: list[dict[str, dict[str, Any]]]) -> str:
    """A plain-text table of per-op totals summed over ranks (``per_rank[r]`` = rank r's
    :meth:`Ledger.totals`), with the slowest rank's blocked seconds and, for non-blocking
    requests, its seconds in flight."""
    ops = sorted({op for totals in per_rank for op in totals})
    lines = [f"{'op':<28}{'calls':>10}{'MiB sent':>14}{'MiB recv':>14}{'max s/rank':>12}"
             f"{'in flight':>12}"]
    for op in ops:
        rows = [t[op] for t in per_rank if op in t]
        calls = sum(r["calls"] for r in rows)
        sent = sum(r["bytes_sent"] for r in rows) / 2**20
        recv = sum(r["bytes_received"] for r in rows) / 2**20
        secs = max(r["seconds"] for r in rows)
        flight = max(r.get("outstanding_seconds", 0.0) for r in rows)
        lines.append(f"{op:<28}{calls:>10}{sent:>14.3f}{recv:>14.3f}{secs:>12.4f}"
                     + (f"{flight:>12.4f}" if flight else f"{'':>12}"))
    return "\n".join(lines)


def to_json(per_rank: list[dict[str, dict[str, Any]]]) -> str:
    return json.dumps({"ranks": per_rank}, indent=1)
