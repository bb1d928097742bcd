"""``env://`` without ``MASTER_ADDR``: rank, size and a shared store from MPI.

torch's default ``init_method`` is ``env://``, which needs ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK`` and ``WORLD_SIZE``. After ``import hpcml.distributed`` an ``env://`` rendezvous that
finds no ``MASTER_ADDR`` takes rank and size from MPI (:func:`hpcml.comm.world`) instead, for
any backend; with ``MASTER_ADDR`` set, torch's own handler runs unchanged. The store is a
``TCPStore`` that rank 0 opens on a port the OS picks and announces over MPI (a ``HashStore``
on a single process, which needs no network at all); the ``"hpcml"`` backend sends no data
through it (torch's helpers use it for a few keys at group creation).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch.distributed as dist

from hpcml.comm import world

torch_rendezvous = import_module("torch.distributed.rendezvous")
_TORCH_ENV = torch_rendezvous._rendezvous_handlers["env"]  # torch's own env:// handler


def mpi_store(timeout: timedelta) -> tuple[dist.Store, int, int]:
    """``(store, rank, size)`` of this MPI job. Collective over every rank of the job."""
    comm = world()
    if comm.size == 1:
        return dist.HashStore(), 0, 1
    if comm.rank == 0:
        host = socket.gethostname()
        store = dist.TCPStore(host, 0, comm.size, True, timeout, wait_for_workers=False)
        comm.bcast((host, store.port))
    else:
        host, port = comm.bcast(None)
        store = dist.TCPStore(host, port, comm.size, False, timeout)
    return store, comm.rank, comm.size


def _env_or_mpi(url: str, timeout: timedelta = dist.default_pg_timeout,
                **kwargs: Any) -> Iterator[tuple[dist.Store, int, int]]:
    if os.environ.get("MASTER_ADDR"):
        yield from _TORCH_ENV(url, timeout=timeout, **kwargs)
        return
    store, rank, size = mpi_store(timeout)
    query = {k: int(v[0]) for k, v in parse_qs(urlparse(url).query).items()
             if k in ("rank", "world_size")}
    for key, value in (("rank", rank), ("world_size", size)):
        if query.get(key, value) != value:
            raise ValueError(f"init_process_group: {key}={query[key]} but MPI says {value}; "
                             f"leave {key} out under mpiexec (hpcml takes it from MPI)")
    yield store, rank, size
    raise RuntimeError("env:// rendezvous under MPI cannot restart; relaunch the job")


def install() -> None:
    """Route ``env://`` through :func:`_env_or_mpi` (idempotent)."""
    torch_rendezvous._rendezvous_handlers["env"] = _env_or_mpi
