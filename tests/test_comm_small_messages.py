"""The small-message fast path: a tensor's MPI description is remembered under its address, so
a buffer reused across calls must never be described stale after it changed in place, and the
ledger must stay exact over many small calls."""

import numpy as np
import pytest
import torch

from hpcml.comm.buffers import message
from hpcml.testing import mpi_test


def described(t: torch.Tensor, reduce: bool = False) -> tuple[np.ndarray, int, str]:
    """What message() hands MPI for ``t``: its bytes, byte count and MPI datatype name."""
    spec, nbytes, _, back = message(t, reduce)
    assert back is None
    return np.frombuffer(spec[0], dtype=np.uint8), nbytes, spec[1].Get_name()


def expect(t: torch.Tensor, mpi_name: str) -> tuple[list[int], int, str]:
    raw = t.clone().numpy().view(np.uint8).ravel()  # a copy: t itself stays resizable
    return raw.tolist(), raw.size, mpi_name


def test_a_tensor_changed_in_place_is_described_afresh():
    t = torch.arange(16, dtype=torch.float32)
    address = t.data_ptr()
    described(t)  # remembered
    t.resize_(8)  # same address, fewer bytes
    assert t.data_ptr() == address
    mem, n, name = described(t)
    assert (mem.tolist(), n, name) == expect(t, "MPI_FLOAT")
    t.data = t.view(torch.int32)  # same address and bytes, another dtype
    assert t.data_ptr() == address
    mem, n, name = described(t, reduce=True)
    assert (mem.tolist(), n, name) == expect(t, "MPI_INT32_T")
    t.resize_(4096).fill_(3)  # re-allocated elsewhere
    mem, n, name = described(t)
    assert (mem.tolist(), n, name) == expect(t, "MPI_INT32_T")
    t.set_(torch.full((8,), 7, dtype=torch.int32).untyped_storage())  # another storage
    mem, n, name = described(t)
    assert (mem.tolist(), n, name) == expect(t, "MPI_INT32_T")


def test_another_tensor_at_a_remembered_address_is_described_as_itself():
    f = torch.linspace(0, 1, 8, dtype=torch.float64)
    described(f)
    # What a freed-and-reused address looks like: another tensor object, same memory.
    i = torch.empty(0, dtype=torch.int64).set_(f.untyped_storage(), 0, (8,))
    assert i.data_ptr() == f.data_ptr()
    mem, n, name = described(i)
    assert (mem.tolist(), n, name) == expect(i, "MPI_INT64_T")
    h = torch.empty(0, dtype=torch.bfloat16).set_(f.untyped_storage(), 0, (32,))
    spec, n, itemsize, back = message(h, True)  # reductions stage 16-bit floats through f32
    assert (type(spec), n, itemsize, back is not None) == (np.ndarray, 128, 4, True)


def test_a_remembered_tensor_made_non_contiguous_in_place_is_refused():
    t = torch.zeros(4, 4)
    described(t)
    t.t_()  # same address, bytes and dtype; no longer contiguous
    with pytest.raises(ValueError, match=r"t\.contiguous\(\)"):
        message(t)


@mpi_test(in_process=True)
def test_reused_buffers_changed_between_calls_move_the_right_bytes(comm):
    p, r = comm.size, comm.rank
    comm.ledger.reset()
    t = torch.full((64,), float(r + 1))
    comm.Allreduce(t)
    assert t.tolist() == [p * (p + 1) / 2] * 64
    t.resize_(16).fill_(r + 1)  # same buffer object and address, fewer bytes
    comm.Allreduce(t)
    assert t.tolist() == [p * (p + 1) / 2] * 16
    t.data = torch.full((16,), r + 1, dtype=torch.int32)
    out = torch.zeros(16, dtype=torch.int32)
    out.data = out.view(torch.float32)  # the output, too, changes dtype: to float32 ...
    out.data = out.view(torch.int32)  # ... and back, at the same address
    comm.Allreduce(t, out)
    assert out.tolist() == [p * (p + 1) // 2] * 16
    t.resize_(4096).fill_(r)  # re-allocated
    comm.Allreduce(t, op="max")
    assert t.tolist() == [p - 1] * 4096
    sent = 64 * 4 + 16 * 4 + 16 * 4 + 4096 * 4
    if p > 1:  # a ring of Send/Recv on one reused receive buffer that grows
        buf = torch.zeros(8, dtype=torch.float64)
        for n in (2, 8, 1000):
            buf.resize_(n)
            msg = torch.full((n,), float(r), dtype=torch.float64)
            if r % 2 == 0:
                comm.Send(msg, (r + 1) % p, tag=n)
                status = comm.Recv(buf, (r - 1) % p, tag=n)
            else:
                status = comm.Recv(buf, (r - 1) % p, tag=n)
                comm.Send(msg, (r + 1) % p, tag=n)
            assert (status.count, status.nbytes) == (n, 8 * n)
            assert buf.tolist() == [float((r - 1) % p)] * n
        totals = comm.ledger.totals()
        assert totals["Send"]["bytes_sent"] == totals["Recv"]["bytes_received"] == 8 * 1010
    assert comm.ledger.totals()["Allreduce"]["bytes_sent"] == sent


@mpi_test(in_process=True)
def test_ledger_is_exact_after_many_small_calls(comm):
    p, r = comm.size, comm.rank
    comm.ledger.reset()
    rng = np.random.default_rng(7)  # the same sizes on every rank
    sizes = rng.integers(1, 1025, size=500)
    bufs = [torch.ones(int(n)) for n in sizes[:50]]  # reused ones and fresh ones
    total = 0
    for i, n in enumerate(sizes):
        t = bufs[i % 50] if i % 2 else torch.ones(int(n))
        t.fill_(1.0)
        comm.Allreduce(t)
        assert t[0].item() == p
        total += 4 * t.numel()
    calls = 0
    if p > 1 and r < p - p % 2:
        peer = r ^ 1
        msg, got = torch.arange(256, dtype=torch.float32), torch.empty(256)
        for n in range(1, 257):
            if r % 2 == 0:
                comm.Send(msg[:n], peer)
            else:
                assert comm.Recv(got, peer).count == n
                assert got[:n].tolist() == list(range(n))
        calls = 256
    totals = comm.ledger.totals()
    assert (totals["Allreduce"]["calls"], totals["Allreduce"]["bytes_sent"],
            totals["Allreduce"]["bytes_received"]) == (500, total, total)
    if calls:
        op, key = ("Send", "bytes_sent") if r % 2 == 0 else ("Recv", "bytes_received")
        assert (totals[op]["calls"], totals[op][key]) == (256, 4 * 256 * 257 // 2)
