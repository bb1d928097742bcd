"""Process-level settings every hpcml run makes deliberately: torch and BLAS threads and the
environment report (MPI library, ranks per node, threads, versions, MPI progress and heap
decisions)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import threadpoolctl

from hpcml import heap
from hpcml.comm import Communicator, progress, transport
from hpcml.comm.info import mpi_info

# the BLAS thread limits set by configure_threads, held for the life of the process
_POOL_LIMITS: list[threadpoolctl.threadpool_limits] = []


def cores_available() -> int:
    """Cores this process may run on (respects cgroup/affinity masks)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure_threads(comm: Communicator, requested: int) -> int:
    """Set torch's intra-op threads and the BLAS/OpenMP thread pools numpy and scipy already
    loaded (through threadpoolctl: OpenBLAS reads OMP_NUM_THREADS only when it loads, and its
    idle threads spin, so ranks sharing a node would oversubscribe it): ``requested`` if > 0,
    else the node's cores divided by the ranks on this node (at least 1). Collective over
    ``comm``. Returns the number set."""
    local = comm.split_shared()
    threads = requested if requested > 0 else max(1, cores_available() // local.size)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _POOL_LIMITS.append(threadpoolctl.threadpool_limits(limits=threads))
    return threads


def environment(comm: Communicator) -> dict[str, Any]:
    """What a reader of a result needs to know about where it ran (collective: gathers hosts
    and observes the transport between hosts, see :mod:`hpcml.comm.transport`; rank 0 prints
    one warning line when ranks on different hostnames share one machine's memory)."""
    hosts = comm.allgather(platform.node())
    between = transport.inter_node(comm)
    warn = transport.warning(between)
    if warn and comm.rank == 0:
        print(warn, file=sys.stderr, flush=True)
    try:
        import torch

        torch_info = {"version": torch.__version__, "threads": torch.get_num_threads(),
                      "cuda": torch.cuda.is_available()}
    except ImportError:
        torch_info = {}
    import numpy

    return {
        "ranks": comm.size,
        "hosts": sorted(set(hosts)),
        "ranks_per_host": {h: hosts.count(h) for h in sorted(set(hosts))},
        **mpi_info(),
        "transport": between,
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "torch": torch_info,
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cores": cores_available(),
        "mpi_progress": progress.record(),
        "heap": heap.record(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
