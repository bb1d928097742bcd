"""Master/worker runtime that treats stragglers as erasures (Karakus et al., JMLR 2019).

Layout: world rank 0 is the master, ranks 1..m (m = size - 1) are the workers; worker i of m is
rank i + 1. With one rank, :class:`SimulatedMaster` runs the same protocol in-process with a
virtual clock, each worker's response time drawn from the same seeded delay model
(``delays.delay(i + 1, t)``), so serial and MPI runs see the same erasure patterns.

Protocol (every message a float64 vector whose first entry is the iteration t):
* the master sends iteration t's message to each worker with ``Isend`` (tag t mod 32000) and keeps
  one ``Irecv`` (any tag) posted per worker;
* a worker takes the newest message waiting for it (older queued iterates are skipped), sleeps
  its injected delay ``comm.straggle(t)``, computes and ``Send``s the reply tagged t;
* :meth:`Runtime.round` returns as soon as k replies *for iteration t* have arrived. Replies for
  older iterations (late stragglers) are received, counted in ``discarded`` and dropped: the
  iteration number carried in the payload (and the tag) is checked, so a late answer is never
  applied to a later iteration;
* :meth:`Runtime.close` sends a stop message (tag 32767); each worker acknowledges with the same
  tag, and the master drains every late reply before returning, so nothing stays in flight.
Only the master calls the ``Runtime`` methods; workers call :func:`serve`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hpcml.comm import Communicator, DelayModel, Request

TAG_PERIOD = 32000
POLL_SECONDS = 5e-5
STOP = 32767
Compute = Callable[[int, np.ndarray], np.ndarray]


class Runtime:
    """Master-side view of m workers; subclasses move the messages."""

    m: int

    def __init__(self) -> None:
        self.discarded = 0
        self.answered = 0

    def send(self, worker: int, t: int, message: np.ndarray) -> None:
        raise NotImplementedError

    def next_reply(self) -> tuple[int, int, np.ndarray]:
        """Block for the next reply from any worker: (worker, its iteration, payload)."""
        raise NotImplementedError

    def elapsed(self) -> float:
        """Seconds since the runtime started (virtual seconds when simulated)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers (MPI) and drain late replies."""

    def round(self, t: int, messages: list[np.ndarray], k: int) -> dict[int, np.ndarray]:
        """Send iteration t's message to every worker and return the first k replies to it,
        keyed by worker; late replies to earlier iterations are discarded."""
        for i in range(self.m):
            self.send(i, t, messages[i])
        fresh: dict[int, np.ndarray] = {}
        while len(fresh) < k:
            worker, it, payload = self.next_reply()
            if it == t:
                fresh[worker] = payload
            elif it < t:
                self.discarded += 1
            else:
                raise RuntimeError(f"worker {worker} answered future iteration {it} at {t}")
        self.answered += k
        return fresh


class MPIMaster(Runtime):
    """The master on world rank 0; ``reply_len`` is the longest reply (without the t entry)."""

    def __init__(self, comm: Communicator, reply_len: int) -> None:
        super().__init__()
        if comm.rank != 0 or comm.size < 2:
            raise ValueError("MPIMaster runs on rank 0 of a communicator with >= 2 ranks")
        self.comm, self.m = comm, comm.size - 1
        self.bufs = [np.empty(reply_len + 1) for _ in range(self.m)]
        self.recvs = [comm.Irecv(self.bufs[i], source=i + 1) for i in range(self.m)]
        self.sends: list[tuple[Request, np.ndarray]] = []
        self.start = time.perf_counter()

    def _post(self, worker: int, tag: int, buf: np.ndarray) -> None:
        self.sends = [(r, b) for r, b in self.sends if r.test() is None]
        self.sends.append((self.comm.Isend(buf, dest=worker + 1, tag=tag), buf))

    def send(self, worker: int, t: int, message: np.ndarray) -> None:
        self._post(worker, t % TAG_PERIOD, np.concatenate([[float(t)], message]))

    def _take(self, worker: int, count: int) -> np.ndarray:
        payload = self.bufs[worker][:count].copy()
        self.recvs[worker] = self.comm.Irecv(self.bufs[worker], source=worker + 1)
        return payload

    def next_reply(self) -> tuple[int, int, np.ndarray]:
        worker, status = _poll(self.recvs)
        payload = self._take(worker, status.count)
        t = int(payload[0])
        if status.tag != t % TAG_PERIOD:
            raise RuntimeError(f"reply tag {status.tag} does not match its iteration {t}")
        return worker, t, payload[1:]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        for i in range(self.m):
            self._post(i, STOP, np.zeros(1))
        for i in range(self.m):
            while True:
                _, status = _poll([self.recvs[i]])
                if status.tag == STOP:
                    break
                self.discarded += 1
                self._take(i, status.count)
        Request.waitall([r for r, _ in self.sends])
        self.sends = []


def _poll(requests: list[Request]) -> tuple[int, Any]:
    """Wait for any of ``requests`` by testing them with short sleeps in between, instead of
    MPI's busy wait: ranks oversubscribing the cores (5 ranks on 2 cores) then leave the CPU
    to the ranks that compute. Adds at most ``POLL_SECONDS`` of latency."""
    while True:
        for i, req in enumerate(requests):
            status = req.test()
            if status is not None:
                return i, status
        time.sleep(POLL_SECONDS)


def _pending(comm: Communicator) -> bool:
    """Whether a message from the master waits. A single Iprobe may return before MPI's
    progress engine has matched a message already queued (MPICH alternates), so two probes
    must both miss before the queue counts as empty."""
    return comm.Iprobe(source=0) is not None or comm.Iprobe(source=0) is not None


def serve(comm: Communicator, compute: Compute, message_len: int) -> int:
    """Worker loop (ranks 1..m): answer the master until it says stop; returns the number of
    iterations answered. ``compute(t, message)`` returns the reply (without t)."""
    buf = np.empty(message_len + 1)
    answered = 0
    while True:
        while comm.Iprobe(source=0) is None:
            time.sleep(POLL_SECONDS)
        status = comm.Recv(buf, source=0)
        while status.tag != STOP and _pending(comm):
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

    def __init__(self, computes: list[Compute], delays: DelayModel) -> None:
        super().__init__()
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

    def next_reply(self) -> tuple[int, int, np.ndarray]:
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
