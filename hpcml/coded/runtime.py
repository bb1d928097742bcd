"""Master/worker runtime that treats stragglers as erasures (Karakus et al., JMLR 2019).

Layout: world rank 0 is the master, ranks 1..m (m = size - 1) are the workers; worker i of m is
rank i + 1. With one rank, :class:`SimulatedMaster` runs the same protocol in-process with a
virtual clock, each worker's response time drawn from the same seeded delay model
(``delays.delay(i + 1, t)``), so serial and MPI runs see the same erasure patterns.

Protocol (every message a float64 vector whose first entry is the iteration t):

* a worker is *busy* from the moment the master sends it an iterate until its reply arrives.
  The master sends (``Isend``) iteration t's message (tag t mod 32000) only to an idle worker; for a
  busy one it keeps the message as that worker's *waiting* iterate (a newer one replaces it) and
  sends it the moment the reply arrives. So at most one unanswered iterate is ever in flight to
  a worker, plus the stop message at the end: a frozen worker (SIGSTOP, a dead node) holds at
  most two of the master's messages and one reply, never a queue that grows with the time it is
  gone (MPICH stops progressing every rank once a few dozen unreceived sends pile up);
* the master keeps one ``Irecv`` (any tag) posted per worker;
* a worker receives the next message, sleeps its injected delay ``comm.straggle(t)``, computes
  and sends (``Send``) the reply tagged t (the master's receive is always posted);
* :meth:`Runtime.round` returns as soon as k replies *for iteration t* have arrived. Replies for
  older iterations (late stragglers) are received, counted in ``discarded`` and dropped: the
  iteration number carried in the payload (and the tag) is checked, so a late answer is never
  applied to a later iteration;
* :meth:`Runtime.close` sends a stop message (tag 32767); each worker acknowledges with the same
  tag and the master drains late replies until every acknowledgement is in or
  ``close_timeout`` seconds have passed. Workers that never acknowledged are listed in
  ``unresponsive`` (world ranks): the master must then not enter any collective with them (see
  :func:`finish`); the job ends by aborting them once its results are written.

Stopping early (preemption): the master alone decides, between iterations
(:meth:`Runtime.stop_after`, a local check of its ``stop`` callable, e.g. its own SIGUSR1/SIGTERM
flag; Slurm and Hydra signal every rank) and, on MPI, also while it waits for replies, and ends
the solve through the same :meth:`close`: the workers learn it from the stop message, a frozen
one is left behind after ``close_timeout``.
Too few workers (more than m - k frozen or dead): the master waits for a reply at most
``progress_timeout`` seconds after the last reply of any kind arrived; then it ends the solve
(``failed_by`` says why, :meth:`Runtime.round` returns None), names the workers that still owe
it an answer in ``unresponsive`` and closes as above. The solve keeps the iterations done.
Setup (:func:`await_ready`): before the clock starts each worker sends the master one message
tagged ``READY`` (carrying what the master needs from it, e.g. its Gram matrix) and goes on
without waiting for an answer it could only get from the master; the master polls for them with
the same ``progress_timeout`` and ``stop`` as above, so a worker frozen during setup ends the
job as failed (``failed_by`` names the phase) instead of holding the master in a barrier.
A frozen master (SIGSTOP, a hung node): a worker's wait for the master's next message is watched
by the collective watchdog, so after its timeout the workers end the job with one line naming
rank 0 (exit code 4, :mod:`hpcml.comm.watchdog`) instead of polling forever.
Memory bound, per worker: the master holds one reply buffer, one message in flight and one
waiting message (each at most the message or reply length + 1 float64); a worker holds one
message. Only the master calls the ``Runtime`` methods; workers call :func:`serve`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from hpcml.comm import Communicator, DelayModel, Request
from hpcml.comm.polling import POLL_SECONDS, poll_any
from hpcml.comm.watch import watching

TAG_PERIOD = 32000
STOP = 32767
READY = 32766
CLOSE_TIMEOUT = 10.0
PROGRESS_TIMEOUT = 60.0
CHECK_SECONDS = 0.05  # how often a waiting master looks at its stop flag and its deadline
Reply = tuple[int, int, np.ndarray]
Compute = Callable[[int, np.ndarray], np.ndarray]


class SetupFailed(Exception):
    """The master gave up waiting for the workers' ready messages in ``phase``: ``silent``
    (world ranks) never sent theirs; ``stopped_by`` is the stop reason when ``stop`` ended
    the wait, else ``failed_by`` says why; ``encode_seconds``: rank 0's encoding time when
    the encoding was done. Raised on rank 0 only; rank 0 must then enter no collective with
    the workers (the job ends by aborting them, see :mod:`hpcml.launch`)."""

    encode_seconds = 0.0

    def __init__(self, phase: str, silent: list[int], stopped_by: str | None,
                 failed_by: str | None) -> None:
        super().__init__(failed_by or f"{phase}: stopped by {stopped_by}")
        self.phase, self.silent = phase, silent
        self.stopped_by, self.failed_by = stopped_by, failed_by


def report_ready(comm: Communicator, payload: np.ndarray | None = None) -> None:
    """Worker side of :func:`await_ready` (ranks 1..m, not collective): send ``payload``
    (float64; one zero when None) to the master tagged ``READY``."""
    comm.Send(np.zeros(1) if payload is None else payload, 0, tag=READY)


def await_ready(comm: Communicator, length: int, phase: str,
                progress_timeout: float = PROGRESS_TIMEOUT,
                stop: Callable[[], str | None] | None = None) -> list[np.ndarray]:
    """Master side (rank 0 of >= 2 ranks, not collective): the ``READY`` payload (``length``
    float64) of every worker, in worker order, once each called :func:`report_ready`. Checks
    ``stop`` and the deadline every ``CHECK_SECONDS``; raises :class:`SetupFailed` naming the
    workers not heard from when ``stop`` gives a reason or no message came for
    ``progress_timeout`` seconds. Their receives are left pending (never waited on)."""
    bufs = [np.empty(length) for _ in range(comm.size - 1)]
    recvs = [comm.Irecv(b, source=i + 1, tag=READY) for i, b in enumerate(bufs)]
    last = time.monotonic()
    while open_ := [i for i, r in enumerate(recvs) if not r.done]:
        if poll_any([recvs[i] for i in open_], timeout=CHECK_SECONDS) is not None:
            last = time.monotonic()
            continue
        silent = [i + 1 for i in open_]
        reason = stop() if stop is not None else None
        if reason is not None:
            raise SetupFailed(phase, silent, reason, None)
        if time.monotonic() - last >= progress_timeout:
            raise SetupFailed(phase, silent, None,
                              f"{phase}: no ready message for {progress_timeout:g} s; "
                              f"worker ranks {silent} silent, the solve cannot start")
    return bufs


class Runtime:
    """Master-side view of m workers; subclasses move the messages. ``stop()`` (master only,
    no communication) returns a reason to end the solve early, or None. ``failed_by``: why
    the solve ended because too few workers answered (None when it did not)."""

    m: int

    def __init__(self, stop: Callable[[], str | None] | None = None) -> None:
        self.discarded = 0
        self.answered = 0
        self.unresponsive: list[int] = []
        self.stop = stop
        self.stopped_by: str | None = None
        self.failed_by: str | None = None

    def stop_requested(self) -> bool:
        """Whether ``stop`` gave a reason to end the solve (kept in ``stopped_by``). Local."""
        if self.stop is not None and self.stopped_by is None:
            self.stopped_by = self.stop()
        return self.stopped_by is not None

    def stop_after(self, done: int, total: int) -> bool:
        """Whether the solve ends after ``done`` of its ``total`` iterations because ``stop``
        gave a reason (kept in ``stopped_by``); never after the last one. Master only, local."""
        return done < total and self.stop_requested()

    def send(self, worker: int, t: int, message: np.ndarray) -> None:
        """Give iteration t's message to ``worker`` (now, or once it answered its last one)."""
        raise NotImplementedError

    def next_reply(self) -> Reply | None:
        """Block for the next reply from any worker: (worker, its iteration, payload); None
        when the solve must end first (``stopped_by`` or ``failed_by`` says why)."""
        raise NotImplementedError

    def elapsed(self) -> float:
        """Seconds since the runtime started (virtual seconds when simulated)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers (MPI) and drain late replies; fills ``unresponsive``."""

    def round(self, t: int, messages: list[np.ndarray], k: int) -> dict[int, np.ndarray] | None:
        """Send iteration t's message to every worker and return the first k replies to it,
        keyed by worker; late replies to earlier iterations are discarded. None when the solve
        must end before k replies came (see :meth:`next_reply`): iteration t is not done."""
        for i in range(self.m):
            self.send(i, t, messages[i])
        fresh: dict[int, np.ndarray] = {}
        while len(fresh) < k:
            reply = self.next_reply()
            if reply is None:
                return None
            worker, it, payload = reply
            if it == t:
                fresh[worker] = payload
            elif it < t:
                self.discarded += 1
            else:
                raise RuntimeError(f"worker {worker} answered future iteration {it} at {t}")
        self.answered += k
        return fresh


class MPIMaster(Runtime):
    """The master on world rank 0; ``reply_len`` is the longest reply (without the t entry).
    ``close_timeout``: seconds :meth:`close` waits for the workers' acknowledgements;
    ``progress_timeout``: seconds :meth:`next_reply` waits after the last reply of any kind
    before it ends the solve (fewer workers answer than the algorithm waits for)."""

    def __init__(self, comm: Communicator, reply_len: int,
                 close_timeout: float = CLOSE_TIMEOUT,
                 stop: Callable[[], str | None] | None = None,
                 progress_timeout: float = PROGRESS_TIMEOUT) -> None:
        super().__init__(stop)
        if comm.rank != 0 or comm.size < 2:
            raise ValueError("MPIMaster runs on rank 0 of a communicator with >= 2 ranks")
        self.comm, self.m = comm, comm.size - 1
        self.close_timeout, self.progress_timeout = close_timeout, progress_timeout
        self.bufs = [np.empty(reply_len + 1) for _ in range(self.m)]
        self.recvs = [comm.Irecv(self.bufs[i], source=i + 1) for i in range(self.m)]
        self.sends: list[list[tuple[Request, np.ndarray]]] = [[] for _ in range(self.m)]
        self.busy = [False] * self.m
        self.waiting: list[np.ndarray | None] = [None] * self.m
        self.start = time.perf_counter()
        self.last_reply = time.monotonic()

    def _post(self, worker: int, tag: int, buf: np.ndarray) -> None:
        """Isend ``buf``; completed sends to ``worker`` are released first (at most two stay:
        the unanswered iterate and the stop message)."""
        self.sends[worker] = [(r, b) for r, b in self.sends[worker] if r.test() is None]
        self.sends[worker].append((self.comm.Isend(buf, dest=worker + 1, tag=tag), buf))

    def send(self, worker: int, t: int, message: np.ndarray) -> None:
        buf = np.concatenate([[float(t)], message])
        if self.busy[worker]:
            self.waiting[worker] = buf
        else:
            self.busy[worker] = True
            self._post(worker, t % TAG_PERIOD, buf)

    def _take(self, worker: int, count: int) -> np.ndarray:
        """The reply in ``worker``'s buffer; reposts the receive and sends its waiting
        iterate, if any (the worker is idle again)."""
        payload = self.bufs[worker][:count].copy()
        self.recvs[worker] = self.comm.Irecv(self.bufs[worker], source=worker + 1)
        self.busy[worker] = False
        waiting, self.waiting[worker] = self.waiting[worker], None
        if waiting is not None:
            self.busy[worker] = True
            self._post(worker, int(waiting[0]) % TAG_PERIOD, waiting)
        return payload

    def next_reply(self) -> Reply | None:
        """The next reply; checks the stop flag and the progress deadline every
        ``CHECK_SECONDS`` while none comes. At the deadline the workers still owing an answer
        (busy) are named in ``unresponsive`` and ``failed_by`` says why."""
        while (found := poll_any(self.recvs, timeout=CHECK_SECONDS)) is None:
            if self.stop_requested():
                return None
            if time.monotonic() - self.last_reply >= self.progress_timeout:
                self.unresponsive = [i + 1 for i in range(self.m) if self.busy[i]]
                self.failed_by = (f"no reply for {self.progress_timeout:g} s; worker ranks "
                                  f"{self.unresponsive} silent, too few to go on")
                return None
        worker, status = found
        self.last_reply = time.monotonic()
        if status.tag == STOP:
            raise RuntimeError(f"worker rank {worker + 1} stopped before the master said so")
        payload = self._take(worker, status.count)
        t = int(payload[0])
        if status.tag != t % TAG_PERIOD:
            raise RuntimeError(f"reply tag {status.tag} does not match its iteration {t}")
        return worker, t, payload[1:]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        """Send stop to every worker and drain late replies until each acknowledged, for at
        most ``close_timeout`` seconds; the rest (and any already named silent by
        :meth:`next_reply`) are named in ``unresponsive`` and their
        requests are left pending (cancelling a receive a frozen sender has half delivered
        would block): never waits on anything a frozen worker would have to complete."""
        self.waiting = [None] * self.m
        for i in range(self.m):
            self._post(i, STOP, np.zeros(1))
        open_ = set(range(self.m)) - {r - 1 for r in self.unresponsive}
        deadline = time.monotonic() + self.close_timeout
        while open_ and time.monotonic() < deadline:
            for i in sorted(open_):
                status = self.recvs[i].test()
                if status is None:
                    continue
                if status.tag == STOP:
                    open_.discard(i)
                else:
                    self.discarded += 1
                    self._take(i, status.count)
            time.sleep(POLL_SECONDS)
        self.unresponsive = sorted(set(self.unresponsive) | {i + 1 for i in open_})
        for i in set(range(self.m)) - open_:
            Request.waitall([r for r, _ in self.sends[i]])
            self.sends[i] = []


def finish(comm: Communicator, rt: Runtime) -> list[int]:
    """Master side of the end of a solve: close ``rt`` and, when every worker acknowledged,
    meet the workers in a barrier (they call it after :func:`serve`). Returns the world ranks
    that never acknowledged; when there are any no barrier is entered (it would never end):
    the caller must not enter another collective, and the job ends by aborting them once its
    results are written (see :mod:`hpcml.launch`)."""
    rt.close()
    if not rt.unresponsive and comm.size > 1:
        comm.barrier()
    return rt.unresponsive


def serve(comm: Communicator, compute: Compute, message_len: int) -> int:
    """Worker loop (ranks 1..m): answer the master until it says stop; returns the number of
    iterations answered. ``compute(t, message)`` returns the reply (without t). The master
    sends a new iterate only once this worker's previous reply arrived, so every message
    received is the newest one meant for this worker. A master that sends nothing for the
    watchdog's timeout (frozen, hung) ends the job (:mod:`hpcml.comm.watchdog`)."""
    buf = np.empty(message_len + 1)
    answered = 0
    while True:
        with watching("Recv (peer 0): the master's next message"):
            while comm.Iprobe(source=0) is None:
                time.sleep(POLL_SECONDS)
        status = comm.Recv(buf, source=0)
        if status.tag == STOP:
            comm.Send(np.zeros(1), 0, tag=STOP)
            return answered
        t = int(buf[0])
        comm.straggle(t)
        reply = compute(t, buf[1:status.count].copy())
        comm.Send(np.concatenate([[float(t)], reply]), 0, tag=t % TAG_PERIOD)
        answered += 1


class SimulatedMaster(Runtime):
    """All m workers in this process. Worker i busy with iteration t finishes at its start
    time + ``delays.delay(i + 1, t)``; a message sent to a busy worker waits (replacing any
    older waiting one), as on MPI. ``elapsed`` is that virtual clock, the time the master
    would have waited for the injected delays alone (compute time is not counted, so a
    simulated run is deterministic: same seed, same erasure pattern, same iterates)."""

    def __init__(self, computes: list[Compute], delays: DelayModel,
                 stop: Callable[[], str | None] | None = None) -> None:
        super().__init__(stop)
        self.computes, self.delays, self.m = computes, delays, len(computes)
        self.now = 0.0
        self.busy: dict[int, tuple[float, int, np.ndarray]] = {}
        self.waiting: dict[int, tuple[int, np.ndarray]] = {}

    def _start(self, worker: int, t: int, message: np.ndarray, at: float) -> None:
        reply = self.computes[worker](t, message)
        self.busy[worker] = (at + self.delays.delay(worker + 1, t), t, reply)

    def send(self, worker: int, t: int, message: np.ndarray) -> None:
        if worker in self.busy:
            self.waiting[worker] = (t, message.copy())
        else:
            self._start(worker, t, message.copy(), self.now)

    def next_reply(self) -> Reply:
        worker = min(self.busy, key=lambda i: (self.busy[i][0], i))
        finish, t, reply = self.busy.pop(worker)
        self.now = max(self.now, finish)
        if worker in self.waiting:
            self._start(worker, *self.waiting.pop(worker), self.now)
        return worker, t, reply

    def elapsed(self) -> float:
        return self.now

    def close(self) -> None:
        """Workers still busy would answer after the end: their replies count as discarded."""
        self.discarded += len(self.busy)
        self.busy.clear()
        self.waiting.clear()
