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
    """The ranks (global ranks, sorted) an operation runs over; ``ProcessSet()`` is every rank.
    A set is usable after :func:`add_process_set` (or ``init(process_sets=[...])``) on every
    rank; operations given it run over its ranks only, and only its ranks may call them.
    ``root_rank`` arguments stay global ranks, as in Horovod."""

    def __init__(self, ranks: Any = None) -> None:
        self.ranks = None if ranks is None else sorted(int(r) for r in ranks)
        self.comm: Communicator | None = None  # this rank's view, once added (members only)
        self.added = ranks is None

    def __repr__(self) -> str:
        return "ProcessSet(global)" if self.ranks is None else f"ProcessSet({self.ranks})"

    def _all(self) -> list[int]:
        return list(range(size())) if self.ranks is None else self.ranks

    def size(self) -> int:
        return len(self._all())

    def included(self) -> bool:
        return rank() in self._all()

    def rank(self) -> int:
        """This rank's position in the set (for the results of e.g. allgather)."""
        return set_rank(self, rank())


global_process_set = ProcessSet()


class HorovodInternalError(RuntimeError):
    """Horovod's error for a collective the ranks cannot complete (here: ranks that posted
    collectives differing in kind, op, root, dtype or shape); raised on every rank alike."""


def add_process_set(process_set: ProcessSet | Any) -> ProcessSet:
    """Register ``process_set`` (or a list of global ranks). Collective over every rank of the
    job: all call it with the same ranks, in the same order."""
    st = _state()
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    if ps.ranks is None or ps.added:
        raise ValueError(f"hpcml.horovod: add_process_set: {ps} is already added")
    if len(set(ps.ranks)) != len(ps.ranks) or not ps.ranks or \
            not 0 <= ps.ranks[0] <= ps.ranks[-1] < st.comm.size:
        raise ValueError(f"hpcml.horovod: add_process_set: ranks {ps.ranks} must be distinct "
                         f"ranks of the job (0..{st.comm.size - 1})")
    from hpcml.horovod.join import negotiate  # join builds on this module

    negotiate("add_process_set", None)
    member = st.comm.rank in ps.ranks
    sub = st.comm.split(0 if member else 1, st.comm.rank, name=f"process_set{ps.ranks}")
    ps.comm, ps.added = (sub if member else None), True
    st.sets.append(ps)
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Forget an added set (not the global one; returns False for it). Not collective."""
    st = _state()
    if process_set.ranks is None or process_set not in st.sets:
        return False
    st.sets.remove(process_set)
    process_set.comm, process_set.added = None, False
    return True


def set_rank(process_set: ProcessSet | None, global_rank: int) -> int:
    """The position of ``global_rank`` in ``process_set`` (the global set when None)."""
    ranks = (process_set or global_process_set)._all()
    if global_rank not in ranks:
        raise ValueError(f"hpcml.horovod: rank {global_rank} is not in "
                         f"{process_set or global_process_set} (ranks {ranks})")
    return ranks.index(global_rank)


@dataclasses.dataclass
class _State:
    comm: Communicator
    local: Communicator
    cross: Communicator
    sets: list[ProcessSet] = dataclasses.field(default_factory=list)


_STATE: _State | None = None


def init(comm: Any = None, process_sets: list[ProcessSet] | None = None) -> None:
    """Start Horovod over every rank of the job (collective; a second call does nothing).
    ``comm``: ``None`` (every rank) or an :class:`hpcml.comm.Communicator`; ``process_sets``:
    sets to add at once (:func:`add_process_set`). From now on an
    uncaught exception on one rank prints its traceback and ends the whole job (instead of
    leaving the other ranks waiting in a collective)."""
    global _STATE
    if comm is not None and not isinstance(comm, Communicator):
        raise ValueError("hpcml.horovod: init(comm=...): only None or an "
                         "hpcml.comm.Communicator is supported (split hpcml.comm.world())")
    if _STATE is None:
        base = comm if comm is not None else world()
        local = base.split_shared()
        cross = base.split(local.rank, base.rank, name="cross")
        _STATE = _State(base, local, cross)
        install_excepthook()
        for ps in process_sets or []:
            add_process_set(ps)


def shutdown() -> None:
    """Forget the Horovod state (MPI stays initialized, so ``init()`` may be called again)."""
    global _STATE
    from hpcml.horovod.join import forget_deferred  # join builds on this module

    _STATE = None
    _HANDLES.clear()
    _NAMES.clear()
    forget_deferred()


def is_initialized() -> bool:
    return _STATE is not None


def _state() -> _State:
    if _STATE is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _STATE


def communicator(process_set: ProcessSet | None = None) -> Communicator:
    """The communicator an operation over ``process_set`` runs on; refuses a set not added or
    not including this rank."""
    st = _state()
    if process_set is None or process_set.ranks is None:
        return st.comm
    if process_set.comm is None:
        why = "does not include this rank" if process_set.added else "was not added"
        raise ValueError(f"hpcml.horovod: {process_set} {why} (call hvd.add_process_set on "
                         "every rank; only its ranks may use it)")
    return process_set.comm


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
    from hpcml.horovod.join import negotiate  # join builds on this module

    st = _state()
    negotiate("is_homogeneous", None)
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
    """An operation in flight: its ``requests`` (none when already complete) and ``finish``,
    which turns the completed buffers into the operation's result; ``name`` (Horovod's, taken
    until the handle is synchronized); ``post`` while the operation waits for the other ranks
    to post it (see :func:`hpcml.horovod.join.submit`): calling it waits until they have and
    starts it; ``members``: the handles of a grouped operation."""

    requests: list[Request]
    finish: Callable[[], Any]
    name: str | None = None
    post: Callable[[], None] | None = None
    members: list[_Pending] = dataclasses.field(default_factory=list)


_HANDLES: dict[int, _Pending] = {}
_NAMES: dict[str, _Pending] = {}  # the names taken, with their operations
_NEXT = itertools.count()


def take_name(name: str | None) -> None:
    """Claim ``name`` for an operation about to be submitted on this rank; raises Horovod's
    ``ValueError`` when an operation of that name is still pending (submitted, not yet
    synchronized, and not posted on every rank before a later blocking operation) on this rank.
    Not collective: checked before any communication."""
    if name is not None and name in _NAMES:
        raise ValueError(f"hpcml.horovod: an operation named {name!r} is still pending on this "
                         "rank (Horovod's 'Requested to allreduce, allgather, or broadcast a "
                         "tensor with the same name as another tensor that is currently being "
                         "processed'): synchronize it first or use a different name")


def new_handle(requests: list[Request], finish: Callable[[], Any], name: str | None = None,
               members: list[_Pending] | None = None) -> int:
    """A handle for an operation started with ``requests``; claims ``name`` (see
    :func:`take_name`)."""
    take_name(name)
    handle = next(_NEXT)
    _HANDLES[handle] = p = _Pending(requests, finish, name, None, members or [])
    if name is not None:
        _NAMES[name] = p
    return handle


def release_posted_names() -> None:
    """Free the names of the operations every rank has posted (called after a blocking
    operation: Horovod has processed such an operation by then, even if its handle is never
    synchronized)."""
    for name in [n for n, p in _NAMES.items() if p.post is None]:
        del _NAMES[name]


def pending(handle: int) -> _Pending:
    """The operation of ``handle``; ``ValueError`` when unknown or spent."""
    try:
        return _HANDLES[handle]
    except KeyError:
        raise ValueError(f"hpcml.horovod: handle {handle!r} is unknown or already "
                         "synchronized") from None


def group_handles(handles: list[int]) -> int:
    """One handle for ``handles`` (which are spent): complete when all are; its result is the
    list of theirs."""
    members = [_HANDLES.pop(h) for h in handles]
    return new_handle([], lambda: [m.finish() for m in members], members=members)


def _done(p: _Pending) -> bool:
    return p.post is None and all(r.test() is not None for r in p.requests) and \
        all(_done(m) for m in p.members)


def _wait(p: _Pending) -> None:
    if p.post is not None:
        p.post()
    for request in p.requests:
        request.wait()
    for m in p.members:
        _wait(m)


def poll(handle: int) -> bool:
    """True when the operation of ``handle`` has completed (then ``synchronize`` won't block);
    False while it is in flight or waits for the other ranks to post it. Not collective."""
    return _done(pending(handle))


def synchronize(handle: int) -> Any:
    """Wait for the operation of ``handle`` and return its result; the handle (and its name)
    is spent. Collective only for an operation still waiting for the other ranks."""
    p = pending(handle)
    _wait(p)
    del _HANDLES[handle]
    if p.name is not None and _NAMES.get(p.name) is p:
        del _NAMES[p.name]
    return p.finish()
