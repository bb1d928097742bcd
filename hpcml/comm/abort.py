"""Abort-on-error: an exception on one rank ends the whole job instead of hanging it.

When one rank raises while the others wait in a collective, a plain MPI program hangs until the
wall-clock limit. :func:`abort_on_error` prints the failing rank's traceback, prefixed with its
rank, and calls ``MPI_Abort`` on COMM_WORLD so mpiexec/srun tear every rank down within seconds.
A :class:`~hpcml.errors.UsageError` prints one line and aborts with exit code 2.
"""

from __future__ import annotations

import contextlib
import sys
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
        text = f"hpcml: error: {exc}\n" if size == 1 else f"hpcml: error (rank {rank}): {exc}\n"
    else:
        code = 1
        body = "".join(traceback.format_exception(exc))
        text = f"hpcml: rank {rank} of {size} failed; aborting the job.\n{body}"
    sys.stdout.flush()
    sys.stderr.write(text)
    sys.stderr.flush()
    if size > 1:
        comm.Abort(code)
    raise SystemExit(code)


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
