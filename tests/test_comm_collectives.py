"""hpcml.comm collectives against numpy references computed independently on every rank."""

import numpy as np
import torch

from hpcml.testing import mpi_test


def rank_data(rank: int, n: int, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(100 + rank).standard_normal(n).astype(dtype)


@mpi_test(in_process=True)
def test_allreduce_numpy_and_torch(comm):
    p, r = comm.size, comm.rank
    expected = sum(rank_data(q, 1000) for q in range(p))
    a = rank_data(r, 1000)
    comm.Allreduce(a)
    np.testing.assert_allclose(a, expected, rtol=1e-12)
    t = torch.from_numpy(rank_data(r, 1000)).requires_grad_(False)
    out = torch.empty_like(t)
    comm.Allreduce(t, out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    m = np.array([float(r)])
    comm.Allreduce(m, op="max")
    assert m[0] == p - 1


@mpi_test(in_process=True)
def test_allgather_and_allgatherv(comm):
    p, r = comm.size, comm.rank
    send = np.full(3, r, dtype=np.int64)
    recv = np.empty(3 * p, dtype=np.int64)
    comm.Allgather(send, recv)
    assert recv.tolist() == [q for q in range(p) for _ in range(3)]
    counts = [q + 1 for q in range(p)]
    recv_v = torch.empty(sum(counts), dtype=torch.float32)
    comm.Allgatherv(torch.full((r + 1,), float(r)), recv_v, counts)
    assert recv_v.tolist() == [float(q) for q in range(p) for _ in range(q + 1)]
    half = torch.zeros(sum(counts), dtype=torch.bfloat16)  # staged: written back on wait()
    req = comm.Iallgatherv(torch.full((r + 1,), r + 0.5, dtype=torch.bfloat16), half, counts)
    req.wait()
    assert half.tolist() == [q + 0.5 for q in range(p) for _ in range(q + 1)]
    assert comm.ledger.totals()["Iallgatherv"]["bytes_received"] == 2 * sum(counts)


@mpi_test(in_process=True)
def test_reduce_scatter_bcast_alltoall(comm):
    p, r = comm.size, comm.rank
    full = sum(rank_data(q, 4 * p) for q in range(p))
    out = np.empty(4)
    comm.Reduce_scatter(rank_data(r, 4 * p), out)
    np.testing.assert_allclose(out, full[4 * r: 4 * r + 4], rtol=1e-12)
    counts = [2 + q for q in range(p)]
    outv = np.empty(counts[r])
    comm.Reduce_scatter(rank_data(r, sum(counts)), outv, counts=counts)
    start = sum(counts[:r])
    np.testing.assert_allclose(outv, sum(rank_data(q, sum(counts)) for q in range(p))
                               [start:start + counts[r]], rtol=1e-12)
    b = np.arange(5.0) if r == p - 1 else np.zeros(5)
    comm.Bcast(b, root=p - 1)
    assert b.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    send = np.array([100 * r + j for j in range(p)], dtype=np.int32)
    recv = np.empty(p, dtype=np.int32)
    comm.Alltoall(send, recv)
    assert recv.tolist() == [100 * q + r for q in range(p)]
    sc = [j + 1 for j in range(p)]
    sendv = np.concatenate([np.full(j + 1, r, dtype=np.int32) for j in range(p)])
    rc = [r + 1] * p
    recvv = np.empty(sum(rc), dtype=np.int32)
    comm.Alltoallv(sendv, recvv, sc, rc)
    assert recvv.tolist() == [q for q in range(p) for _ in range(r + 1)]


@mpi_test(in_process=True)
def test_bfloat16_reduces_through_float32_and_moves_raw(comm):
    p = comm.size
    t = torch.full((8,), 1.5, dtype=torch.bfloat16)
    comm.Allreduce(t)
    assert t.dtype == torch.bfloat16 and t.tolist() == [1.5 * p] * 8
    h = np.full(4, 0.25, dtype=np.float16)
    comm.Allreduce(h)
    assert h.tolist() == [0.25 * p] * 4
    b = torch.arange(6, dtype=torch.bfloat16) if comm.rank == 0 else torch.zeros(6,
                                                                                 dtype=torch.bfloat16)
    comm.Bcast(b)
    assert b.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@mpi_test(in_process=True)
def test_nonblocking_allreduce_and_point_to_point(comm):
    p, r = comm.size, comm.rank
    bufs = [np.full(10, float(r + i)) for i in range(3)]
    reqs = [comm.Iallreduce(b) for b in bufs]
    for i, req in enumerate(reqs):
        req.wait()
        assert bufs[i][0] == sum(q + i for q in range(p))
    nxt, prv = (r + 1) % p, (r - 1) % p
    recv = torch.empty(4, dtype=torch.int64)
    rreq = comm.Irecv(recv, source=prv, tag=7)
    sreq = comm.Isend(torch.full((4,), r, dtype=torch.int64), dest=nxt, tag=7)
    status = rreq.wait()
    sreq.wait()
    assert recv.tolist() == [prv] * 4
    assert (status.source, status.tag, status.count, status.nbytes) == (prv, 7, 4, 32)
    comm.ledger.reset()
    half = torch.full((8,), 1.5, dtype=torch.bfloat16)  # staged through float32, written back
    req = comm.Iallreduce(half)
    words = torch.zeros(16, dtype=torch.bfloat16)  # 16-bit words move raw; a shorter message
    rreq = comm.Irecv(words, source=prv, tag=8)
    comm.Isend(torch.arange(5, dtype=torch.bfloat16) + r, dest=nxt, tag=8).wait()
    req.wait()
    assert rreq.wait().count == 5
    assert half.tolist() == [1.5 * p] * 8 and words[:5].tolist() == [prv + i for i in range(5)]
    t = comm.ledger.totals()
    assert [(t[op]["calls"], t[op]["bytes_sent"], t[op]["bytes_received"]) for op in (
        "Iallreduce", "Isend", "Irecv")] == [(1, 32, 32), (1, 10, 0), (1, 0, 10)]


@mpi_test(in_process=True)
def test_object_collectives(comm):
    assert comm.allgather({"r": comm.rank}) == [{"r": q} for q in range(comm.size)]
    assert comm.bcast("hello" if comm.rank == 0 else None) == "hello"
    assert comm.allreduce(comm.rank + 1) == comm.size * (comm.size + 1) // 2


@mpi_test(in_process=True)
def test_waitany_iprobe_and_cancel(comm):
    from hpcml.comm import Request

    p, r = comm.size, comm.rank
    if r == 0:
        bufs = [np.zeros(2) for _ in range(1, p)]
        reqs = [comm.Irecv(b, source=q, tag=5) for q, b in zip(range(1, p), bufs, strict=True)]
        seen = set()
        while len(seen) < p - 1:
            i, status = Request.waitany(reqs)
            assert status.source == i + 1 and bufs[i].tolist() == [i + 1.0, i + 1.0]
            seen.add(i)
        late = comm.Irecv(np.zeros(1), source=0, tag=99)
        assert late.test() is None
        late.cancel()
        assert late.done
    else:
        comm.Send(np.full(2, float(r)), dest=0, tag=5)
    comm.barrier()
    if p > 1 and r == 1:
        comm.Send(np.zeros(3), dest=0, tag=11)
    if p > 1 and r == 0:
        status = None
        while status is None:
            status = comm.Iprobe(source=1, tag=11, itemsize=8)
        assert (status.count, status.nbytes) == (3, 24)
        comm.Recv(np.zeros(3), source=1, tag=11)
