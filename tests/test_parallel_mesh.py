"""hpcml.parallel.Mesh: sub-communicators of every factorization, and bad sizes."""

import numpy as np
import pytest

from hpcml.comm import world
from hpcml.errors import UsageError
from hpcml.parallel import Mesh
from hpcml.testing import mpi_test


def factorizations(p: int) -> list[tuple[int, int, int]]:
    return [(d, s, p // (d * s)) for d in range(1, p + 1) for s in range(1, p + 1)
            if p % (d * s) == 0]


@mpi_test(in_process=True)
def test_every_factorization_groups_the_right_ranks(comm):
    p = comm.size
    for data, pipeline, tensor in factorizations(p):
        mesh = Mesh(comm, data=data, pipeline=pipeline, tensor=tensor)
        c = mesh.coords
        assert mesh.sizes == {"pipeline": pipeline, "data": data, "tensor": tensor}
        # tensor varies fastest, pipeline slowest
        assert comm.rank == (c["pipeline"] * data + c["data"]) * tensor + c["tensor"]
        for dim in ("data", "pipeline", "tensor"):
            group = mesh[dim]
            assert group.size == mesh.sizes[dim] and group.rank == c[dim]
            x = np.array([float(comm.rank)])
            group.Allreduce(x)
            members = [r for r in range(p)
                       if all(r_c == c[d] for d, r_c in _coords(r, mesh).items() if d != dim)]
            assert x[0] == sum(members)
    assert Mesh(comm, pipeline=1).sizes["data"] == p  # data takes the remaining factor
    assert "data.Allreduce" in comm.ledger.totals()
    with pytest.raises(UsageError, match=rf"data={p + 1} x pipeline=1 x tensor=1 = {p + 1} "
                                         rf"ranks but the job has {p}"):
        Mesh(comm, data=p + 1)


def _coords(rank: int, mesh: Mesh) -> dict[str, int]:
    s = mesh.sizes
    return {"pipeline": rank // (s["data"] * s["tensor"]),
            "data": rank // s["tensor"] % s["data"], "tensor": rank % s["tensor"]}


def test_sizes_that_cannot_fit_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="pipeline=3 x tensor=1 does not divide the 1 ranks"):
        Mesh(world(), pipeline=3)
    with pytest.raises(UsageError, match="sizes must be >= 1"):
        Mesh(world(), tensor=0)
