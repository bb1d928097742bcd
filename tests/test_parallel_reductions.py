"""The ``reduction`` strategies of hpcml.parallel on the NMT transformer (sparse embedding
gradients) at 1, 2 and 4 ranks: reduced gradients equal the single-process gradient of the
concatenated global batch, all strategies give the same update, parameters stay identical across
ranks, and the sparse payload grows with P as arXiv 1905.04035 says."""

import warnings

import numpy as np
import torch

from hpcml.comm import chunk_bounds
from hpcml.nmt.data import collate
from hpcml.nmt.model import Transformer, smoothed_loss_sum
from hpcml.nmt.step import backward, global_counts, train_step
from hpcml.parallel import (
    REDUCTIONS,
    DistributedOptimizer,
    ExchangeMemory,
    allgather_sparse,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from hpcml.testing import mpi_test

VOCAB, GLOBAL_BATCH = 24, 8


def global_sentences(step=0):
    rng = np.random.default_rng(42 + step)
    src = [rng.integers(4, VOCAB, int(rng.integers(2, 7))) for _ in range(GLOBAL_BATCH)]
    tgt = [rng.integers(4, VOCAB, int(rng.integers(1, 6))) for _ in range(GLOBAL_BATCH)]
    return src, tgt


def rank_batch(comm, step=0):
    src, tgt = global_sentences(step)
    lo, hi = chunk_bounds(GLOBAL_BATCH, comm.size, comm.rank)
    return collate(src[lo:hi], tgt[lo:hi])


def tiny(sparse=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return Transformer(VOCAB, d_model=16, heads=2, layers=1, ff=32, dropout=dropout,
                       sparse=sparse)


def reference_grads():
    """Single process, whole global batch, global mean loss."""
    model = tiny()
    b = collate(*global_sentences())
    (smoothed_loss_sum(model(b.src, b.tgt_in), b.tgt_out, 0.1) / b.tokens).backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad)
            for n, p in model.named_parameters()}


@mpi_test(in_process=True)
def test_reduced_gradients_equal_global_batch_gradient(comm):
    ref = reference_grads()
    batch = rank_batch(comm)
    for name in REDUCTIONS:
        model = tiny()
        exchange = DistributedOptimizer(torch.optim.SGD(model.parameters()), model, comm=comm,
                                        reduction=name, bucket_kib=4)
        tokens, _ = global_counts(comm, batch.tokens)
        backward(model, batch, 0.1, tokens, comm.size)
        exchange.synchronize()
        for pname, p in model.named_parameters():
            assert not p.grad.is_sparse, (name, pname)
            torch.testing.assert_close(p.grad, ref[pname], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, q=pname: f"{n} {q}: {m}")
        if name == "auto":  # tied embedding: the rows cover the vocabulary, dense is cheaper
            assert exchange.choices == {"embed.weight": "allreduce"}
        exchange.reducer.remove_hooks()
    check_exchange_memory(comm)


@mpi_test(in_process=True)
def test_averaging_is_the_sum_divided_by_p_bit_for_bit(comm):
    """At P = 1, 2, 4 the average is written into the buckets already divided by P (exact for
    a power of two): the result equals the summed exchange divided by P in every bit, for the
    tied sparse embedding (each use written as autograd computes it) and the dense parameters,
    in float32 and over a bfloat16 wire."""
    batch = rank_batch(comm)
    tokens, _ = global_counts(comm, batch.tokens)
    exact = {}
    for wire in (None, torch.bfloat16):
        grads = exact.setdefault(wire, {})
        for op in ("average", "sum"):
            model = tiny()
            dist = DistributedOptimizer(torch.optim.SGD(model.parameters()), model, comm=comm,
                                        bucket_kib=4, op=op, wire_dtype=wire)
            backward(model, batch, 0.1, tokens, comm.size)
            dist.synchronize()
            grads[op] = {n: p.grad.clone() for n, p in model.named_parameters()}
            dist.reducer.remove_hooks()
        for name, summed in grads["sum"].items():
            assert torch.equal(grads["average"][name], summed / comm.size), (wire, name)
    # backward(create_graph=True) (a gradient penalty's first pass) reduces the same values, up
    # to the order in which autograd rather than the reducer sums the embedding's uses
    model = tiny()
    dist = DistributedOptimizer(torch.optim.SGD(model.parameters()), model, comm=comm,
                                bucket_kib=4)
    logits = model(batch.src, batch.tgt_in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on the parameter-gradient cycle
        (smoothed_loss_sum(logits, batch.tgt_out, 0.1) * (comm.size / tokens)).backward(
            create_graph=True)
    dist.synchronize()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.detach(), exact[None]["average"][name], rtol=1e-6,
                                   atol=1e-7, msg=name)
    dist.reducer.remove_hooks()


def run_steps(comm, strategy, steps=3, adam=False):
    """Parameters after ``steps`` steps of SGD with momentum (linear in the gradient, so float
    rounding differences between exchanges stay at rounding size; Adam's first steps are
    sign(g) x lr and would amplify them for near-zero gradients) or of Adam."""
    model = tiny(dropout=0.1, seed=comm.rank)  # different init per rank: broadcast fixes it
    opt = (torch.optim.Adam(model.parameters(), lr=0.0) if adam
           else torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9))
    broadcast_parameters(model, comm)
    broadcast_optimizer_state(opt, comm)
    torch.manual_seed(1000 + comm.rank)
    dist = DistributedOptimizer(opt, model, comm=comm, reduction=strategy, bucket_kib=2)
    for step in range(steps):
        train_step(comm, model, rank_batch(comm, step), dist, 0.1, 0.5)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@mpi_test(in_process=True)
def test_strategies_same_update_and_params_identical_across_ranks(comm):
    results = {name: run_steps(comm, name) for name in REDUCTIONS}
    adam = run_steps(comm, "sparse_allgather", adam=True)
    for name, flat in [*results.items(), ("adam", adam)]:
        everyone = torch.empty(comm.size * flat.numel())
        comm.Allgather(flat, everyone)
        for r in range(comm.size):
            assert torch.equal(everyone.view(comm.size, -1)[r], flat), (name, r)
        if name != "adam":
            torch.testing.assert_close(flat, results["dense_allreduce"], rtol=1e-5, atol=1e-6)
    start = tiny(seed=0)
    moved = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    assert not torch.allclose(moved, results["dense_allreduce"])
    check_sparse_allgather_payload_and_traffic(comm)


def check_sparse_allgather_payload_and_traffic(comm):
    p, r = comm.size, comm.rank
    rows, d = 10, 3
    nnz = r + 2
    idx = torch.tensor([[(r + k) % rows for k in range(nnz)]])
    vals = torch.full((nnz, d), float(r + 1))
    grad = torch.sparse_coo_tensor(idx, vals, (rows, d), check_invariants=False)
    before = comm.ledger.totals().get("Allgatherv", {"bytes_received": 0})["bytes_received"]
    memory = ExchangeMemory()
    total = allgather_sparse(comm, grad, memory)
    expected = torch.zeros(rows, d)
    for q in range(p):
        for k in range(q + 2):
            expected[(q + k) % rows] += q + 1
    assert torch.equal(total.to_dense(), expected)
    gathered_rows = sum(q + 2 for q in range(p))
    received = comm.ledger.totals()["Allgatherv"]["bytes_received"] - before
    assert received == gathered_rows * (8 + 4 * d)
    coalesced = total._nnz() * (8 + 4 * d)
    assert memory.peak == gathered_rows * (8 + 4 * d) + 8 * p + coalesced
    assert memory.current == 0


def check_exchange_memory(comm):
    """Dense: the model's size at any P; sparse: the dense rest + P payloads + the sum."""
    batch = rank_batch(comm)
    peaks = {}
    for name in ("dense_allreduce", "sparse_allgather"):
        model = tiny()
        exchange = DistributedOptimizer(torch.optim.SGD(model.parameters()), model, comm=comm,
                                        reduction=name, bucket_kib=4)
        tokens, _ = global_counts(comm, batch.tokens)
        backward(model, batch, 0.1, tokens, comm.size)
        if name == "sparse_allgather":  # dense_allreduce took the uses: .grad is None
            nnz = model.embed.weight.grad._nnz()
        exchange.synchronize()
        peaks[name] = exchange.memory.peak
        exchange.reducer.remove_hooks()
    n_params = sum(q.numel() for q in tiny().parameters())
    assert peaks["dense_allreduce"] == 4 * n_params  # the model's size, whatever P
    all_nnz = comm.allgather(nnz)
    emb = VOCAB * 16
    payload = sum(all_nnz) * (8 + 4 * 16) + 8 * comm.size
    assert peaks["sparse_allgather"] == 4 * (n_params - emb) + payload + emb * 4 + VOCAB * 8
