"""One object that owns the process-group layout of every parallelism dimension.

``Mesh(world, pipeline=2, data=2)`` arranges the ranks on a Cartesian grid in the order the
dimensions are given (the last varies fastest, so neighbouring ranks share the last dimension)
and builds, for each dimension, the sub-communicator of the ranks that differ only along it:
``mesh["data"]`` is this rank's data-parallel group, ``mesh["pipeline"]`` its pipeline group.
"""

from __future__ import annotations

from hpcml.comm.communicator import Communicator


class Mesh:
    """Collective constructor: every rank of ``comm`` must build the same mesh."""

    def __init__(self, comm: Communicator, **dims: int) -> None:
        if not dims:
            raise ValueError("Mesh needs at least one dimension, e.g. Mesh(comm, data=comm.size)")
        bad = {k: v for k, v in dims.items() if v < 1}
        if bad:
            raise ValueError(f"Mesh dimensions must be >= 1, got {bad}")
        total = 1
        for v in dims.values():
            total *= v
        if total != comm.size:
            raise ValueError(f"Mesh {dims} holds {total} ranks but the job has {comm.size}; "
                             "make the product of the dimensions equal the number of ranks")
        self.dims = dict(dims)
        self.grid = comm.cart(list(dims.values()), name="mesh")
        names = list(dims)
        self.groups = {
            name: self.grid.cart_sub([n == name for n in names], name=name) for name in names
        }

    def __getitem__(self, name: str) -> Communicator:
        try:
            return self.groups[name]
        except KeyError:
            raise KeyError(f"mesh has no dimension {name!r}; it has {list(self.dims)}") from None

    @property
    def coords(self) -> dict[str, int]:
        """This rank's position along each dimension."""
        return dict(zip(self.dims, self.grid.coords, strict=True))
