"""The collective watchdog: a rank blocked in one communication call for longer than the
timeout ends the whole job with one line naming the call, the step and the rank that stopped
answering, instead of hanging until the scheduler's time limit.

Contract:

- **Timeout**: the job key ``watchdog_timeout`` (seconds, every job kind, default
  :data:`DEFAULT_TIMEOUT` = 600 s, the 10 minutes of torch's default NCCL process-group
  timeout);
  the environment variable ``HPCML_WATCHDOG_TIMEOUT`` wins over the key (and sets the timeout of
  scripts that run without a job file, e.g. a ``DistributedOptimizer`` loop). ``0`` turns the
  watchdog off. A bad value of the variable is a usage error (exit 2).
- **What is watched**: every call of the comm layer that waits for other ranks (blocking
  collectives and point-to-point calls, ``Request.wait``, ``Persistent.run``/``wait``, the
  polling loops of :mod:`hpcml.comm.polling`, and loops marked with
  :func:`~hpcml.comm.watch.watching`, such as a coded worker's wait for its master) marks
  itself in :data:`~hpcml.comm.watch.WATCH`; a wait that lasts longer than the timeout fires.
  The time counted is the time the watchdog thread saw the wait go on, a gap between two of
  its looks counting at most :data:`MAX_GAP`: a rank that was itself stopped (``SIGSTOP``,
  a suspended job) and resumes in the middle of a wait starts counting anew, so it never blames
  the others for its own absence.
- **Heartbeat**: the firing rank's watchdog thread pings every other rank on a duplicate of
  ``MPI_COMM_WORLD``; each rank's watchdog thread answers within :data:`TICK` seconds with
  where its rank is. A process that is stopped (``SIGSTOP``), hung in the kernel or otherwise
  not running answers nothing for :data:`HEARTBEAT_SECONDS` and is named as the rank that
  stopped answering. When every rank answers (a rank alive but elsewhere: a deadlock, a rank
  computing for longer than the timeout), the line says where each rank not blocked in the
  same call is: the call it is blocked in, or the code it runs (``file:line in function``).
- **End**: the line goes to stderr, then after :data:`LINGER` seconds (so that the other
  ranks blocked in the same call print theirs and mpiexec forwards the output) the rank calls
  ``MPI_Abort`` with :data:`WATCHDOG_EXIT` (4); mpiexec then kills every rank, stopped ones
  included, and exits 4. The line::

      hpcml: watchdog: rank 0 blocked 10 s in Allreduce at step 12; rank 1 stopped answering
      (no heartbeat within 2 s); aborting the job (exit code 4)

  (one line; the job's run directory keeps what was written before: metrics, checkpoints).
  When the job spans several hostnames, each rank named is followed by its host:
  ``rank 0 (node1) blocked ...; rank 1 (node2) stopped answering ...``.
- **Threads**: the watchdog thread makes MPI calls, which needs ``MPI_THREAD_MULTIPLE``
  (mpi4py asks for it by default; the MPICH wheel provides it). Under a lower thread level it
  makes none: it fires the same way but cannot name the silent rank, and ends its process with
  ``os._exit(4)`` (mpiexec then ends the others).
- **Cost**: three attribute writes per watched call; the thread wakes every :data:`TICK`
  seconds (one ``MPI_Test``) and sends nothing until it fires.

Ranks are ``MPI_COMM_WORLD`` ranks; the watchdog runs on jobs of two or more ranks, started by
:func:`hpcml.comm.world` (collective) and stopped when the process exits.
"""

from __future__ import annotations

import atexit
import math
import os
import platform
import sys
import threading
from time import monotonic, perf_counter, sleep
from typing import Any

from mpi4py import MPI

from hpcml.comm.ledger import Ledger, OpTotals
from hpcml.comm.persistent import Persistent
from hpcml.comm.request import Request
from hpcml.comm.watch import WATCH, Watch
from hpcml.errors import UsageError

DEFAULT_TIMEOUT = 600.0
ENV = "HPCML_WATCHDOG_TIMEOUT"
WATCHDOG_EXIT = 4
TICK = 0.2  # seconds between two looks at this rank's wait (and at peers' pings)
HEARTBEAT_SECONDS = 2.0  # how long a firing rank waits for the other ranks' answers
LINGER = 0.5  # seconds between the line and MPI_Abort
MAX_GAP = 1.0  # at most this much of one gap between two looks counts as time blocked
PING, PONG = 1, 2  # tags on the watchdog's own duplicate of MPI_COMM_WORLD
LISTED = 4  # ranks described one by one in a line


def timeout_from_env() -> float | None:
    """The timeout ``HPCML_WATCHDOG_TIMEOUT`` sets (None when unset or empty). Raises
    ``UsageError`` for anything but a finite number of seconds >= 0."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{ENV}: must be a number of seconds >= 0, got {raw!r} (0 turns the "
                         "watchdog off; unset it to use the job's watchdog_timeout)")
    return value


def effective_timeout(key: float) -> float:
    """The timeout of a job whose ``watchdog_timeout`` key is ``key``: the environment
    variable's when set, else ``key`` (pure but for reading the environment)."""
    env = timeout_from_env()
    return key if env is None else env


def describe(what: Any, ledger: Ledger) -> str:
    """The name of a wait as :data:`WATCH` holds it: the op (with its communicator's prefix),
    the request's op with its peer and tag, or the text given to ``watching``."""
    if isinstance(what, Request):
        name = ledger.name_of(what.totals) or "a request"
        if what.peer < 0:
            return name
        return f"{name} (peer {what.peer}" + (f", tag {what.tag})" if what.tag >= 0 else ")")
    if isinstance(what, Persistent | OpTotals):
        return ledger.name_of(what.totals if isinstance(what, Persistent) else what) \
            or "a communication call"
    return str(what)


def step_text(watch: Watch) -> str:
    """``"at step 12"`` (declared by the loop), ``"after 3 DistributedOptimizer steps"``, or
    ``"before any step"``."""
    if watch.step is not None:
        return f"at step {watch.step}"
    if watch.optimizer_steps:
        return f"after {watch.optimizer_steps} DistributedOptimizer steps"
    return "before any step"


# (the wait's name or None, seconds in it, step text, the code the main thread runs or "")
State = tuple[str | None, float, str, str]


def running(thread: int | None) -> str:
    """``"train.py:183 in _local_training"``: the innermost frame of thread ``thread`` (the
    code a rank not blocked in communication is running), or "" when unknown."""
    frame = sys._current_frames().get(thread) if thread is not None else None
    if frame is None:
        return ""
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"


def state_of(watch: Watch, ledger: Ledger, thread: int | None = None) -> State:
    """Where this rank is now, as a heartbeat answer tells it (``thread``: the ident of the
    thread that communicates, whose code is named when it is not blocked)."""
    what, since = watch.what, watch.since
    if what is None:
        return None, 0.0, step_text(watch), running(thread)
    return describe(what, ledger), perf_counter() - since, step_text(watch), ""


def where(state: State) -> str:
    what, seconds, step, code = state
    if what is None:
        return f"not blocked in communication, {step}" + (f" ({code})" if code else "")
    return f"blocked {seconds:.0f} s in {what} {step}"


def on_hosts(ranks: list[int], hosts: list[str] | None) -> str:
    """`` (node2)`` / `` (node2, node3)``: the hostnames of ``ranks`` when the job spans more
    than one hostname (``hosts[r]`` is rank r's), else nothing (pure)."""
    if not hosts or len(set(hosts)) < 2:
        return ""
    return f" ({', '.join(sorted({hosts[r] for r in ranks}))})"


def verdict(mine: State, silent: list[int], answers: dict[int, State] | None,
            hosts: list[str] | None = None) -> str:
    """The middle of the line: who stopped answering (and on which hosts, see
    :func:`on_hosts`), or where the answering ranks are when none did. ``answers`` is None
    when there was no heartbeat (no MPI_THREAD_MULTIPLE)."""
    if answers is None:
        return ("the rank that stopped answering is unknown (the heartbeat needs "
                "MPI_THREAD_MULTIPLE)")
    if silent:
        who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {silent}"
        return (f"{who}{on_hosts(silent, hosts)} stopped answering (no heartbeat within "
                f"{HEARTBEAT_SECONDS:g} s)")
    elsewhere = sorted(r for r, s in answers.items() if s[::2] != mine[::2])
    if not elsewhere:
        return "every rank answers the heartbeat and is blocked in the same call"
    listed = ", ".join(f"rank {r} {where(answers[r])}" for r in elsewhere[:LISTED])
    more = f" and {len(elsewhere) - LISTED} more" if len(elsewhere) > LISTED else ""
    return f"every rank answers the heartbeat; {listed}{more}"


def line(rank: int, mine: State, silent: list[int], answers: dict[int, State] | None,
         hosts: list[str] | None = None) -> str:
    """The one line a firing rank writes (pure); ``hosts`` (rank r's hostname at r) adds the
    hostnames of the firing and the silent ranks when the job spans several."""
    what, seconds, step, _ = mine
    return (f"hpcml: watchdog: rank {rank}{on_hosts([rank], hosts)} blocked {seconds:.0f} s in "
            f"{what} {step}; {verdict(mine, silent, answers, hosts)}; aborting the job (exit "
            f"code {WATCHDOG_EXIT})")


class Watchdog:
    """The watchdog thread of this rank (see the module docstring). Construction is collective
    over ``MPI_COMM_WORLD`` (it duplicates it); ``ledger`` names the ops in the line."""

    def __init__(self, ledger: Ledger, timeout: float) -> None:
        self.ledger, self.timeout = ledger, timeout
        self.heartbeat = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.hosts: list[str] = self.comm.allgather(platform.node())
        self._ping: MPI.Request | None = None
        self._sends: list[MPI.Request] = []
        self._main = threading.get_ident()  # the thread that communicates (constructs this)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcml-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """End the thread (it cancels its pending receive); returns once it has, so MPI can be
        finalized. A firing watchdog is left to end the job."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        if self.heartbeat:
            self._ping = self.comm.irecv(source=MPI.ANY_SOURCE, tag=PING)
        last, blocked, tick = None, 0.0, monotonic()
        while not self._stop.wait(TICK):
            now = monotonic()
            gap, tick = min(now - tick, MAX_GAP), now
            self._answer()
            what, since = WATCH.what, WATCH.since
            blocked = blocked + gap if what is not None and since == last else 0.0
            last = since if what is not None else None
            if 0 < self.timeout < blocked:
                self._fire()
        if self._ping is not None:
            MPI.Request.Cancel(self._ping)
            MPI.Request.Wait(self._ping)

    def _answer(self) -> None:
        """Answer every ping that arrived with this rank's state; release finished sends."""
        self._sends = [r for r in self._sends if not MPI.Request.Test(r)]
        if self._ping is None:
            return
        while True:
            arrived, source = self._ping.test()
            if not arrived:
                return
            self._sends.append(self.comm.isend(state_of(WATCH, self.ledger, self._main),
                                               dest=source, tag=PONG))
            self._ping = self.comm.irecv(source=MPI.ANY_SOURCE, tag=PING)

    def _heartbeat(self) -> tuple[list[int], dict[int, State]]:
        """Ping every other rank; (ranks silent for HEARTBEAT_SECONDS, the others' states)."""
        peers = [r for r in range(self.size) if r != self.rank]
        self._sends += [self.comm.isend(self.rank, dest=r, tag=PING) for r in peers]
        pending = {r: self.comm.irecv(source=r, tag=PONG) for r in peers}
        answers: dict[int, State] = {}
        deadline = monotonic() + HEARTBEAT_SECONDS
        while pending and monotonic() < deadline:
            self._answer()
            for r, req in list(pending.items()):
                arrived, state = req.test()
                if arrived:
                    answers[r] = state
                    del pending[r]
            sleep(0.01)
        return sorted(pending), answers

    def _fire(self) -> None:
        """Write the line and end the job (never returns)."""
        mine = state_of(WATCH, self.ledger)
        silent, answers = self._heartbeat() if self.heartbeat else ([], None)
        sys.stdout.flush()
        # a newline first: the line must not continue a progress bar's (tqdm ends with \r)
        sys.stderr.write(f"\n{line(self.rank, mine, silent, answers, self.hosts)}\n")
        sys.stderr.flush()
        sleep(LINGER)
        if self.heartbeat:
            MPI.COMM_WORLD.Abort(WATCHDOG_EXIT)
        else:  # MPI_Abort from this thread would need MPI_THREAD_MULTIPLE too
            os._exit(WATCHDOG_EXIT)


_WATCHDOG: Watchdog | None = None


def start(ledger: Ledger) -> None:
    """Start this rank's watchdog with the environment's timeout (else the default). Collective
    over ``MPI_COMM_WORLD``, once per process (:func:`hpcml.comm.world` calls it); nothing
    happens on a single rank. Raises ``UsageError`` for a bad ``HPCML_WATCHDOG_TIMEOUT``."""
    global _WATCHDOG
    timeout = effective_timeout(DEFAULT_TIMEOUT)
    if _WATCHDOG is None and MPI.COMM_WORLD.Get_size() > 1:
        _WATCHDOG = Watchdog(ledger, timeout)
        _WATCHDOG.start()


def set_timeout(key: float) -> float:
    """Apply a job's ``watchdog_timeout`` (the environment variable still wins); returns the
    timeout in force. Not collective (every rank sets the same)."""
    timeout = effective_timeout(key)
    if _WATCHDOG is not None:
        _WATCHDOG.timeout = timeout
    return timeout


def current_timeout() -> float:
    """The timeout in force on this rank (seconds; 0: off): the running watchdog's, else the
    one :func:`start` would use. Not collective."""
    return _WATCHDOG.timeout if _WATCHDOG is not None else effective_timeout(DEFAULT_TIMEOUT)
