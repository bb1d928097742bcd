"""Sub-communicators: split, Cartesian grid, distributed graph, neighbour collectives; chunking
(the parallelism Mesh built on them: tests/test_parallel_mesh.py)."""

import numpy as np
import pytest

from hpcml.comm import chunk_bounds, chunk_counts
from hpcml.testing import mpi_test


@pytest.mark.parametrize("n", [0, 1, 7, 100])
@pytest.mark.parametrize("size", [1, 3, 4])
def test_chunks_cover_exactly_once_and_balance(n, size):
    bounds = [chunk_bounds(n, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    counts = chunk_counts(n, size)
    assert sum(counts) == n and max(counts) - min(counts) <= 1


def test_chunk_rejects_bad_rank():
    with pytest.raises(ValueError, match="outside"):
        chunk_bounds(10, 2, 2)


@mpi_test(in_process=True)
def test_ring_graph_neighbour_allgather(comm):
    p, r = comm.size, comm.rank
    ring = sorted({(r - 1) % p, (r + 1) % p} - ({r} if p > 2 else set()))
    graph = comm.dist_graph(ring, ring, name="ring")
    sources, destinations = graph.neighbors()
    assert sources == ring and destinations == ring
    recv = np.empty(len(ring), dtype=np.int64)
    graph.Neighbor_allgather(np.array([10 * r], dtype=np.int64), recv)
    assert recv.tolist() == [10 * q for q in ring]
    send = np.array([100 * r + q for q in ring], dtype=np.int64)
    got = np.empty(len(ring), dtype=np.int64)
    graph.Neighbor_alltoall(send, got)
    assert got.tolist() == [100 * q + r for q in ring]


@mpi_test(ranks=[2, 4], in_process=True)
def test_split_and_periodic_cart_shift(comm):
    half = comm.split(color=comm.rank % 2)
    assert half.size == comm.size // 2
    cart = comm.cart([comm.size], periods=[True])
    sources, _ = cart.neighbors()
    assert sources == [(comm.rank - 1) % comm.size, (comm.rank + 1) % comm.size]
