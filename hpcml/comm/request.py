"""``Request``: a pending non-blocking operation of a :class:`~hpcml.comm.Communicator`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from time import perf_counter, sleep
from typing import Any

from mpi4py import MPI

from hpcml.comm import progress
from hpcml.comm.ledger import ARRIVED, OpTotals
from hpcml.comm.status import Status, new_status
from hpcml.comm.watch import WATCH

_BYTE = MPI.BYTE
_STATUS = MPI.Status()  # filled by one wait/test and read at once (requests are not thread-safe)
_POLL = progress.record()["wait_poll_s"]  # > 0: wait() tests and sleeps instead of MPI_Wait


class Request:
    """A pending non-blocking operation. ``wait``/``test`` finish it: the ledger entry gets one
    call, the bytes sent and received (a receive counts the bytes that arrived), the time this
    rank was blocked in ``wait``/``test`` (``seconds``) and the time from posting to completion
    (``outstanding_seconds``); a staged buffer's result is written back to the caller's. The
    request keeps its buffers alive until it completes. Not collective, not thread-safe.

    ``status`` once complete: for a receive, the sender, tag and size of what arrived; for a
    send, its destination, tag and size; for a collective, its buffer's size (source and tag
    ``ANY_SOURCE``, ``ANY_TAG``)."""

    __slots__ = ("_back", "_blocked", "_entry", "_itemsize", "_keep", "_peer", "_posted",
                 "_received", "_req", "_sent", "_tag", "status")

    def __init__(self, req: MPI.Request, entry: OpTotals, sent: int, received: int,
                 itemsize: int, back: Callable[[], None] | None, keep: tuple[Any, ...],
                 peer: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> None:
        """``received``: bytes the operation fills, or ``ARRIVED`` for a receive (what came);
        ``back``: the staged buffer's write-back; ``keep``: what must outlive the operation;
        ``peer``, ``tag``: as posted (a receive may leave them ``ANY_*``)."""
        self._req, self._entry, self._sent, self._received = req, entry, sent, received
        self._itemsize, self._back, self._keep = itemsize, back, keep
        self._peer, self._tag = peer, tag
        self._posted = perf_counter()
        self._blocked = 0.0
        self.status: Status | None = None

    def _complete(self, st: MPI.Status, blocked_since: float) -> Status:
        now = perf_counter()
        if self._back is not None:
            self._back()
        source, tag, received = self._peer, self._tag, self._received
        if received == ARRIVED:  # a receive: what came, from whom (only MPI knows)
            n = received = st.Get_count(_BYTE)
            if source < 0:
                source = st.Get_source()
            if tag < 0:
                tag = st.Get_tag()
        else:
            n = received or self._sent
        entry = self._entry
        entry.calls += 1
        entry.bytes_sent += self._sent
        entry.bytes_received += received
        entry.seconds += self._blocked + now - blocked_since
        entry.outstanding_seconds += now - self._posted
        self.status = status = new_status(Status, (source, tag, n // self._itemsize, n))
        self._keep = ()
        return status

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def totals(self) -> OpTotals:
        """The ledger accumulator this request completes into."""
        return self._entry

    @property
    def peer(self) -> int:
        """The destination or source as posted (negative: any source, or a collective)."""
        return self._peer

    @property
    def tag(self) -> int:
        """The tag as posted (negative: any tag, or a collective)."""
        return self._tag

    def wait(self) -> Status:
        """Block until complete (a wait the watchdog watches); idempotent. When ranks outnumber
        cores (or ``HPCML_WAIT_POLL`` says so) it tests the request with short sleeps in
        between instead of spinning in ``MPI_Wait`` (:func:`hpcml.comm.progress.wait_poll`)."""
        if self.status is None:
            since = WATCH.since = perf_counter()
            WATCH.what = self
            try:
                if _POLL:
                    while not self._req.Test(_STATUS):
                        sleep(_POLL)
                else:
                    self._req.Wait(_STATUS)
            finally:
                WATCH.what = None
            return self._complete(_STATUS, since)
        return self.status

    def test(self) -> Status | None:
        """Complete the request if it has finished; ``None`` if still pending."""
        if self.status is None:
            since = perf_counter()
            if not self._req.Test(_STATUS):
                self._blocked += perf_counter() - since
                return None
            return self._complete(_STATUS, since)
        return self.status

    def cancel(self) -> None:
        """Cancel a pending receive (e.g. one no longer needed at the end of a run)."""
        if self.status is None:
            self._req.Cancel()
            self._req.Wait()
            self.status = Status(MPI.ANY_SOURCE, MPI.ANY_TAG, 0, 0)
            self._keep = ()

    @staticmethod
    def waitany(requests: Sequence[Request]) -> tuple[int, Status]:
        """Wait for whichever pending request completes first; returns its index and status."""
        pending = [i for i, r in enumerate(requests) if not r.done]
        if not pending:
            raise ValueError("waitany: every request is already complete")
        since = WATCH.since = perf_counter()
        WATCH.what = requests[pending[0]]
        try:
            j = MPI.Request.Waitany([requests[i]._req for i in pending], _STATUS)
        finally:
            WATCH.what = None
        i = pending[j]
        return i, requests[i]._complete(_STATUS, since)

    @staticmethod
    def waitall(requests: Sequence[Request]) -> list[Status]:
        return [r.wait() for r in requests]
