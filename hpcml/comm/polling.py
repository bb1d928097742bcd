"""Waiting on non-blocking requests without MPI's busy wait.

``MPI_Wait*`` spins at 100 % CPU; ranks that oversubscribe the cores (5 ranks on 2 cores) or
wait on a frozen peer then steal the CPU from the ranks that compute. These helpers ``test`` the
requests with short sleeps in between (at most ``sleep`` seconds of added latency) and can give
up at a deadline, so a caller never waits forever on a peer that stopped answering. Each call is
one wait the collective watchdog watches (:mod:`hpcml.comm.watchdog`), named by the request
still pending.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hpcml.comm.request import Request
from hpcml.comm.status import Status
from hpcml.comm.watch import WATCH, watching

POLL_SECONDS = 5e-5


def poll_any(requests: Sequence[Request], sleep: float = POLL_SECONDS,
             timeout: float | None = None) -> tuple[int, Status] | None:
    """Index and status of the first of ``requests`` found complete (already complete ones
    included); None when ``timeout`` seconds passed first. Not collective."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with watching(requests[0] if requests else "nothing"):
        while True:
            for i, req in enumerate(requests):
                status = req.test()
                if status is not None:
                    return i, status
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(sleep)


def poll_all(requests: Sequence[Request], sleep: float = POLL_SECONDS) -> list[Status]:
    """Statuses of ``requests`` once every one is complete. Not collective."""
    statuses = []
    with watching(requests[0] if requests else "nothing"):
        for req in requests:
            WATCH.what = req  # named by the request still pending, timed from the start
            while (status := req.test()) is None:
                time.sleep(sleep)
            statuses.append(status)
    return statuses
