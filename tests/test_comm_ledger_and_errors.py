"""Ledger byte counts (exact), buffer errors, abort-on-error."""

import sys
import time

import numpy as np
import pytest
import torch

from hpcml.comm.buffers import stage
from hpcml.testing import launch, mpi_test


@mpi_test(in_process=True)
def test_ledger_counts_exact_bytes(comm):
    p, r = comm.size, comm.rank
    comm.ledger.reset()
    comm.Allreduce(np.zeros(100, dtype=np.float32))
    comm.Allgather(np.zeros(10, dtype=np.float64), np.zeros(10 * p, dtype=np.float64))
    comm.Bcast(np.zeros(7, dtype=np.int32), root=0)
    comm.Allreduce(torch.zeros(16, dtype=torch.bfloat16))
    counts = list(range(1, p + 1))
    comm.Allgatherv(np.zeros(r + 1, dtype=np.int64), np.zeros(sum(counts), dtype=np.int64), counts)
    t = comm.ledger.totals()
    assert t["Allreduce"] == {"calls": 2, "bytes_sent": 400 + 64, "bytes_received": 400 + 64,
                              "seconds": t["Allreduce"]["seconds"], "outstanding_seconds": 0.0}
    assert (t["Allgather"]["bytes_sent"], t["Allgather"]["bytes_received"]) == (80, 80 * p)
    assert (t["Bcast"]["bytes_sent"], t["Bcast"]["bytes_received"]) == ((28, 0) if r == 0
                                                                        else (0, 28))
    assert (t["Allgatherv"]["bytes_sent"], t["Allgatherv"]["bytes_received"]) == (
        8 * (r + 1), 8 * sum(counts))
    sub = comm.split(color=r % 2, name="half")
    sub.Allreduce(np.zeros(3))
    assert comm.ledger.totals()["half.Allreduce"]["bytes_sent"] == 24
    per_rank = comm.gather(comm.ledger.totals())
    if r == 0:
        assert len(per_rank) == p
        assert sum(x["Allgather"]["bytes_received"] for x in per_rank) == 80 * p * p


@mpi_test(ranks=[2, 4], in_process=True)
def test_point_to_point_bytes_count_what_arrived(comm):
    comm.ledger.reset()
    if comm.rank == 0:
        comm.Send(np.zeros(5, dtype=np.float64), dest=1, tag=3)
    elif comm.rank == 1:
        buf = np.zeros(50, dtype=np.float64)
        status = comm.Recv(buf, source=0, tag=3)
        assert status.count == 5
        assert comm.ledger.totals()["Recv"]["bytes_received"] == 40


def test_non_contiguous_buffers_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="contiguous"):
        stage(np.zeros((4, 4))[:, 1])
    with pytest.raises(ValueError, match=r"t\.contiguous\(\)"):
        stage(torch.zeros(4, 4).t())


def test_tensor_requiring_grad_is_shared_not_copied():
    t = torch.zeros(3, requires_grad=True)
    s = stage(t)
    s.array[:] = 5.0
    assert t.detach().tolist() == [5.0, 5.0, 5.0]


def rank_one_raises(comm):
    """Rank 1 raises while the other ranks block in a collective."""
    if comm.rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    comm.Allreduce(np.zeros(4))
    time.sleep(60)


def rank_one_raises_in_bound_operations(comm):
    """Rank 1 raises inside a bound receive's block with the receive pending, while the other
    ranks block in a bound Allreduce."""
    t = torch.zeros(4)
    if comm.rank == 1:
        with comm.Recv_init(t, source=0, tag=9) as receive:
            receive.start()
            raise RuntimeError("deliberate failure on rank 1")
    with comm.Allreduce_init(t) as bound:
        bound.run()
    time.sleep(60)


@pytest.mark.parametrize("body", ["rank_one_raises", "rank_one_raises_in_bound_operations"])
def test_exception_on_rank_one_aborts_four_ranks_quickly(body):
    # The other ranks would sleep 60 s after the collective; the launch bound (TimeoutError)
    # is what proves the abort did not wait for them.
    res = launch(4, [sys.executable, "-m", "hpcml.testing", __file__, body], timeout=40)
    assert res.returncode != 0
    assert "hpcml: rank 1 of 4 failed" in res.stderr
    assert "RuntimeError: deliberate failure on rank 1" in res.stderr
    assert f"in {body}" in res.stderr
