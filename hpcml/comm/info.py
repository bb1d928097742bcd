"""What MPI this process runs on (no communication)."""

from __future__ import annotations

import mpi4py
from mpi4py import MPI


def mpi_info() -> dict[str, str]:
    """Library version line, MPI standard version and mpi4py version."""
    return {
        "mpi_library": MPI.Get_library_version().splitlines()[0].strip(),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "mpi4py": mpi4py.__version__,
    }


def thread_multiple() -> bool:
    """Whether MPI was initialized with ``MPI_THREAD_MULTIPLE`` (any thread may call MPI)."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE
