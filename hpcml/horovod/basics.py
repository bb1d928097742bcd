"""Horovod's process model over :mod:`hpcml.comm`: ``init``, ranks and sizes, what is built,
the reduction-op constants, and the handles of asynchronous operations.

``init()`` (collective over the job) takes :func:`hpcml.comm.world` and splits it once into
the node-local communicator (``local_rank``/``local_size``) and the one across nodes of equal
local rank (``cross_rank``/``cross_size``), as Horovod does. Every query before ``init()`` (or
after ``shutdown()``) raises ``ValueError`` naming the fix, as Horovod does.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from hpcml.comm import Communicator, Request, install_excepthook, world
from hpcml.comm.info import thread_multiple

# Horovod's reduction-op values (horovod/common/basics.py); ``op=None`` means Average.
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max",
            Product: "Product"}
MPI_OPS = {Average: "sum", Sum: "sum", Min: "min", Max: "max", Product: "prod"}


class ProcessSet:
    """The ranks an operation runs over. Only the global set (every rank) exists here."""

    def __init__(self, ranks: list[int] | None = None) -> None:
        self.ranks = ranks

    def __repr__(self) -> str:
        return "ProcessSet(global)" if self.ranks is None else f"ProcessSet({self.ranks})"


global_process_set = ProcessSet()


@dataclasses.dataclass
class _State:
    comm: Communicator
    local: Communicator
    cross: Communicator


_STATE: _State | None = None


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Start Horovod over every rank of the job (collective; a second call does nothing).
    ``comm``: ``None`` (every rank) or an :class:`hpcml.comm.Communicator`. From now on an
    uncaught exception on one rank prints its traceback and ends the whole job (instead of
    leaving the other ranks waiting in a collective)."""
    global _STATE
    if comm is not None and not isinstance(comm, Communicator):
        raise ValueError("hpcml.horovod: init(comm=...): only None or an "
                         "hpcml.comm.Communicator is supported (split hpcml.comm.world())")
    if process_sets is not None:
        raise ValueError("hpcml.horovod: init(process_sets=...): process sets are not "
                         "implemented (use hpcml.comm.world().split)")
    if _STATE is None:
        base = comm if comm is not None else world()
        local = base.split_shared()
        cross = base.split(local.rank, base.rank, name="cross")
        _STATE = _State(base, local, cross)
        install_excepthook()


def shutdown() -> None:
    """Forget the Horovod state (MPI stays initialized, so ``init()`` may be called again)."""
    global _STATE
    _STATE = None
    _HANDLES.clear()


def is_initialized() -> bool:
    return _STATE is not None


def _state() -> _State:
    if _STATE is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _STATE


def communicator(process_set: ProcessSet | None = None) -> Communicator:
    """The communicator an operation runs over; refuses process sets other than the global."""
    if process_set is not None and process_set is not global_process_set:
        raise ValueError("hpcml.horovod: process_set: only the global process set is "
                         "implemented (leave process_set out)")
    return _state().comm


def size() -> int:
    return _state().comm.size


def rank() -> int:
    return _state().comm.rank


def local_size() -> int:
    return _state().local.size


def local_rank() -> int:
    return _state().local.rank


def cross_size() -> int:
    return _state().cross.size


def cross_rank() -> int:
    return _state().cross.rank


def is_homogeneous() -> bool:
    """Whether every node runs the same number of ranks (collective)."""
    st = _state()
    return len(set(st.comm.allgather(st.local.size))) == 1


def mpi_threads_supported() -> bool:
    """Whether MPI runs with ``MPI_THREAD_MULTIPLE``."""
    _state()
    return thread_multiple()


def mpi_enabled() -> bool:
    return True


def mpi_built() -> bool:
    return True


def gloo_enabled() -> bool:
    return False


def gloo_built() -> bool:
    return False


def nccl_built() -> bool:
    return False


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return False


def rocm_built() -> bool:
    return False


# -- handles of asynchronous operations --------------------------------------------------------
@dataclasses.dataclass
class _Pending:
    """An operation in flight: ``request`` (None when already complete) and ``finish``, which
    turns the completed buffers into the operation's result."""

    request: Request | None
    finish: Callable[[], Any]


_HANDLES: dict[int, _Pending] = {}
_NEXT = itertools.count()


def new_handle(request: Request | None, finish: Callable[[], Any]) -> int:
    handle = next(_NEXT)
    _HANDLES[handle] = _Pending(request, finish)
    return handle


def _pending(handle: int) -> _Pending:
    try:
        return _HANDLES[handle]
    except KeyError:
        raise ValueError(f"hpcml.horovod: handle {handle!r} is unknown or already "
                         "synchronized") from None


def poll(handle: int) -> bool:
    """True when the operation of ``handle`` has completed (then ``synchronize`` won't block).
    Not collective."""
    pending = _pending(handle)
    return pending.request is None or pending.request.test() is not None


def synchronize(handle: int) -> Any:
    """Wait for the operation of ``handle`` and return its result; the handle is spent."""
    pending = _pending(handle)
    if pending.request is not None:
        pending.request.wait()
    del _HANDLES[handle]
    return pending.finish()
