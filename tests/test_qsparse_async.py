"""Asynchronous Qsparse-local-SGD on real ranks: no update lost or applied twice, whatever the
arrival order (random straggler delays shuffle it)."""

import torch

from hpcml.comm import StragglerConfig, make_delay_model
from hpcml.qsparse import QsparseLocalSGD, Server, ServerExchange, make_compressor
from hpcml.testing import mpi_test

D, LR, STEPS = 12, 0.1, 12


def direction(worker):
    return torch.linspace(-1.0, 1.0, D, dtype=torch.float64) * (worker + 1) + worker


@mpi_test(ranks=[2, 4])
def test_server_applies_every_update_exactly_once(comm):
    """With a linear loss <c_r, x> each worker's total progress is STEPS * LR * c_r whatever
    model it restarts from, and error feedback keeps sent + memory == progress (Algorithm 2),
    so the server must end at x0 - (1/R) sum_r (STEPS * LR * c_r - m_r)."""
    comm.set_delays(make_delay_model(StragglerConfig(kind="exponential", mean=0.002, seed=3)))
    workers = comm.size - 1
    for name in ("identity", "topk"):
        c = make_compressor(name, k=3)
        x0 = torch.arange(D, dtype=torch.float64)
        if comm.rank == 0:
            server = Server(comm, x0, c)
            x = server.serve()
            memories = comm.gather(None)[1:]
            expected = x0 - sum(STEPS * LR * direction(w) - m
                                for w, m in enumerate(memories)) / workers
            torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
            periods = [1 + w % 3 for w in range(workers)]
            assert server.updates == sum(STEPS // p for p in periods)
            assert all(server.bits_up[w + 1] == STEPS // p * c.bits(D, torch.float64)
                       for w, p in enumerate(periods))
            continue
        w = comm.rank - 1
        lin = torch.nn.Linear(D, 1, bias=False).double()
        qs = QsparseLocalSGD(lin, torch.optim.SGD(lin.parameters(), lr=LR), compressor=c,
                             H=1 + w % 3, exchange=ServerExchange(comm), seed=5)
        for t in range(STEPS):
            comm.straggle(t)
            qs.zero_grad()
            lin(direction(w)).sum().backward()
            qs.step()
        qs.close()
        # progress not yet synced (STEPS not a multiple of H) counts as unsent memory
        pending = qs.x_sync - torch.nn.utils.parameters_to_vector(lin.parameters()).detach()
        comm.gather(qs.memory + pending)
