"""How MPI waits when ranks outnumber cores: decided once, before MPI starts.

MPICH's progress engine spins while a rank waits in ``MPI_Wait`` or a blocking collective. With
one rank per core that is the fastest way to wait; with more ranks than cores (4 ranks on a
2-core laptop, CI runner or hyper-threaded node) a waiting rank burns the core that a rank still
computing its backward pass needs, and the step takes as long as the spinning lets the slowest
rank run (issue 26: 29 s of system time against 60 s of user time at the NMT paper preset, 4
ranks on 2 cores). Open MPI answers this with ``mpi_yield_when_idle`` when it detects
oversubscription; MPICH has ``MPIR_CVAR_CH4_PROGRESS_THROTTLE``, which makes the progress loop
``usleep(1)`` after a run of polls that found nothing, so the waiting rank gives its core away.

:func:`configure` turns that on when the launcher says this node runs more ranks than this
process has cores, and never overrides a value the user set. It must run before mpi4py
initializes MPI: importing this module runs it, and the package ``hpcml.comm`` imports it
before any of its modules imports mpi4py, since
MPICH reads its variables in ``MPI_Init``. :func:`record` says what was decided (written into
every run's ``env.json``).

Ranks on this node come from the launcher's environment: Hydra's ``MPI_LOCALNRANKS``, Open
MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``, Slurm's ``SLURM_STEP_TASKS_PER_NODE`` (this node's entry
when the step is uneven is not known before MPI starts; the largest is used). Cores: Slurm's
``SLURM_CPUS_ON_NODE`` when set, else the CPUs this process may run on (affinity mask). A
launcher that binds each rank to its own core under a plain ``mpiexec`` looks oversubscribed by
this rule; the throttle then costs a microsecond only after polls that found nothing.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import MutableMapping
from typing import Any

from hpcml.errors import UsageError

THROTTLE = "MPIR_CVAR_CH4_PROGRESS_THROTTLE"
WAIT_POLL = "HPCML_WAIT_POLL"  # seconds between tests in Request.wait; 0: MPI_Wait
POLL_SECONDS = 5e-5  # hpcml's choice when ranks outnumber cores
_LOCAL_COUNTS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def local_ranks(environ: MutableMapping[str, str]) -> int | None:
    """Ranks the launcher placed on this node, or None when no known launcher said so."""
    for name in _LOCAL_COUNTS:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    # Slurm: "4(x2),3" -> 4 (the largest entry; which one is this node's needs MPI).
    counts = re.findall(r"(\d+)(?:\(x\d+\))?", environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    return max(map(int, counts)) if counts else None


def node_cores(environ: MutableMapping[str, str]) -> int:
    """Cores this node gives the job: ``SLURM_CPUS_ON_NODE``, else this process's affinity."""
    value = environ.get("SLURM_CPUS_ON_NODE", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def wait_poll(environ: MutableMapping[str, str], oversubscribed: bool) -> float:
    """Seconds :meth:`hpcml.comm.Request.wait` sleeps between tests of a pending request (0:
    it calls ``MPI_Wait``): ``HPCML_WAIT_POLL`` when set (a one-line ``ValueError`` naming it
    when it is not a number >= 0), else :data:`POLL_SECONDS` when ranks outnumber cores, else 0.
    Even throttled, ``MPI_Wait`` keeps a waiting rank on its core; a rank that sleeps gives the
    core to a rank still computing its backward pass (at the NMT paper preset, 4 ranks on 2
    cores: dense allreduce from 0.88x DDP's step time to 1.05-1.09x, docs/guide/mpi-progress.md)
    for at most this much added latency."""
    value = environ.get(WAIT_POLL, "").strip()
    if not value:
        return POLL_SECONDS if oversubscribed else 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{WAIT_POLL}={value!r}: expected seconds >= 0 between tests of a "
                         "pending request (0: MPI_Wait); unset it for hpcml's choice")
    return seconds


def check() -> None:
    """Raise ``UsageError`` (one line) when this process's ``HPCML_WAIT_POLL`` was not valid
    (its wait then falls back to ``MPI_Wait``). :func:`hpcml.comm.world` calls it."""
    if _DECISION.get("wait_poll_error"):
        raise UsageError(_DECISION["wait_poll_error"])


def configure(environ: MutableMapping[str, str] = os.environ) -> dict[str, Any]:
    """Set ``MPIR_CVAR_CH4_PROGRESS_THROTTLE=1`` in ``environ`` when ranks on this node outnumber
    its cores and the user has not set it; returns the decision: ``local_ranks``, ``cores``,
    ``oversubscribed``, ``progress_throttle`` (the value MPI starts with, None when unset),
    ``set_by`` (``"hpcml"``, ``"user"`` or None) and ``wait_poll_s`` (:func:`wait_poll`).
    Not collective. This process's own decision is taken on ``os.environ`` when this module is
    first imported, before MPI is initialized."""
    ranks, cores = local_ranks(environ), node_cores(environ)
    oversubscribed = ranks is not None and ranks > cores
    set_by = "user" if THROTTLE in environ else None
    if oversubscribed and set_by is None:
        environ[THROTTLE] = "1"
        set_by = "hpcml"
    decision = {"local_ranks": ranks, "cores": cores, "oversubscribed": oversubscribed,
                "progress_throttle": environ.get(THROTTLE), "set_by": set_by}
    try:
        decision["wait_poll_s"] = wait_poll(environ, oversubscribed)
    except ValueError as exc:  # reported by check() from world(), not at import
        decision.update(wait_poll_s=0.0, wait_poll_error=str(exc))
    return decision


def record() -> dict[str, Any]:
    """The decision taken for this process when it imported :mod:`hpcml.comm` (``env.json``)."""
    return dict(_DECISION)


_DECISION = configure(os.environ)
