"""MADA under data parallelism: the learned coefficients stay bitwise identical on every rank
(inside hpcml.parallel.DistributedOptimizer; Qsparse-local-SGD with the hyper-gradient
averaged) and equal, up to summation order, to one process training on the whole batch."""

import torch

from hpcml.optim import MADA, average_hypergradient
from hpcml.parallel import DistributedOptimizer
from hpcml.qsparse import QsparseLocalSGD
from hpcml.testing import mpi_test

X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
OPTS = dict(lr=0.05, hyper_lr=20.0, beta3=0.3, c=0.7, rho=0.5, gamma=0.9)
# Without the sign-based parts (Yogi's c, Lion's gamma frozen at 1) the update is smooth, so the
# data-parallel run can be compared with one process despite the different summation order.
SMOOTH = dict(lr=0.01, beta3=0.3, rho=0.5, c=1.0, gamma=1.0,
              hyper_lr=dict(beta1=0.01, beta2=0.01, beta3=1.0, rho=1.0))


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def loss_on(model, x, y, step):
    return ((model(x + 0.1 * step) - y) ** 2).mean()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(opts, steps, comm=None):
    """MADA on the global batch: in one process, or data parallel over ``comm`` (each rank
    its slice, gradients averaged by hpcml.parallel.DistributedOptimizer)."""
    model = mlp()
    mada = MADA(model.parameters(), **opts)
    opt = mada if comm is None else DistributedOptimizer(mada, model, comm=comm)
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    mine = slice(rank * 16 // size, (rank + 1) * 16 // size)
    for step in range(steps):
        opt.zero_grad()
        loss_on(model, X[mine], Y[mine], step).backward()
        opt.step()
    return model, mada


@mpi_test(ranks=[1, 2, 4], in_process=True)
def test_data_parallel_mada_coefficients_identical_on_all_ranks(comm):
    model, opt = train(OPTS, 12, comm)
    coeffs = comm.allgather(opt.coefficients)
    params = comm.allgather(flat(model))
    assert all(c == coeffs[0] for c in coeffs), coeffs
    assert all(torch.equal(p, params[0]) for p in params)
    assert coeffs[0] != {**dict(beta1=0.9, beta2=0.999), **{k: OPTS[k] for k in
                                                            ("beta3", "c", "rho", "gamma")}}
    model, opt = train(SMOOTH, 12, comm)
    ref_model, ref = train(SMOOTH, 12)
    for k, v in ref.coefficients.items():
        assert abs(opt.coefficients[k] - v) < 1e-5, (k, opt.coefficients[k], v)
    assert ref.coefficients["rho"] != SMOOTH["rho"]
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-4, atol=1e-5)


@mpi_test(ranks=[2, 4], in_process=True)
def test_mada_inside_qsparse_keeps_coefficients_identical_with_averaged_hypergradient(comm):
    def train(reduce):
        model = mlp()
        opt = MADA(model.parameters(), **{**OPTS, "lr": 0.02, "hyper_lr": 0.5},
                   hypergrad_reduce=average_hypergradient(comm) if reduce else None)
        qs = QsparseLocalSGD(model, opt, H=3, comm=comm)
        xs, ys = X[comm.rank::comm.size], Y[comm.rank::comm.size]
        first = float(loss_on(model, X, Y, 0).detach())
        for _ in range(12):
            qs.zero_grad()
            loss_on(model, xs, ys, 0).backward()
            qs.step()
        return opt.coefficients, flat(model), first, float(loss_on(model, X, Y, 0).detach())

    coeffs, params, first, last = train(reduce=True)
    every = comm.allgather((coeffs, params))
    assert all(c == every[0][0] for c, _ in every)
    assert all(torch.equal(p, every[0][1]) for _, p in every)  # 12 steps = 4 syncs of H = 3
    assert last < first
    local = comm.allgather(train(reduce=False)[0])
    assert any(c != local[0] for c in local)  # own hyper-gradients drift apart
