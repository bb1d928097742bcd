"""Synchronous Qsparse-local-SGD on real MPI ranks against single-process references."""

import numpy as np
import torch

from hpcml.qsparse import QsparseLocalSGD, compensate, make_compressor
from hpcml.testing import mpi_test

D_IN, CLASSES, BATCH, LR = 6, 3, 5, 0.3


def problem(rank, step):
    """Rank ``rank``'s minibatch at ``step`` (float64), computable on any rank."""
    rng = np.random.default_rng([7, rank, step])
    x = torch.from_numpy(rng.standard_normal((BATCH, D_IN)))
    return x, torch.from_numpy(rng.integers(0, CLASSES, BATCH))


def model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, CLASSES)).double()


def flat(m):
    return torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()


def loss_of(m, x, y):
    return torch.nn.functional.cross_entropy(m(x), y)


def distributed(comm, compressor, H, steps):
    m = model()
    qs = QsparseLocalSGD(m, torch.optim.SGD(m.parameters(), lr=LR), compressor=compressor, H=H,
                         comm=comm, seed=1)
    for t in range(steps):
        qs.zero_grad()
        loss_of(m, *problem(comm.rank, t)).backward()
        qs.step()
    return qs


def simulated(P, compressor, H, steps):
    """Algorithm 1 for P workers in one process (same compressor streams as the ranks)."""
    workers = [model() for _ in range(P)]
    x_sync, memories = flat(workers[0]), [torch.zeros_like(flat(workers[0])) for _ in range(P)]
    gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([1, r]).generate_state(1)[0]))
            for r in range(P)]
    opts = [torch.optim.SGD(w.parameters(), lr=LR) for w in workers]
    for t in range(steps):
        for r, (w, opt) in enumerate(zip(workers, opts, strict=True)):
            opt.zero_grad()
            loss_of(w, *problem(r, t)).backward()
            opt.step()
        if (t + 1) % H == 0:
            updates = []
            for r, w in enumerate(workers):
                _, g, memories[r] = compensate(compressor, memories[r], x_sync, flat(w), gens[r])
                updates.append(g)
            x_sync = x_sync - sum(updates) / P
            for w in workers:
                torch.nn.utils.vector_to_parameters(x_sync.clone(), w.parameters())
    return x_sync


def check_h1_identity_equals_plain_distributed_sgd(comm):
    """H = 1 with the identity compressor is minibatch SGD on the concatenated batch."""
    steps = 6
    qs = distributed(comm, make_compressor("identity"), 1, steps)
    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for t in range(steps):
        batches = [problem(r, t) for r in range(comm.size)]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        opt.zero_grad()
        loss_of(ref, x, y).backward()
        opt.step()
    torch.testing.assert_close(qs.x_sync, flat(ref), rtol=1e-12, atol=1e-13)
    assert qs.bits_sent == steps * 64 * qs.x_sync.numel()


def check_local_steps_and_compression_match_single_process_algorithm(comm):
    """H > 1 with error-compensated top-k / Q∘rand-k equals Algorithm 1 simulated in one
    process, every rank ends with the same x_sync, and bits/bytes are accounted exactly."""
    for name, H in (("identity", 3), ("topk", 2), ("qrandk", 3)):
        comm.ledger.reset()
        c = make_compressor(name, k=7, s=3)
        qs = distributed(comm, c, H, 7)
        torch.testing.assert_close(qs.x_sync, simulated(comm.size, c, H, 7), rtol=1e-12,
                                   atol=1e-13)
        everyone = np.empty(comm.size * qs.x_sync.numel())
        comm.Allgather(qs.x_sync.numpy(), everyone)
        assert (everyone.reshape(comm.size, -1) == qs.x_sync.numpy()).all()
        d = qs.x_sync.numel()
        assert qs.syncs == 7 // H and qs.bits_sent == qs.syncs * c.bits(d, torch.float64)
        sent = comm.ledger.totals()["Allgatherv"]["bytes_sent"]
        assert sent == qs.syncs * -(-c.bits(d, torch.float64) // 8)


@mpi_test(in_process=True)
def test_sync_equals_single_process_references(comm):
    """One launch per rank count (each costs seconds): both checks above."""
    check_h1_identity_equals_plain_distributed_sgd(comm)
    check_local_steps_and_compression_match_single_process_algorithm(comm)
