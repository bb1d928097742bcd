"""Bound (persistent) operations: Allreduce_init, Send_init, Recv_init. Results are checked
against closed forms computed on every rank, the ledger against the bytes the test itself
moved, and the misuse a persistent request invites (double start, re-allocated buffers,
buffers that would need a copy per start) against the documented behaviour."""

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcml.comm import world
from hpcml.comm.ledger import ARRIVED
from hpcml.comm.persistent import Persistent, Reposted, bind, persistent_request
from hpcml.testing import mpi_test


def _not_implemented(*args):
    raise NotImplementedError("MPI_Allreduce_init (an MPI-3 library)")


@mpi_test(in_process=True)
def test_bound_operations_move_the_right_data_and_the_ledger_is_exact(comm):
    p, r = comm.size, comm.rank
    comm.ledger.reset()
    t = torch.empty(256)
    with comm.Allreduce_init(t) as bound:
        for i in range(40):  # new data written in place before every start
            t.fill_(float(r + i))
            bound.run()
            assert t.tolist() == [p * i + p * (p - 1) / 2] * 256
    a, out = np.empty(8, dtype=np.int64), np.zeros(8, dtype=np.int64)
    with comm.Allreduce_init(a, out, op="max") as bound:
        for i in range(5):
            a[:] = np.arange(8) * (r + 1) + i
            bound.start()  # the non-blocking form, completed by polling
            while bound.test() is None:
                pass
            assert out.tolist() == (np.arange(8) * p + i).tolist()
            assert not bound.active
    # An MPI without persistent collectives: each start re-posts Iallreduce; same results.
    buf = bind(t, "test")
    request = persistent_request(_not_implemented, comm.mpi.Iallreduce, MPI.IN_PLACE, buf.spec,
                                 MPI.SUM)
    assert isinstance(request, Reposted)
    with Persistent(request, comm.ledger, "reposted", buf.nbytes, buf.nbytes, buf) as bound:
        for i in range(3):
            t.fill_(float(r * i))
            bound.run()
            assert t.tolist() == [i * p * (p - 1) / 2] * 256
    sizes = [1, 17, 256]  # messages shorter than the bound receive buffer
    if p > 1:
        got = torch.zeros(256, dtype=torch.float64)
        msgs = {n: torch.empty(n, dtype=torch.float64) for n in sizes}
        sends = {n: comm.Send_init(msgs[n], (r + 1) % p, tag=n) for n in sizes}
        receive = comm.Recv_init(got, (r - 1) % p)
        for step in range(30):
            n = sizes[step % 3]
            msgs[n].fill_(r * 1000 + step)
            receive.start()  # posted first: a ring of blocking sends cannot deadlock
            sends[n].run()
            status = receive.wait()
            assert (status.source, status.tag, status.count, status.nbytes) == (
                (r - 1) % p, n, n, 8 * n)
            assert got[:n].tolist() == [((r - 1) % p) * 1000 + step] * n
        for bound in [*sends.values(), receive]:
            bound.free()
    totals = comm.ledger.totals()
    assert comm.ledger.bound == []  # every handle freed: counts folded in for good
    assert (totals["Allreduce_init"]["calls"], totals["Allreduce_init"]["bytes_sent"],
            totals["Allreduce_init"]["bytes_received"]) == (45, 40 * 1024 + 5 * 64,
                                                             40 * 1024 + 5 * 64)
    assert totals["reposted"]["calls"] == 3
    assert totals["Allreduce_init"]["outstanding_seconds"] > 0  # the start/test pairs
    if p > 1:
        moved = 10 * 8 * sum(sizes)
        assert (totals["Send_init"]["calls"], totals["Send_init"]["bytes_sent"]) == (30, moved)
        assert (totals["Recv_init"]["calls"], totals["Recv_init"]["bytes_received"]) == (
            30, moved)
    comm.ledger.reset()
    assert "Allreduce_init" not in comm.ledger.totals()


def test_a_live_handle_is_counted_whenever_the_ledger_is_read():
    comm = world()
    comm.ledger.reset()
    t = torch.ones(10, dtype=torch.float64)
    bound = comm.Allreduce_init(t)
    bound.run()
    bound.run()
    assert comm.ledger.totals()["Allreduce_init"]["bytes_sent"] == 160
    assert comm.ledger.bytes_received() == 160
    comm.ledger.reset()  # resets the live handle's counts too
    bound.run()
    assert comm.ledger.totals()["Allreduce_init"]["calls"] == 1
    bound.free()
    bound.free()  # idempotent
    assert comm.ledger.totals()["Allreduce_init"]["calls"] == 1
    assert comm.ledger.bound == [] and ARRIVED < 0


def test_misuse_is_refused_with_the_fix():
    comm = world()
    with pytest.raises(ValueError, match="staged through a copy"):
        comm.Allreduce_init(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"t\.contiguous\(\)"):
        comm.Send_init(torch.ones(4, 4).t(), 0)
    with pytest.raises(ValueError, match="do not match"):
        comm.Allreduce_init(torch.ones(4), torch.ones(5))
    with pytest.raises(ValueError, match="not supported"):
        comm.Allreduce_init(torch.ones(4), op="mean")
    comm.Send_init(torch.ones(4, dtype=torch.bfloat16), 0).free()  # raw 16-bit words: fine
    bound = comm.Allreduce_init(torch.ones(4))
    bound.start()
    with pytest.raises(RuntimeError, match="not yet waited for"):
        bound.start()
    with pytest.raises(RuntimeError, match="not yet waited for"):
        bound.run()
    bound.wait()
    bound.wait()  # nothing pending: returns at once
    bound.free()
    with pytest.raises(RuntimeError, match="freed"):
        bound.run()


def test_the_operation_is_bound_to_memory_and_never_uses_freed_memory():
    comm = world()
    src, out = torch.full((4,), 3.0), torch.zeros(4)
    bound = comm.Allreduce_init(src, out)
    src.set_(torch.full((4,), 7.0).untyped_storage())  # src now elsewhere; bound memory alive
    del src
    bound.run()
    assert out.tolist() == [3.0] * 4
    out.resize_(1 << 20)  # re-allocated in place: the bound memory was freed
    for use in (bound.run, bound.start):
        with pytest.raises(RuntimeError, match="re-allocated"):
            use()
    bound.free()
    a = torch.from_numpy(np.ones(4, dtype=np.float32))  # numpy memory: cannot be resized
    with comm.Send_init(a, 0) as send, comm.Recv_init(torch.zeros(4), 0) as receive:
        receive.start()
        send.run()
        assert receive.wait().count == 4
    with pytest.raises(RuntimeError, match="not resizable"):
        a.resize_(8)


def test_an_exception_never_waits_for_a_pending_operation():
    """A receive started inside ``with`` that nobody will ever match: the exception leaves the
    block at once (waiting would hang the job the exception is meant to abort)."""
    comm = world()
    buf = torch.zeros(4)
    with (pytest.raises(KeyError, match="user code failed"),
          comm.Recv_init(buf, source=0, tag=4242) as receive):
        receive.start()
        raise KeyError("user code failed")
    with pytest.raises(RuntimeError, match="freed"):
        receive.start()
    with comm.Send_init(torch.ones(4), 0, tag=4242) as send:  # the abandoned receive is
        send.run()  # still posted: a matching message lands in its (kept) buffer
    assert buf.tolist() == [1.0] * 4
