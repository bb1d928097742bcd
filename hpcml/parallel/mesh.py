"""``Mesh``: the one owner of the process-group layout of every parallelism dimension.

``Mesh(comm, data=D, pipeline=S, tensor=T)`` arranges the ranks of ``comm`` on a Cartesian grid
of shape (pipeline, data, tensor) -- tensor varies fastest, so the ranks of a tensor-parallel
group are neighbours (on one node when ranks are packed by node), and pipeline varies slowest,
as in Megatron-LM -- and builds, once, for each dimension the sub-communicator of the ranks that
differ only along it: ``mesh.data`` (= ``mesh["data"]``), ``mesh.pipeline``, ``mesh.tensor``.
Sub-communicators of size 1 exist too, so code never needs to special-case an absent dimension.

Sizes default to 1, except ``data``: when omitted it is the remaining factor,
``comm.size // (pipeline * tensor)``. Any factorization of the rank count is accepted; one whose
product is not the rank count raises :class:`~hpcml.errors.UsageError` (exit 2 from the CLI).
"""

from __future__ import annotations

from hpcml.comm import Communicator, world
from hpcml.errors import UsageError

DIMS = ("pipeline", "data", "tensor")


class Mesh:
    """Collective constructor over ``comm`` (default: the world): every rank builds the same
    mesh. ``mesh.coords`` is this rank's position, e.g. ``{"pipeline": 1, "data": 0,
    "tensor": 0}``; in ``mesh.pipeline`` the rank *is* the stage index."""

    def __init__(self, comm: Communicator | None = None, *, data: int | None = None,
                 pipeline: int = 1, tensor: int = 1) -> None:
        comm = comm if comm is not None else world()
        sizes = {"data": data, "pipeline": pipeline, "tensor": tensor}
        bad = {k: v for k, v in sizes.items() if v is not None and v < 1}
        if bad:
            raise UsageError(f"mesh: sizes must be >= 1, got {bad}")
        if data is None:
            if comm.size % (pipeline * tensor):
                raise UsageError(f"mesh: pipeline={pipeline} x tensor={tensor} does not divide "
                                 f"the {comm.size} ranks; choose sizes whose product divides it")
            sizes["data"] = comm.size // (pipeline * tensor)
        total = sizes["data"] * pipeline * tensor
        if total != comm.size:
            raise UsageError(f"mesh: data={sizes['data']} x pipeline={pipeline} x "
                             f"tensor={tensor} = {total} ranks but the job has {comm.size}; "
                             "make the product equal the number of ranks")
        self.world = comm
        self.sizes: dict[str, int] = {d: int(sizes[d]) for d in DIMS}
        self.grid = comm.cart([self.sizes[d] for d in DIMS], name="mesh")
        self.groups = {d: self.grid.cart_sub([n == d for n in DIMS], name=d) for d in DIMS}

    def __getitem__(self, name: str) -> Communicator:
        try:
            return self.groups[name]
        except KeyError:
            raise KeyError(f"mesh has no dimension {name!r}; it has {list(DIMS)}") from None

    def __repr__(self) -> str:
        return "Mesh(" + ", ".join(f"{d}={self.sizes[d]}" for d in DIMS) + ")"

    @property
    def data(self) -> Communicator:
        return self.groups["data"]

    @property
    def pipeline(self) -> Communicator:
        return self.groups["pipeline"]

    @property
    def tensor(self) -> Communicator:
        return self.groups["tensor"]

    @property
    def coords(self) -> dict[str, int]:
        """This rank's position along each dimension."""
        return dict(zip(DIMS, self.grid.coords, strict=True))
