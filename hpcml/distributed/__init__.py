"""``import hpcml.distributed``: torch.distributed on hpcml.comm, as a backend named ``"hpcml"``.

Importing registers the backend (CPU tensors) and lets ``env://`` take rank, size and store
from MPI when ``MASTER_ADDR`` is unset (:mod:`.rendezvous`), so under ``mpiexec``::

    import torch.distributed as dist
    import hpcml.distributed  # noqa: F401
    dist.init_process_group("hpcml")

needs no environment variables. Each process group is a :class:`ProcessGroupHpcml` on its own
hpcml communicator (the world group on a duplicate of hpcml's world, ``new_group`` ranks on
``MPI_Comm_create_group`` of it), so the ledger counts every byte torch moves, the watchdog
ends a job whose collective hangs, and an uncaught exception on one rank ends the whole job.
:mod:`.group` holds the collectives, :mod:`.work` the ``Work`` objects, :mod:`.ops` what MPI can
reduce exactly (the rest is refused with one line).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hpcml.comm import Communicator, world
from hpcml.comm.abort import report_and_abort
from hpcml.distributed import rendezvous
from hpcml.distributed.group import BACKEND, ProcessGroupHpcml

__all__ = ["BACKEND", "ProcessGroupHpcml", "communicator", "monitored_barrier", "world_group"]

_TORCH_WORLD: Communicator | None = None
_EVERY_RANK: ProcessGroupHpcml | None = None


def _torch_world() -> Communicator:
    """The duplicate of hpcml's world that torch's groups live on (collective, once). From then
    on an uncaught exception on one rank ends the whole job (:func:`_abort_hook`)."""
    global _TORCH_WORLD
    if _TORCH_WORLD is None:
        _TORCH_WORLD = world().dup("torch")
        sys.excepthook = _abort_hook
    return _TORCH_WORLD


def _abort_hook(_type: type, exc: BaseException, _tb: Any) -> None:
    """hpcml's abort-on-error for a plain script: print the traceback and ``MPI_Abort`` the job,
    so the other ranks do not wait forever in a collective. torch's ``init_process_group`` wraps
    this hook to prefix the lines with the rank through a captured ``sys.stderr``, which would
    never be printed (the job ends first): write to the real stderr instead."""
    sys.stderr = sys.__stderr__
    report_and_abort(exc)


def _create(opts: Any, _pg_options: Any) -> ProcessGroupHpcml:
    """torch's backend factory (extended API), called by every member of a new group: the
    world group runs on the torch world communicator itself, any other group (its members as
    torch world ranks, which are MPI world ranks) on a new communicator of its members."""
    base = _torch_world()
    ranks = list(opts.global_ranks_in_group)
    comm = base.create_group(ranks, f"torch.{opts.group_id}") if ranks else base
    if (comm.rank, comm.size) != (opts.group_rank, opts.group_size):
        raise ValueError(f"hpcml backend: torch says rank {opts.group_rank} of "
                         f"{opts.group_size} but MPI says rank {comm.rank} of {comm.size}; "
                         "launch with mpiexec/srun and let hpcml set RANK and WORLD_SIZE")
    return ProcessGroupHpcml(comm, opts.timeout)


def world_group() -> ProcessGroupHpcml:
    """An ``"hpcml"`` process group of every rank: the default group, initialised with
    ``init_process_group("hpcml")`` when torch.distributed is not initialised yet; when it runs
    on another backend (gloo), one ``new_group`` of every rank on ``"hpcml"``, made once.
    Collective (every rank calls it, the first time at the same point)."""
    global _EVERY_RANK
    if not dist.is_initialized():
        dist.init_process_group(BACKEND)
    default = dist.distributed_c10d._get_default_group()
    if isinstance(default, ProcessGroupHpcml):
        return default
    if _EVERY_RANK is None:
        _EVERY_RANK = dist.new_group(backend=BACKEND)
    return _EVERY_RANK


def communicator(group: dist.ProcessGroup | None = None) -> Communicator:
    """The hpcml communicator under ``group`` (default: the world group), e.g. to read its
    ledger. Raises ``ValueError`` when ``group`` does not run on the ``"hpcml"`` backend."""
    pg = dist.distributed_c10d._get_default_group() if group is None else group
    if not isinstance(pg, ProcessGroupHpcml):
        raise ValueError(f"{pg!r} is not an hpcml process group; create it with "
                         "init_process_group('hpcml') or new_group(backend='hpcml')")
    return pg.comm


def monitored_barrier(group: dist.ProcessGroup | None = None,
                      timeout: timedelta | float | None = None,
                      wait_all_ranks: bool = False) -> None:
    """``dist.monitored_barrier`` for ``"hpcml"`` groups (torch's refuses every backend but
    gloo before reaching the group): see :meth:`ProcessGroupHpcml.monitored_barrier`."""
    pg = dist.distributed_c10d._get_default_group() if group is None else group
    if not isinstance(pg, ProcessGroupHpcml):
        raise ValueError(f"{pg!r} is not an hpcml process group; use dist.monitored_barrier")
    pg.monitored_barrier(timeout, wait_all_ranks)


if BACKEND not in dist.Backend.backend_list:
    dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
rendezvous.install()
