"""Persistent operations: a buffer bound to an MPI operation once, started many times.

A program that moves the same buffer again and again (a receive buffer reused every step, a
gradient bucket, a halo) can bind it once with ``Communicator.Send_init`` / ``Recv_init`` /
``Allreduce_init`` (MPI_Send_init, MPI_Recv_init and MPI-4's MPI_Allreduce_init, mpi4py's
names). The buffer's MPI description, the peer, tag and operation are fixed at binding; each
``start()`` posts the operation again and ``wait()`` completes it, or ``run()`` does both (the
blocking form). That saves what a call on a plain buffer pays every time: describing the buffer
(for a torch tensor, five attribute reads that check it has not changed in place) and MPI's own
argument processing.

The contract is MPI's: the operation is bound to the buffer's *memory*. Write the data to send
into that tensor or array in place (``t.copy_(x)``, ``a[:] = x``) and read received data from
it. The handle keeps the bound memory alive, and every start checks that a bound torch
storage still holds it: a tensor re-allocated in place (``resize_`` to a larger size,
``untyped_storage().resize_``) would leave MPI writing into freed memory, so the start raises
``RuntimeError`` instead (bind the buffer again). A tensor pointed at other memory (``set_``,
``.data =``) is no longer the bound buffer; the bound memory stays alive and in use.

The ledger stays exact: every completion adds one call under the op's name (``Send_init``,
``Recv_init``, ``Allreduce_init``) on the communicator, the bytes moved (for a receive, the
bytes that arrived), the seconds this rank was blocked in ``run``/``wait``/``test`` and, for
``start``/``wait`` pairs, the seconds from start to completion (``outstanding_seconds``). A
handle counts into its own :class:`~hpcml.comm.ledger.BoundTotals`, which the ledger folds in
whenever it is read (and for good on ``free``), so a completion costs two clock reads and two
adds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from time import perf_counter
from typing import Any

from mpi4py import MPI

from hpcml.comm.buffers import message
from hpcml.comm.ledger import ARRIVED, BoundTotals, Ledger
from hpcml.comm.status import Status, status_of
from hpcml.comm.watch import WATCH

_BYTE = MPI.BYTE


class Bound:
    """What an operation binds of one buffer: the MPI ``spec``, ``nbytes``, ``itemsize``, the
    objects to keep alive, and ``guards``: ``(storage, address)`` of a resizable torch storage,
    whose ``data_ptr()`` must still be ``address`` at every start."""

    __slots__ = ("guards", "itemsize", "keep", "nbytes", "spec")

    def __init__(self, spec: Any, nbytes: int, itemsize: int, keep: tuple[Any, ...],
                 guards: tuple[tuple[Any, int], ...]) -> None:
        self.spec, self.nbytes, self.itemsize = spec, nbytes, itemsize
        self.keep, self.guards = keep, guards


def bind(obj: Any, op: str, reduce: bool = False) -> Bound:
    """What ``op`` binds of ``obj``: a contiguous numpy array or CPU tensor of a dtype MPI
    knows (16-bit floats only when MPI does no arithmetic on them). Raises ``ValueError``
    naming the fix for buffers that would need a copy on every start."""
    spec, nbytes, itemsize, write_back = message(obj, reduce)
    if write_back is not None:
        raise ValueError(f"{op}: this buffer would be staged through a copy on every start (a "
                         "GPU tensor, or 16-bit floats MPI must add); bind a contiguous CPU "
                         "buffer MPI can use in place (e.g. a float32 tensor) or use the "
                         "plain call")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        guards = ((storage, storage.data_ptr()),) if storage.resizable() else ()
        return Bound(spec, nbytes, itemsize, (obj, storage), guards)
    return Bound(spec, nbytes, itemsize, (obj,), ())


class Reposted:
    """The Start/Wait/Test/Free of an MPI persistent request, for an MPI library without
    MPI-4's persistent collectives: every ``Start`` posts the non-blocking call again."""

    def __init__(self, post: Callable[[], MPI.Request]) -> None:
        self._post = post
        self._request = MPI.REQUEST_NULL

    def Start(self) -> None:  # noqa: N802 - MPI's name, as on the request it stands in for
        self._request = self._post()

    def Wait(self, status: MPI.Status | None = None) -> None:  # noqa: N802
        self._request.Wait(status)

    def Test(self, status: MPI.Status | None = None) -> bool:  # noqa: N802
        return self._request.Test(status)

    def Free(self) -> None:  # noqa: N802
        self._request = MPI.REQUEST_NULL


def persistent_request(init: Callable[..., Any], post: Callable[..., MPI.Request],
                       *args: Any) -> Any:
    """``init(*args)`` (an MPI ``*_init`` call), or a :class:`Reposted` of ``post(*args)`` when
    the MPI library does not implement ``init`` (persistent collectives are MPI-4)."""
    try:
        return init(*args)
    except NotImplementedError:
        return Reposted(lambda: post(*args))


_ABANDONED: list[tuple[Any, ...]] = []  # buffers of operations abandoned while still pending


def _refuse_freed() -> None:
    raise RuntimeError("this persistent operation was freed; bind the buffer again")


def _reallocated() -> None:
    raise RuntimeError("a bound tensor's memory was re-allocated in place (resize_); MPI would "
                       "use freed memory: free this operation and bind the tensor again")


class Persistent:
    """A bound operation (see the module docstring). ``start``/``wait``/``test``/``run`` are
    called by the ranks taking part: for ``Send_init``/``Recv_init`` this rank alone, for
    ``Allreduce_init`` every rank of the communicator, starting it the same number of times and
    in the same order as its other collectives. Not thread-safe. Use it as a context manager
    or call ``free()`` to release the MPI request."""

    __slots__ = ("_active", "_blocked", "_counts", "_guards", "_itemsize", "_keep", "_ledger",
                 "_request", "_start", "_started", "_status", "_test", "_wait")

    def __init__(self, request: Any, ledger: Ledger, op: str, sent: int, received: int,
                 *buffers: Bound) -> None:
        self._request, self._ledger = request, ledger
        self._itemsize = buffers[0].itemsize
        self._keep = tuple(x for b in buffers for x in b.keep)
        self._guards = tuple(g for b in buffers for g in b.guards)
        self._counts = ledger.bind(op, sent, received)
        self._start, self._wait, self._test = request.Start, request.Wait, request.Test
        self._status = MPI.Status()
        self._active = False
        self._started = self._blocked = 0.0

    @property
    def active(self) -> bool:
        """True between ``start()`` and the ``wait``/``test`` that completes it."""
        return self._active

    @property
    def totals(self) -> BoundTotals:
        """The counts this operation completes into (its ledger names them)."""
        return self._counts

    @property
    def status(self) -> Status:
        """The last completion's status (for a receive: sender, tag, elements and bytes)."""
        return status_of(self._status, self._itemsize)

    def run(self) -> None:
        """Start and complete the operation (the blocking form); for a receive, ``status``
        tells what arrived."""
        if self._active:
            raise RuntimeError("run: this operation was started and not yet waited for")
        for storage, address in self._guards:
            if storage.data_ptr() != address:
                _reallocated()
        st, counts = self._status, self._counts
        start = WATCH.since = perf_counter()
        WATCH.what = self
        try:
            self._start()
            self._wait(st)
        finally:
            WATCH.what = None
        counts.seconds += perf_counter() - start
        counts.runs += 1
        if counts.received == ARRIVED:
            counts.arrived += st.Get_count(_BYTE)

    def start(self) -> None:
        """Post the operation; do not touch the buffer until ``wait``/``test`` completes it."""
        if self._active:
            raise RuntimeError("start: this operation was started and not yet waited for")
        for storage, address in self._guards:
            if storage.data_ptr() != address:
                _reallocated()
        self._started = perf_counter()
        self._start()
        self._active, self._blocked = True, 0.0

    def wait(self) -> Status:
        """Complete a started operation (returns at once if none is pending)."""
        if self._active:
            since = WATCH.since = perf_counter()
            WATCH.what = self
            try:
                self._wait(self._status)
            finally:
                WATCH.what = None
            self._complete(since)
        return self.status

    def test(self) -> Status | None:
        """Complete the operation if it has finished; ``None`` while it is still pending."""
        if self._active:
            since = perf_counter()
            if not self._test(self._status):
                self._blocked += perf_counter() - since
                return None
            self._complete(since)
        return self.status

    def free(self) -> None:
        """Complete a pending start, release the MPI request and fold the counts into the
        ledger for good; the handle cannot start again. Idempotent."""
        if self._start is not _refuse_freed:
            self.wait()
            self._request.Free()
            self._retire()

    def __enter__(self) -> Persistent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """``free()``; but while an exception leaves the block with a start still pending, the
        operation is abandoned instead of waited for (its peer may never answer, and waiting
        would hang the job the exception is about to abort): its buffers stay alive for MPI."""
        if exc_type is not None and self._active:
            _ABANDONED.append(self._keep)
            self._retire()
        else:
            self.free()

    def _retire(self) -> None:
        self._ledger.unbind(self._counts)
        self._start = _refuse_freed
        self._keep = self._guards = ()
        self._active = False

    def _complete(self, blocked_since: float) -> None:
        now = perf_counter()
        counts = self._counts
        counts.runs += 1
        counts.seconds += self._blocked + now - blocked_since
        counts.outstanding_seconds += now - self._started
        if counts.received == ARRIVED:
            counts.arrived += self._status.Get_count(_BYTE)
        self._active = False
