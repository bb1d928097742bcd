"""The small-message fast path: a tensor's MPI description is remembered under its address, so
a buffer reused across calls must never be described stale after it changed in place, and the
ledger must stay exact over many small calls."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi4py import MPI

from hpcml.comm.buffers import message
from hpcml.comm.communicator import ANY_TAG, Communicator
from hpcml.comm.ledger import Ledger
from hpcml.comm.status import Status
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


# -- the inline fast paths of Allreduce, Send and Recv against an independent reference ----------
DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int32: np.int32,
          torch.int64: np.int64, torch.bfloat16: np.int16}  # bfloat16 moves as 16-bit words
SAME_SIZE = {torch.float32: torch.int32, torch.int32: torch.float32, torch.float64: torch.int64,
             torch.int64: torch.float64, torch.bfloat16: torch.int16, torch.int16: torch.bfloat16}
CHANGES = ("fresh", "resize", "set", "data_dtype", "data_transposed", "t_", "contiguous")


def change(t: torch.Tensor, how: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``t`` changed in one of the ways that keep or move its address (the object may stay)."""
    if how == "fresh":
        return torch.zeros(n, dtype=dtype)
    if how == "resize":
        return t.resize_(n)
    if how == "set":
        return t.set_(torch.zeros(n, dtype=t.dtype).untyped_storage())
    if how == "data_dtype" and t.is_contiguous():
        t.data = t.view(SAME_SIZE[t.dtype])  # same address and bytes, _version unchanged
    elif how == "data_transposed" and t.is_contiguous() and t.numel() % 2 == 0:
        t.data = t.view(2, -1).t()  # same address, bytes and dtype; not contiguous
    elif how == "t_" and t.is_contiguous() and t.numel() % 2 == 0:
        t.data = t.view(2, -1)
        t.t_()
    elif how == "contiguous":
        t.data = t.contiguous()
    return t


def words(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.int16) else t


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(CHANGES), st.integers(1, 40),
                          st.sampled_from(sorted(DTYPES, key=str)), st.integers(0, 3)),
                min_size=1, max_size=20))
def test_fast_paths_never_describe_a_stale_buffer_and_the_ledger_stays_exact(steps):
    """Random changes to one reused tensor between plain Allreduce, Send and Recv calls on
    COMM_SELF: every call moves the tensor's current bytes (or refuses a non-contiguous one),
    Recv's Status says what arrived, and the ledger equals an independent count."""
    comm = Communicator(MPI.COMM_SELF, ledger=Ledger())
    mpi = comm.mpi
    t = torch.zeros(8)
    count = {"Allreduce": [0, 0], "Send": [0, 0], "Recv": [0, 0]}  # calls, bytes
    for i, (how, n, dtype, tag) in enumerate(steps):
        t = change(t, how, n, dtype)
        if t.dtype not in DTYPES:
            t = torch.zeros(n, dtype=dtype)
        t.copy_((torch.arange(t.numel()) * 3 + i).reshape(t.shape) % 100)
        if not t.is_contiguous():  # refused; a peer's call is posted, so none can hang
            with pytest.raises(ValueError, match="non-contiguous"):
                comm.Allreduce(t)
            sink = np.zeros(t.numel(), dtype=DTYPES[t.dtype])
            req = mpi.Irecv(sink, 0, tag)
            with pytest.raises(ValueError, match="non-contiguous"):
                comm.Send(t, 0, tag)
            mpi.Send(sink.copy(), 0, tag)
            req.Wait()
            req = mpi.Isend(sink, 0, tag)
            with pytest.raises(ValueError, match="non-contiguous"):
                comm.Recv(t, 0, tag)
            mpi.Recv(sink.copy(), 0, tag)
            req.Wait()
            continue
        before, size = t.clone(), t.numel() * t.element_size()
        out = torch.empty_like(t)
        assert comm.Allreduce(t, out) is out  # one rank: the sum is the input
        assert torch.equal(words(out), words(before))
        reduced = t.numel() * 4 if t.dtype == torch.bfloat16 else size  # staged via float32
        count["Allreduce"][0] += 1
        count["Allreduce"][1] += reduced
        got = np.zeros(t.numel(), dtype=DTYPES[t.dtype])
        req = mpi.Irecv(got, 0, tag)
        comm.Send(t, 0, tag)
        req.Wait()
        assert got.tobytes() == words(before).numpy().tobytes()
        count["Send"][0] += 1
        count["Send"][1] += size
        k = 1 + (i + n) % t.numel()  # a message no longer than the buffer
        payload = np.arange(k, dtype=DTYPES[t.dtype]) + 7
        req = mpi.Isend(payload, 0, tag)
        status = comm.Recv(t, 0, tag if i % 2 else ANY_TAG)
        req.Wait()
        assert status == Status(0, tag, k, k * t.element_size())
        arrived = words(t).reshape(-1)[:k].clone()  # a copy: t itself stays resizable
        assert arrived.numpy().tobytes() == payload.tobytes()
        count["Recv"][0] += 1
        count["Recv"][1] += k * t.element_size()
    totals = comm.ledger.totals()
    for op, (calls, nbytes) in count.items():
        key = "bytes_received" if op == "Recv" else "bytes_sent"
        assert (totals.get(op, {}).get("calls", 0), totals.get(op, {}).get(key, 0)) == \
            (calls, nbytes)
    if "Allreduce" in totals:
        assert totals["Allreduce"]["bytes_received"] == count["Allreduce"][1]


def test_recv_hands_back_its_last_status_only_when_it_says_the_same():
    comm = Communicator(MPI.COMM_SELF, ledger=Ledger())
    seen = []
    for payload, buf, tag in [(np.ones(2, np.float32), torch.zeros(4), 1),
                              (np.ones(2, np.float32), torch.zeros(4), 1),  # the same again
                              (np.ones(1, np.float64), torch.zeros(4, dtype=torch.float64), 1),
                              (np.ones(1, np.float64), torch.zeros(4, dtype=torch.float64), 2),
                              (np.ones(3, np.float64), np.zeros(3), 2)]:
        req = comm.mpi.Isend(payload, 0, tag)
        seen.append(comm.Recv(buf, 0, ANY_TAG))
        req.Wait()
    assert seen == [Status(0, 1, 2, 8), Status(0, 1, 2, 8), Status(0, 1, 1, 8),
                    Status(0, 2, 1, 8), Status(0, 2, 3, 24)]
    assert seen[1] is seen[0]
    assert comm.ledger.totals()["Recv"] == {"calls": 5, "bytes_sent": 0, "bytes_received": 56,
                                            "seconds": pytest.approx(0, abs=1),
                                            "outstanding_seconds": 0.0}
