"""hpcml.comm: the only package that touches MPI.

Algorithms get a :class:`Communicator` from :func:`world` (or a sub-communicator from it, or
from :class:`hpcml.parallel.Mesh`) and never import mpi4py themselves.

How MPI waits is decided before MPI starts (:mod:`hpcml.comm.progress`), so this package runs
that decision first, before any of its modules imports mpi4py.
"""

from hpcml.comm import progress  # noqa: F401  (first: importing it decides how MPI waits)

# isort: split
from hpcml.comm.abort import abort_on_error, install_excepthook
from hpcml.comm.chunk import chunk_bounds, chunk_counts
from hpcml.comm.communicator import ANY_SOURCE, ANY_TAG, Communicator, world
from hpcml.comm.ledger import Ledger
from hpcml.comm.persistent import Persistent
from hpcml.comm.request import Request
from hpcml.comm.status import Status
from hpcml.comm.stragglers import DelayModel, StragglerConfig, make_delay_model

__all__ = ["ANY_SOURCE", "ANY_TAG", "Communicator", "DelayModel", "Ledger", "Persistent", "Request",
           "Status", "StragglerConfig", "abort_on_error", "chunk_bounds", "chunk_counts",
           "install_excepthook", "make_delay_model", "world"]
