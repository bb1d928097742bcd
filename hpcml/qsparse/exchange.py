"""How a worker's compressed update reaches the others (the only MPI-facing part of qsparse).

- :class:`AllgatherExchange` (synchronous Qsparse-local-SGD, Algorithm 1): every rank of the
  communicator is a worker; at a synchronization index all ranks exchange their variable-length
  payloads with :func:`hpcml.parallel.allgatherv` (``Allgather`` of byte counts + ``Allgatherv``
  of bytes), decode them in rank order and move from ``x_sync`` by their average. Collective
  over the communicator.
- :class:`ServerExchange` + :class:`Server` (asynchronous Qsparse-local-SGD, Algorithm 2): rank
  ``server`` holds the global model; a worker sends its payload with ``Isend`` and receives the
  server's current model with ``Irecv`` whenever *its own* schedule says so, so workers never
  wait for each other. The server polls with ``Iprobe`` and applies ``x <- x - g_r / R`` to
  whichever update arrives (``R`` = number of workers), then answers that worker with a
  non-blocking send; a frozen or dead worker never stalls it (see :class:`Server`).

Stopping early (preemption): the server alone decides (its ``stop`` callable, e.g. its own
SIGUSR1/SIGTERM flag; Slurm and Hydra signal every rank). From then on it answers every update
with the model tagged ``STOP_TAG`` instead of ``MODEL_TAG``; a worker sees the tag on the reply it
waits for anyway (:attr:`ServerExchange.stopped`), so it stops within its own sync period, with
no extra message and no race with its ``DONE``. ``DONE`` carries the worker's local step count.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from hpcml.comm import ANY_SOURCE, ANY_TAG, Communicator, Request
from hpcml.comm.polling import POLL_SECONDS, poll_all
from hpcml.parallel import allgatherv, broadcast_parameters, gather_counts
from hpcml.qsparse.compressors import Compressor, Payload

UPDATE_TAG, MODEL_TAG, DONE_TAG, STOP_TAG = 41, 42, 43, 44
WORKER_TIMEOUT = 30.0


class AllgatherExchange:
    """Synchronous exchange; every rank of ``comm`` is a worker (collective methods)."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.workers = comm.size

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        """Collective: rank 0's starting point on every rank."""
        broadcast_parameters([x], self.comm, root=0)
        return x

    def exchange(self, payload: Payload, compressor: Compressor,
                 x_sync: torch.Tensor) -> torch.Tensor:
        """Collective: ``x_sync - (1/P) sum_r decode(payload_r)``, identical on every rank."""
        comm = self.comm
        sizes = gather_counts(comm, payload.data.size)
        gathered = allgatherv(comm, payload.data, sizes)
        total = torch.zeros_like(x_sync)
        offset = 0
        for n in sizes.tolist():
            total += compressor.decode(gathered[offset: offset + n], x_sync.numel(), x_sync.dtype)
            offset += n
        return x_sync - total / comm.size

    def close(self, local_steps: int) -> None:
        """Nothing to release."""


class ServerExchange:
    """Worker side of the asynchronous variant (not collective except :meth:`initial`). A
    worker has at most one update in flight: it waits (polling, not spinning) for the server's
    model before its next local step, so a frozen server or worker never queues messages.
    That wait is watched by the collective watchdog: a server that answers nothing for its
    timeout ends the job with one line naming the server (:mod:`hpcml.comm.watchdog`).
    ``stopped`` turns True when a reply said the server is stopping the run."""

    def __init__(self, comm: Communicator, server: int = 0,
                 poll_seconds: float = POLL_SECONDS) -> None:
        if comm.size < 2:
            raise ValueError("asynchronous Qsparse-local-SGD needs >= 2 ranks (a server and a "
                             "worker)")
        self.comm, self.server, self.poll_seconds = comm, server, poll_seconds
        self.workers = comm.size - 1
        self.stopped = False

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        """Collective (with :class:`Server`): the server's starting point."""
        return self.comm.Bcast(x, root=self.server)

    def exchange(self, payload: Payload, compressor: Compressor,
                 x_sync: torch.Tensor) -> torch.Tensor:
        """Send this worker's update; return the server's model after applying it (and note
        in ``stopped`` whether the server is stopping the run)."""
        model = torch.empty_like(x_sync)
        reply = self.comm.Irecv(model, source=self.server, tag=ANY_TAG)
        update = self.comm.Isend(payload.data, dest=self.server, tag=UPDATE_TAG)
        self.stopped |= poll_all([update, reply], self.poll_seconds)[1].tag == STOP_TAG
        return model

    def close(self, local_steps: int) -> None:
        """Tell the server this worker has finished after ``local_steps`` local steps."""
        self.comm.Send(np.array([local_steps], dtype=np.int64), dest=self.server, tag=DONE_TAG)


class Server:
    """The global model of asynchronous Qsparse-local-SGD, on rank ``server``.

    Nothing the server does waits on one worker: an update is received with ``Irecv`` once
    ``Iprobe`` saw it and completed by polling; the reply (a snapshot of the model) goes out
    with ``Isend`` and is completed later. A worker sends its next update only after it got
    the reply to the last one, so per worker at most one update and one reply (d values each)
    are in flight: the server's memory is bounded by ``2 * workers * d`` values whatever a
    frozen worker does. The server goes on as long as any worker sends updates; once every
    worker that has not finished has been silent for ``timeout`` seconds they are named in
    ``unresponsive`` (world ranks) and :meth:`serve` returns without them. When no worker
    finished at all (every one frozen or dead), ``failed_by`` says so.
    ``local_steps``: each finished worker's local step count (world rank -> steps);
    ``stopped_by``: why the server stopped the run early (None when it ran to the end)."""

    def __init__(self, comm: Communicator, x: torch.Tensor, compressor: Compressor,
                 server: int = 0, poll_seconds: float = 2e-4,
                 timeout: float = WORKER_TIMEOUT) -> None:
        self.comm, self.compressor, self.server = comm, compressor, server
        self.workers = comm.size - 1
        self.x = comm.Bcast(x.detach().clone(), root=server)
        self.poll_seconds, self.timeout = poll_seconds, timeout
        self.updates = 0
        self.bits_up = {r: 0 for r in range(comm.size) if r != server}
        self.bits_down = 0
        self.unresponsive: list[int] = []
        self.local_steps: dict[int, int] = {}
        self.stopped_by: str | None = None
        self.failed_by: str | None = None

    def serve(self, on_update: Callable[[Server], None] | None = None,
              stop: Callable[[], str | None] | None = None) -> torch.Tensor:
        """Apply updates as they arrive until every worker has sent DONE (or the rest are
        unresponsive, see the class); returns the model. ``on_update(self)`` runs after each
        applied update (e.g. to evaluate). ``stop()`` (local, polled between messages) returns
        a reason to end the run early: from then on every reply tells its worker to stop (see
        the module). Replies to unresponsive workers stay pending."""
        d, dtype = self.x.numel(), self.x.dtype
        update_bits = self.compressor.bits(d, dtype)
        receiving: dict[int, tuple[Request, np.ndarray, int]] = {}
        replies: dict[int, list[tuple[Request, torch.Tensor]]] = {r: [] for r in self.bits_up}
        heard = dict.fromkeys(self.bits_up, time.monotonic())
        finished: set[int] = set()
        while len(finished) < self.workers:
            if stop is not None and self.stopped_by is None:
                self.stopped_by = stop()
            status = self.comm.Iprobe(ANY_SOURCE, ANY_TAG)
            progressed = status is not None and status.source not in receiving
            if progressed:
                buf = np.empty(status.nbytes, dtype=np.uint8)
                receiving[status.source] = (self.comm.Irecv(buf, source=status.source,
                                                            tag=status.tag), buf, status.tag)
            for src, (req, buf, tag) in list(receiving.items()):
                if req.test() is None:
                    continue
                del receiving[src]
                heard[src], progressed = time.monotonic(), True
                if tag == DONE_TAG:
                    finished.add(src)
                    self.local_steps[src] = int(buf.view(np.int64)[0])
                    continue
                self.x -= self.compressor.decode(buf, d, dtype) / self.workers
                snapshot = self.x.clone()
                replies[src] = [(r, b) for r, b in replies[src] if r.test() is None]
                tag = STOP_TAG if self.stopped_by else MODEL_TAG
                replies[src].append((self.comm.Isend(snapshot, dest=src, tag=tag), snapshot))
                self.updates += 1
                self.bits_up[src] += update_bits
                self.bits_down += d * torch.finfo(dtype).bits
                if on_update is not None:
                    on_update(self)
            if not progressed:
                silent = [r for r in heard if r not in finished
                          and time.monotonic() - heard[r] > self.timeout]
                if len(finished) + len(silent) == self.workers:
                    self.unresponsive = sorted(silent)
                    if not finished:
                        self.failed_by = (f"every worker silent for {self.timeout:g} s, none "
                                          "finished")
                    break
                time.sleep(self.poll_seconds)
        for src, pending in replies.items():
            if src not in self.unresponsive:
                poll_all([r for r, _ in pending], self.poll_seconds)
        return self.x
