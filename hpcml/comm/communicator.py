"""``Communicator``: hpcml's only door to MPI.

It wraps an mpi4py communicator and offers the mpi4py vocabulary: upper-case methods move
numpy/torch buffers (zero-copy where possible, see :mod:`hpcml.comm.buffers`), lower-case
methods move small picklable objects. Every call is timed and recorded in a :class:`Ledger`
shared by all communicators of the process; sub-communicators (``split``, ``cart``,
``dist_graph``) record under their own name prefix (``data.Allreduce``).

Every method named like an MPI collective is collective over this communicator: all its ranks
must call it, in the same order. ``Isend``/``Irecv`` and the ``Request`` they return are not.
Every call that waits for other ranks is watched by the collective watchdog
(:mod:`hpcml.comm.watchdog`), which ends the job when one lasts longer than its timeout.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from time import perf_counter, sleep
from typing import Any

import numpy as np
from mpi4py import MPI

from hpcml.comm import buffers, progress, watchdog
from hpcml.comm.buffers import REDUCE_OPS, message, reduce_op, stage
from hpcml.comm.ledger import ARRIVED, Ledger, OpTotals
from hpcml.comm.persistent import Persistent, bind, persistent_request
from hpcml.comm.request import Request
from hpcml.comm.status import Status, new_status, status_of
from hpcml.comm.stragglers import DelayModel, StragglerConfig, freeze_process
from hpcml.comm.watch import WATCH, watching

ANY_SOURCE = MPI.ANY_SOURCE
ANY_TAG = MPI.ANY_TAG
IN_PLACE = MPI.IN_PLACE
_BYTE = MPI.BYTE
_NDARRAY, _HALF, _specs_get = buffers._NDARRAY, buffers._HALF, buffers._SPECS.get


class Communicator:
    """A rank's view of one MPI communicator, with ledger and straggler model."""

    def __init__(self, mpi_comm: MPI.Comm, *, name: str = "world", ledger: Ledger | None = None,
                 delays: DelayModel | None = None) -> None:
        self.mpi = mpi_comm
        self.name = name
        self.rank: int = mpi_comm.Get_rank()
        self.size: int = mpi_comm.Get_size()
        self._prefix = "" if name == "world" else f"{name}."
        self.ledger = ledger if ledger is not None else Ledger()
        self.delays = delays if delays is not None else DelayModel(StragglerConfig())
        self._status = MPI.Status()  # reused by blocking receives (a Communicator is not
        # thread-safe anyway), which saves an allocation per receive
        self._last_status = Status(ANY_SOURCE, ANY_TAG, -1, -1)  # what Recv returned last
        # The small-message hot paths call these bound methods (one lookup saved per call).
        self._mpi_allreduce, self._mpi_send, self._mpi_recv, self._mpi_isend, self._mpi_irecv = (
            mpi_comm.Allreduce, mpi_comm.Send, mpi_comm.Recv, mpi_comm.Isend, mpi_comm.Irecv)

    def __repr__(self) -> str:
        return f"Communicator({self.name!r}, rank={self.rank}, size={self.size})"

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._entries: dict[str, OpTotals] = {}
        # The hot paths' accumulators, made now so that a call reads one attribute (an op
        # never called stays at zero calls, which Ledger.totals leaves out).
        (self._allreduce_totals, self._send_totals, self._recv_totals, self._isend_totals,
         self._irecv_totals) = (self._entry(op) for op in ("Allreduce", "Send", "Recv", "Isend",
                                                            "Irecv"))

    def _entry(self, op: str) -> OpTotals:
        """This communicator's ledger accumulator for ``op`` (kept, so hot paths skip lookups)."""
        entry = self._entries.get(op)
        if entry is None:
            entry = self._entries[op] = self._ledger.entry(self._prefix + op)
        return entry

    def _timed(self, op: str, sent: int, received: int, call: Callable[[], Any]) -> Any:
        entry = self._entries.get(op) or self._entry(op)
        start = WATCH.since = perf_counter()
        WATCH.what = entry
        try:
            result = call()
        finally:
            WATCH.what = None
        entry.seconds += perf_counter() - start
        entry.calls += 1
        entry.bytes_sent += sent
        entry.bytes_received += received
        return result

    def _derive(self, mpi_comm: MPI.Comm, name: str) -> Communicator:
        return Communicator(mpi_comm, name=name, ledger=self.ledger, delays=self.delays)

    # -- reductions ----------------------------------------------------------------------------
    def Allreduce(self, buf: Any, out: Any = None, op: str = "sum") -> Any:
        """Reduce ``buf`` over all ranks. In place when ``out`` is None; returns the result."""
        # A hot path for small messages, written out without helpers: each Python call costs
        # a few percent of a 4 KiB allreduce. Send and Recv below follow the same pattern: the
        # two fast answers of buffers.message (a contiguous numpy array that is not float16; a
        # tensor whose description is cached) inline, the function for everything else.
        mop = REDUCE_OPS.get(op) or reduce_op(op)
        tp = type(buf)
        if tp is _NDARRAY and buf.flags.c_contiguous and buf.dtype is not _HALF:
            spec, sent, itemsize, back = buf, buf.nbytes, buf.itemsize, None
        elif (tp is buffers._TORCH_TENSOR and buf.is_contiguous()
              and (known := _specs_get(buf.data_ptr())) is not None
              and known[0] == buf.nbytes and known[1] is buf.dtype and buf.is_cpu):
            spec, sent, itemsize, back = known[2]
        else:
            spec, sent, itemsize, back = message(buf, True)
        if out is None:
            recv_spec, received, send_spec = spec, sent, IN_PLACE
        else:
            send_spec, tp = spec, type(out)
            if tp is _NDARRAY and out.flags.c_contiguous and out.dtype is not _HALF:
                recv_spec, received, out_itemsize, back = out, out.nbytes, out.itemsize, None
            elif (tp is buffers._TORCH_TENSOR and out.is_contiguous()
                  and (known := _specs_get(out.data_ptr())) is not None
                  and known[0] == out.nbytes and known[1] is out.dtype and out.is_cpu):
                recv_spec, received, out_itemsize, back = known[2]
            else:
                recv_spec, received, out_itemsize, back = message(out, True)
            if received != sent or out_itemsize != itemsize:
                raise ValueError(f"Allreduce: buffers of {sent} and {received} bytes (items of "
                                 f"{itemsize} and {out_itemsize}) do not match")
        entry = self._allreduce_totals
        start = WATCH.since = perf_counter()
        WATCH.what = entry
        try:
            self._mpi_allreduce(send_spec, recv_spec, mop)
        finally:
            WATCH.what = None
        entry.seconds += perf_counter() - start
        entry.calls += 1
        entry.bytes_sent += sent
        entry.bytes_received += received
        if back is not None:
            back()
        return buf if out is None else out

    def Iallreduce(self, buf: Any, op: str = "sum") -> Request:
        """Start an in-place allreduce of ``buf``; the result is in ``buf`` after ``wait()``."""
        spec, nbytes, itemsize, back = message(buf, True)
        return Request(self.mpi.Iallreduce(IN_PLACE, spec, reduce_op(op)),
                       self._entry("Iallreduce"), nbytes, nbytes, itemsize, back, (buf, spec))

    def _start(self, op: str, req: MPI.Request, sent: int, received: int, itemsize: int,
               back: Callable[[], None] | None, keep: tuple[Any, ...]) -> Request:
        """A started non-blocking collective as a :class:`Request` completing into ``op``."""
        return Request(req, self._entry(op), sent, received, itemsize, back, keep)

    def Ireduce(self, buf: Any, root: int = 0, op: str = "sum") -> Request:
        """Start a reduction of every rank's ``buf`` into ``root``'s ``buf`` (in place there;
        other ranks' ``buf`` is only read). Collective, non-blocking."""
        spec, nbytes, itemsize, back = message(buf, True)
        mop = reduce_op(op)
        if self.rank == root:
            return self._start("Ireduce", self.mpi.Ireduce(IN_PLACE, spec, mop, root), nbytes,
                               nbytes, itemsize, back, (buf, spec))
        return self._start("Ireduce", self.mpi.Ireduce(spec, None, mop, root), nbytes, 0,
                           itemsize, None, (buf, spec))

    def Ireduce_scatter(self, send: Any, recv: Any, counts: Sequence[int] | None = None,
                        op: str = "sum") -> Request:
        """Start ``Reduce_scatter`` (same contract); ``recv`` holds block ``rank`` after
        ``wait()``. Collective, non-blocking."""
        src, sent, itemsize, _ = message(send, True)
        dst, received, _, back = message(recv, True)
        mop = reduce_op(op)
        if counts is None:
            self._check_count("Ireduce_scatter", sent // itemsize, received // itemsize,
                              self.size)
            req = self.mpi.Ireduce_scatter_block(src, dst, mop)
        else:
            counts = self._check_counts("Ireduce_scatter", counts, sent // itemsize)
            req = self.mpi.Ireduce_scatter(src, dst, counts, mop)
        return self._start("Ireduce_scatter", req, sent, received, itemsize, back,
                           (send, src, recv, dst))

    def Ibcast(self, buf: Any, root: int = 0) -> Request:
        """Start broadcasting ``root``'s ``buf`` into every rank's ``buf``. Collective,
        non-blocking."""
        spec, nbytes, itemsize, back = message(buf)
        is_root = self.rank == root
        return self._start("Ibcast", self.mpi.Ibcast(spec, root), nbytes if is_root else 0,
                           0 if is_root else nbytes, itemsize, None if is_root else back,
                           (buf, spec))

    def Iallgather(self, send: Any, recv: Any) -> Request:
        """Start ``Allgather``; ``send=None`` means this rank's block already sits at block
        ``rank`` of ``recv`` (MPI_IN_PLACE). Collective, non-blocking."""
        dst, received, itemsize, back = message(recv)
        if send is None:
            src, sent = IN_PLACE, received // self.size
        else:
            src, sent, send_itemsize, _ = message(send)
            self._check_count("Iallgather", received // itemsize, sent // send_itemsize,
                              self.size)
        return self._start("Iallgather", self.mpi.Iallgather(src, dst), sent, received,
                           itemsize, back, (send, src, recv, dst))

    def Iallgatherv(self, send: Any, recv: Any, counts: Sequence[int]) -> Request:
        """Start ``Allgatherv`` (same contract: rank r contributes ``counts[r]`` elements,
        concatenated in rank order into ``recv``). Collective, non-blocking."""
        src, dst, vector = self._allgatherv_buffers("Iallgatherv", send, recv, counts)
        req = self.mpi.Iallgatherv(src.spec, vector)
        return self._start("Iallgatherv", req, src.nbytes, dst.nbytes, dst.itemsize,
                           dst.write_back, (src, dst))

    def Igather(self, send: Any, recv: Any, root: int = 0) -> Request:
        """Start gathering every rank's ``send`` (same size everywhere) into ``root``'s ``recv``
        in rank order (``recv`` is ignored elsewhere). Collective, non-blocking."""
        src, sent, itemsize, _ = message(send)
        if self.rank != root:
            return self._start("Igather", self.mpi.Igather(src, None, root), sent, 0, itemsize,
                               None, (send, src))
        dst, received, recv_itemsize, back = message(recv)
        self._check_count("Igather", received // recv_itemsize, sent // itemsize, self.size)
        return self._start("Igather", self.mpi.Igather(src, dst, root), sent, received,
                           itemsize, back, (send, src, recv, dst))

    def Iscatter(self, send: Any, recv: Any, root: int = 0) -> Request:
        """Start scattering ``root``'s ``send`` (``size`` equal blocks, ignored elsewhere): block
        r lands in rank r's ``recv``. Collective, non-blocking."""
        dst, received, itemsize, back = message(recv)
        if self.rank != root:
            return self._start("Iscatter", self.mpi.Iscatter(None, dst, root), 0, received,
                               itemsize, back, (recv, dst))
        src, sent, send_itemsize, _ = message(send)
        self._check_count("Iscatter", sent // send_itemsize, received // itemsize, self.size)
        return self._start("Iscatter", self.mpi.Iscatter(src, dst, root), sent, received,
                           itemsize, back, (send, src, recv, dst))

    def Ialltoallv(self, send: Any, recv: Any, send_counts: Sequence[int],
                   recv_counts: Sequence[int]) -> Request:
        """Start ``Alltoallv`` (same contract: per-destination and per-source element counts,
        blocks packed in rank order). Collective, non-blocking."""
        src, dst = stage(send), stage(recv)
        sc = self._check_counts("Ialltoallv", send_counts, src.size)
        rc = self._check_counts("Ialltoallv", recv_counts, dst.size)
        sd = np.concatenate([[0], np.cumsum(sc)[:-1]]).tolist()
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]]).tolist()
        req = self.mpi.Ialltoallv(src.vector(sc, sd), dst.vector(rc, rd))
        return self._start("Ialltoallv", req, src.nbytes, dst.nbytes, dst.itemsize,
                           dst.write_back, (src, dst))

    def Ibarrier(self) -> Request:
        """Start a barrier; it completes once every rank has started it. Collective,
        non-blocking."""
        return self._start("Ibarrier", self.mpi.Ibarrier(), 0, 0, 1, None, ())

    def Allreduce_init(self, buf: Any, out: Any = None, op: str = "sum") -> Persistent:
        """Collective: bind an allreduce of ``buf`` (in place when ``out`` is None, else into
        ``out``) to be started many times (MPI_Allreduce_init; see
        :mod:`hpcml.comm.persistent`). Every rank binds it, and starts it, in the same order as
        its other collectives on this communicator."""
        mop = reduce_op(op)
        buffers = [bind(buf, "Allreduce_init", reduce=True)]
        send_spec, recv_spec, sent = IN_PLACE, buffers[0].spec, buffers[0].nbytes
        if out is not None:
            buffers.append(bind(out, "Allreduce_init", reduce=True))
            send_spec, recv_spec = recv_spec, buffers[1].spec
            if buffers[1].nbytes != sent or buffers[1].itemsize != buffers[0].itemsize:
                raise ValueError(f"Allreduce_init: buffers of {sent} and {buffers[1].nbytes} "
                                 f"bytes (items of {buffers[0].itemsize} and "
                                 f"{buffers[1].itemsize}) do not match")
        request = persistent_request(self.mpi.Allreduce_init, self.mpi.Iallreduce, send_spec,
                                     recv_spec, mop)
        return Persistent(request, self.ledger, self._prefix + "Allreduce_init", sent, sent,
                          *buffers)

    def Reduce_scatter(self, send: Any, recv: Any, counts: Sequence[int] | None = None,
                       op: str = "sum") -> Any:
        """Reduce ``send`` (all ranks' blocks, concatenated) and leave block ``rank`` in ``recv``.
        ``counts`` gives each rank's block length in elements; equal blocks when None."""
        src, sent, itemsize, _ = message(send, True)
        dst, received, _, back = message(recv, True)
        mop = REDUCE_OPS.get(op) or reduce_op(op)
        if counts is None:
            self._check_count("Reduce_scatter", sent // itemsize, received // itemsize,
                              self.size)
            call = lambda: self.mpi.Reduce_scatter_block(src, dst, mop)  # noqa: E731
        else:
            counts = self._check_counts("Reduce_scatter", counts, sent // itemsize)
            call = lambda: self.mpi.Reduce_scatter(src, dst, counts, mop)  # noqa: E731
        self._timed("Reduce_scatter", sent, received, call)
        if back is not None:
            back()
        return recv

    # -- data movement ---------------------------------------------------------------------------
    def Bcast(self, buf: Any, root: int = 0) -> Any:
        """Broadcast ``buf`` from ``root`` into every rank's ``buf``; returns ``buf``."""
        b = stage(buf)
        is_root = self.rank == root
        self._timed("Bcast", b.nbytes if is_root else 0, 0 if is_root else b.nbytes,
                    lambda: self.mpi.Bcast(b.spec, root=root))
        if not is_root:
            b.finish()
        return buf

    def Allgather(self, send: Any, recv: Any) -> Any:
        """Concatenate every rank's ``send`` (same size everywhere) into ``recv`` in rank order."""
        src, sent, itemsize, _ = message(send)
        dst, received, recv_itemsize, back = message(recv)
        self._check_count("Allgather", received // recv_itemsize, sent // itemsize, self.size)
        self._timed("Allgather", sent, received, lambda: self.mpi.Allgather(src, dst))
        if back is not None:
            back()
        return recv

    def Allgatherv(self, send: Any, recv: Any, counts: Sequence[int]) -> Any:
        """Like ``Allgather`` with rank r contributing ``counts[r]`` elements."""
        src, dst, vector = self._allgatherv_buffers("Allgatherv", send, recv, counts)
        self._timed("Allgatherv", src.nbytes, dst.nbytes,
                    lambda: self.mpi.Allgatherv(src.spec, vector))
        dst.finish()
        return recv

    def _allgatherv_buffers(self, op: str, send: Any, recv: Any,
                            counts: Sequence[int]) -> tuple[Any, Any, Any]:
        """Staged ``send`` and ``recv`` and ``recv``'s vector spec for an allgather with rank r
        contributing ``counts[r]`` elements; ``ValueError`` naming ``op`` when the counts do not
        fit the buffers. Not collective."""
        src, dst = stage(send), stage(recv)
        counts = self._check_counts(op, counts, dst.size)
        if counts[self.rank] != src.size:
            raise ValueError(f"{op}: counts[{self.rank}] = {counts[self.rank]} but this "
                             f"rank sends {src.size} elements")
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        return src, dst, dst.vector(counts, displs)

    def Alltoall(self, send: Any, recv: Any) -> Any:
        """Block j of ``send`` goes to rank j; block i of ``recv`` comes from rank i."""
        src, dst = stage(send), stage(recv)
        self._check_count("Alltoall", src.size, dst.size, 1)
        self._timed("Alltoall", src.nbytes, dst.nbytes,
                    lambda: self.mpi.Alltoall(src.spec, dst.spec))
        dst.finish()
        return recv

    def Alltoallv(self, send: Any, recv: Any, send_counts: Sequence[int],
                  recv_counts: Sequence[int]) -> Any:
        """``Alltoall`` with per-destination/per-source element counts."""
        src, dst = stage(send), stage(recv)
        sc = self._check_counts("Alltoallv", send_counts, src.size)
        rc = self._check_counts("Alltoallv", recv_counts, dst.size)
        sd = np.concatenate([[0], np.cumsum(sc)[:-1]]).tolist()
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]]).tolist()
        self._timed("Alltoallv", src.nbytes, dst.nbytes, lambda: self.mpi.Alltoallv(
            src.vector(sc, sd), dst.vector(rc, rd)))
        dst.finish()
        return recv

    # -- point to point ------------------------------------------------------------------------
    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:
        """Blocking send of ``buf`` to ``dest``; returns when ``buf`` may be reused."""
        tp = type(buf)  # buffers.message's fast answers inline, as in Allreduce
        if tp is _NDARRAY and buf.flags.c_contiguous and buf.dtype is not _HALF:
            spec, nbytes = buf, buf.nbytes
        elif (tp is buffers._TORCH_TENSOR and buf.is_contiguous()
              and (known := _specs_get(buf.data_ptr())) is not None
              and known[0] == buf.nbytes and known[1] is buf.dtype and buf.is_cpu):
            spec, nbytes = known[2][0], known[0]
        else:
            spec, nbytes, _, _ = message(buf)
        entry = self._send_totals
        start = WATCH.since = perf_counter()
        WATCH.what = entry
        try:
            self._mpi_send(spec, dest, tag)
        finally:
            WATCH.what = None
        entry.seconds += perf_counter() - start
        entry.calls += 1
        entry.bytes_sent += nbytes

    def Recv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Status:
        """Blocking receive into ``buf`` (a message no longer than ``buf``); returns its status."""
        tp = type(buf)  # buffers.message's fast answers inline, as in Allreduce
        if tp is _NDARRAY and buf.flags.c_contiguous and buf.dtype is not _HALF:
            spec, itemsize, back = buf, buf.itemsize, None
        elif (tp is buffers._TORCH_TENSOR and buf.is_contiguous()
              and (known := _specs_get(buf.data_ptr())) is not None
              and known[0] == buf.nbytes and known[1] is buf.dtype and buf.is_cpu):
            spec, _, itemsize, back = known[2]
        else:
            spec, _, itemsize, back = message(buf)
        st = self._status
        entry = self._recv_totals
        start = WATCH.since = perf_counter()
        WATCH.what = entry
        try:
            self._mpi_recv(spec, source, tag, st)
        finally:
            WATCH.what = None
        entry.seconds += perf_counter() - start
        n = st.Get_count(_BYTE)
        entry.calls += 1
        entry.bytes_received += n
        if back is not None:
            back()
        if source < 0:
            source = st.Get_source()
        if tag < 0:
            tag = st.Get_tag()
        # A Status is immutable, so the last one is handed out again when it says the same
        # (a loop's receives usually do): a comparison costs less than a new tuple.
        last = self._last_status
        if last[3] == n and last[0] == source and last[1] == tag and last[2] == n // itemsize:
            return last
        self._last_status = last = new_status(Status, (source, tag, n // itemsize, n))
        return last

    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        """Start sending ``buf``; do not modify it until the request completes."""
        spec, nbytes, itemsize, _ = message(buf)  # a send never writes back
        return Request(self._mpi_isend(spec, dest, tag), self._isend_totals, nbytes, 0, itemsize,
                       None, (buf, spec), dest, tag)

    def Irecv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        """Start receiving into ``buf``; its contents are valid after the request completes."""
        spec, _, itemsize, back = message(buf)
        return Request(self._mpi_irecv(spec, source, tag), self._irecv_totals, 0, ARRIVED,
                       itemsize, back, (buf, spec), source, tag)

    def Send_init(self, buf: Any, dest: int, tag: int = 0) -> Persistent:
        """Bind a send of ``buf`` to ``dest`` with ``tag`` (MPI_Send_init), to be started many
        times; not collective (see :mod:`hpcml.comm.persistent`)."""
        bound = bind(buf, "Send_init")
        return Persistent(self.mpi.Send_init(bound.spec, dest, tag), self.ledger,
                          self._prefix + "Send_init", bound.nbytes, 0, bound)

    def Recv_init(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Persistent:
        """Bind a receive into ``buf`` (messages no longer than ``buf``) from ``source`` with
        ``tag`` (MPI_Recv_init), to be started many times; not collective. After each
        completion ``status`` tells what arrived."""
        bound = bind(buf, "Recv_init")
        return Persistent(self.mpi.Recv_init(bound.spec, source, tag), self.ledger,
                          self._prefix + "Recv_init", 0, ARRIVED, bound)

    def Iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
               itemsize: int = 1) -> Status | None:
        """Status of a message waiting to be received, or None; does not receive it."""
        st = MPI.Status()
        if self.mpi.Iprobe(source=source, tag=tag, status=st):
            return status_of(st, itemsize)
        return None

    # -- neighbourhood collectives (graph / Cartesian communicators) ---------------------------
    def Neighbor_allgather(self, send: Any, recv: Any) -> Any:
        """Receive every in-neighbour's ``send`` into ``recv``, in ``neighbors()[0]`` order."""
        src, dst = stage(send), stage(recv)
        indegree = len(self.neighbors()[0])
        self._check_count("Neighbor_allgather", dst.size, src.size, indegree)
        self._timed("Neighbor_allgather", src.nbytes, dst.nbytes,
                    lambda: self.mpi.Neighbor_allgather(src.spec, dst.spec))
        dst.finish()
        return recv

    def Neighbor_alltoall(self, send: Any, recv: Any) -> Any:
        """Block j of ``send`` goes to out-neighbour j; block i of ``recv`` comes from
        in-neighbour i."""
        src, dst = stage(send), stage(recv)
        self._timed("Neighbor_alltoall", src.nbytes, dst.nbytes,
                    lambda: self.mpi.Neighbor_alltoall(src.spec, dst.spec))
        dst.finish()
        return recv

    # -- small Python objects (pickled) ----------------------------------------------------------
    def _obj(self, op: str, obj: Any, call: Callable[[], Any]) -> Any:
        entry = self._entry(op)
        start = perf_counter()
        with watching(entry):
            result = call()
        size = lambda x: len(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: E731
        received = sum(size(r) for r in result) if isinstance(result, list) else size(result)
        entry.add(size(obj), received, perf_counter() - start)
        return result

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self._obj("bcast", obj if self.rank == root else None,
                         lambda: self.mpi.bcast(obj, root=root))

    def allgather(self, obj: Any) -> list[Any]:
        return self._obj("allgather", obj, lambda: self.mpi.allgather(obj))

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return self._obj("gather", obj, lambda: self.mpi.gather(obj, root=root))

    def allreduce(self, obj: Any, op: str = "sum") -> Any:
        return self._obj("allreduce", obj, lambda: self.mpi.allreduce(obj, op=reduce_op(op)))

    def barrier(self) -> None:
        self._timed("Barrier", 0, 0, self.mpi.Barrier)

    # -- structure -------------------------------------------------------------------------------
    def _watched(self, op: str, call: Callable[[], MPI.Comm]) -> MPI.Comm:
        """``call()``, a collective that makes a communicator, as a wait the watchdog watches
        (not in the ledger: it moves no data)."""
        with watching(f"{self._prefix}{op}"):
            return call()

    def split(self, color: int, key: int | None = None, name: str | None = None) -> Communicator:
        """Collective: ranks with equal ``color`` form a new communicator ordered by ``key``."""
        sub = self._watched("Split", lambda: self.mpi.Split(color,
                                                            self.rank if key is None else key))
        return self._derive(sub, name or f"{self.name}.split{color}")

    def dup(self, name: str) -> Communicator:
        """Collective: a duplicate of this communicator (same ranks, its own message space)
        recording in the ledger under ``name``."""
        return self._derive(self._watched("Dup", self.mpi.Dup), name)

    def create_group(self, ranks: Sequence[int], name: str) -> Communicator:
        """Collective over ``ranks`` only (ranks of this communicator; the others do not call
        it): a communicator of those ranks, ordered as listed (MPI_Comm_create_group)."""
        group = self.mpi.Get_group().Incl(list(ranks))
        try:
            sub = self._watched("Create_group", lambda: self.mpi.Create_group(group))
        finally:
            group.Free()
        return self._derive(sub, name)

    def split_shared(self) -> Communicator:
        """Collective: the ranks that share this node's memory."""
        return self._derive(self._watched("Split_type", lambda: self.mpi.Split_type(
            MPI.COMM_TYPE_SHARED)), "node")

    def cart(self, dims: Sequence[int], periods: Sequence[bool] | None = None,
             name: str = "cart") -> Communicator:
        """Collective: a Cartesian communicator of shape ``dims`` (product must equal size)."""
        if int(np.prod(dims)) != self.size:
            raise ValueError(f"cart: dims {list(dims)} hold {int(np.prod(dims))} ranks, but the "
                             f"communicator has {self.size}")
        periods = [False] * len(dims) if periods is None else list(periods)
        return self._derive(self._watched("Create_cart", lambda: self.mpi.Create_cart(
            list(dims), periods=periods, reorder=False)), name)

    def cart_sub(self, keep: Sequence[bool], name: str) -> Communicator:
        """Collective on a Cartesian communicator: the sub-grid that varies along ``keep``."""
        return self._derive(self._watched("Sub", lambda: self.mpi.Sub(list(keep))), name)

    @property
    def coords(self) -> list[int]:
        """This rank's coordinates on a Cartesian communicator."""
        return list(self.mpi.Get_coords(self.rank))

    def dist_graph(self, sources: Sequence[int], destinations: Sequence[int],
                   name: str = "graph") -> Communicator:
        """Collective: a distributed-graph communicator where this rank receives from
        ``sources`` and sends to ``destinations`` (ranks of this communicator)."""
        graph = self._watched("Create_dist_graph_adjacent", lambda: (
            self.mpi.Create_dist_graph_adjacent(list(sources), list(destinations),
                                                reorder=False)))
        return self._derive(graph, name)

    def neighbors(self) -> tuple[list[int], list[int]]:
        """(in-neighbours, out-neighbours) of a graph or Cartesian communicator."""
        topo = self.mpi.Get_topology()
        if topo == MPI.DIST_GRAPH:
            sources, destinations, _ = self.mpi.Get_dist_neighbors()
            return list(sources), list(destinations)
        if topo == MPI.CART:
            out: list[int] = []
            for dim in range(self.mpi.Get_dim()):
                lo, hi = self.mpi.Shift(dim, 1)
                out += [lo, hi]
            return out, out
        raise ValueError(f"{self.name} has no topology; build it with dist_graph() or cart()")

    # -- stragglers and failure ----------------------------------------------------------------
    def set_delays(self, delays: DelayModel) -> None:
        self.delays = delays

    def straggle(self, iteration: int) -> float:
        """Sleep for this rank's injected delay at ``iteration``; returns the seconds slept.
        Also declares ``iteration`` as the step the watchdog names (every hpcml job loop calls
        this at each iteration). Not collective."""
        WATCH.step = iteration
        seconds = self.delays.delay(self.rank, iteration)
        if seconds > 0:  # not a wait for other ranks: recorded, but not watched
            start = perf_counter()
            (freeze_process if self.delays.freezes else sleep)(seconds)
            self._entry("straggle").add(0, 0, perf_counter() - start)
        return seconds

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort on COMM_WORLD)."""
        MPI.COMM_WORLD.Abort(code)

    # -- helpers -----------------------------------------------------------------------------
    def _check_count(self, op: str, big: int, small: int, factor: int) -> None:
        """``big`` must hold ``factor`` times the elements of ``small``."""
        if big != small * factor:
            raise ValueError(f"{op}: buffer sizes {big} and {small} "
                             f"elements do not match for {self.size} ranks")

    def _check_counts(self, op: str, counts: Sequence[int], total: int) -> list[int]:
        counts = [int(c) for c in counts]
        if len(counts) != self.size:
            raise ValueError(f"{op}: {len(counts)} counts for {self.size} ranks")
        if sum(counts) != total:
            raise ValueError(f"{op}: counts add up to {sum(counts)} but the buffer holds {total}")
        return counts


_WORLD: Communicator | None = None


def world() -> Communicator:
    """The process-wide communicator over every rank of the job (size 1 without mpiexec).

    It wraps a duplicate of MPI_COMM_WORLD, made on the first call (collective: every rank must
    make it, as every hpcml entry point does before any communication), so hpcml's messages can
    never match the job-control messages that :mod:`hpcml.comm.abort` exchanges on
    MPI_COMM_WORLD itself, nor a user's own COMM_WORLD traffic (mpi4py's advice for libraries).
    On two or more ranks it also starts this rank's collective watchdog
    (:func:`hpcml.comm.watchdog.start`; raises ``UsageError`` for a bad
    ``HPCML_WATCHDOG_TIMEOUT`` or ``HPCML_WAIT_POLL``)."""
    global _WORLD
    if _WORLD is None:
        progress.check()
        _WORLD = Communicator(MPI.COMM_WORLD.Dup())
        watchdog.start(_WORLD.ledger)
    return _WORLD
