"""``WATCH``: what this rank is blocked in, read by the watchdog (:mod:`hpcml.comm.watchdog`).

The comm layer writes it around every call that waits for other ranks (blocking collectives and
point-to-point calls, ``wait`` of a request or a persistent operation, the polling loops), at
the cost of three attribute writes a call: ``since`` (the ``perf_counter`` time the wait began)
and ``what`` before, ``what = None`` after. The watchdog thread only reads it. ``what`` is the
ledger accumulator of the op (:class:`~hpcml.comm.ledger.OpTotals`), the ``Request`` or
``Persistent`` waited on, or a text; the watchdog names it only when it fires.

``step`` is the step a loop declared (``Communicator.straggle(t)``, which every hpcml job loop
calls at each iteration); ``optimizer_steps`` counts the ``DistributedOptimizer.step()`` calls
completed on this rank, the step of a loop that declares none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from time import perf_counter
from typing import Any


class Watch:
    """This process's current wait (see the module docstring). Written by the thread that
    communicates, read by the watchdog thread; one per process."""

    __slots__ = ("optimizer_steps", "since", "step", "what")

    def __init__(self) -> None:
        self.what: Any = None
        self.since = 0.0
        self.step: int | None = None
        self.optimizer_steps = 0


WATCH = Watch()


@contextlib.contextmanager
def watching(what: Any) -> Iterator[None]:
    """Mark the body as one wait for other ranks, described by ``what`` (a text, or what
    :data:`WATCH` holds; e.g. a polling loop for a message): the watchdog ends the job when it
    lasts longer than its timeout. Not collective; must not enclose another watched call (that
    call marks its own wait). The hot paths of the comm layer write :data:`WATCH` inline
    instead (a context manager costs about a microsecond)."""
    WATCH.since = perf_counter()
    WATCH.what = what
    try:
        yield
    finally:
        WATCH.what = None
