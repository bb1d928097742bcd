"""Abort-on-error: an exception on one rank ends the whole job instead of hanging it.

When one rank raises while the others wait in a collective, a plain MPI program hangs until the
wall-clock limit. :func:`abort_on_error` prints the failing rank's traceback, prefixed with its
rank, and calls ``MPI_Abort`` on COMM_WORLD so mpiexec/srun tear every rank down within seconds.
A :class:`~hpcml.errors.UsageError` prints one line and ends the job with exit code 2. When every
rank raises it (a check all ranks make, as most are), the ranks agree by point-to-point messages
on a reserved tag, rank 0 prints the line once and all ranks exit 2 without ``MPI_Abort``; when
only some ranks raise it, the agreement times out after :data:`AGREE_SECONDS` and those ranks
print the line (with their rank) and abort.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Iterator

from mpi4py import MPI

from hpcml.errors import UsageError


def report_and_abort(exc: BaseException) -> None:
    """Print ``exc`` for this rank and end the job (or just exit when running alone)."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if isinstance(exc, UsageError):
        code = 2
        if size > 1 and _all_ranks_agree(comm, str(exc)):
            sys.stdout.flush()
            if rank == 0:
                sys.stderr.write(f"hpcml: error: {exc}\n")
                sys.stderr.flush()
            raise SystemExit(code)
        text = f"hpcml: error: {exc}\n" if size == 1 else f"hpcml: error (rank {rank}): {exc}\n"
    else:
        code = 1
        body = "".join(traceback.format_exception(exc))
        text = f"hpcml: rank {rank} of {size} failed; aborting the job.\n{body}"
    sys.stdout.flush()
    sys.stderr.write(text)
    sys.stderr.flush()
    if size > 1:
        # MPI_Abort has the launcher kill every rank at once, its own stdio forwarding included:
        # give it a moment to forward the lines above first (once seen lost on a loaded machine)
        time.sleep(FORWARD_SECONDS)
        comm.Abort(code)
    raise SystemExit(code)


FORWARD_SECONDS = 0.25


AGREE_TAG = 32_767  # on MPI_COMM_WORLD, which hpcml traffic never uses (world() is a duplicate)
AGREE_SECONDS = 5.0


def _wait(request: MPI.Request, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if request.test()[0]:
            return True
        time.sleep(0.01)
    return False


def _all_ranks_agree(comm: MPI.Comm, message: str) -> bool:
    """Whether every rank of ``comm`` is here with a usage error, decided within
    :data:`AGREE_SECONDS`: each rank > 0 tells rank 0; rank 0, having heard all of them, answers
    each one. Point-to-point on :data:`AGREE_TAG`, so ranks still inside a collective are not
    disturbed (they are aborted when the agreement fails)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    deadline = time.monotonic() + AGREE_SECONDS
    if rank != 0:
        comm.isend(message, dest=0, tag=AGREE_TAG)
        answer = comm.irecv(source=0, tag=AGREE_TAG)
        return _wait(answer, deadline + AGREE_SECONDS / 2)
    heard = [comm.irecv(source=r, tag=AGREE_TAG) for r in range(1, size)]
    if not all(_wait(r, deadline) for r in heard):
        return False
    for r in range(1, size):
        comm.isend(True, dest=r, tag=AGREE_TAG).wait()
    return True


@contextlib.contextmanager
def abort_on_error() -> Iterator[None]:
    """Run the body; any exception (KeyboardInterrupt included) aborts the whole job.
    ``SystemExit`` passes through unchanged."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        report_and_abort(exc)


def install_excepthook() -> None:
    """Make an uncaught exception in a plain script abort the job (like ``python -m mpi4py``)."""
    sys.excepthook = lambda _type, exc, _tb: report_and_abort(exc)
