"""Encoded solves on real ranks (rank 0 master, ranks 1..m workers; 1 rank = simulated)."""

import numpy as np

from hpcml.coded.config import CodeConfig, SolverConfig
from hpcml.coded.encoders import make_encoder
from hpcml.coded.problems import Problem, load_data
from hpcml.coded.solver import solve
from hpcml.comm import StragglerConfig, make_delay_model
from hpcml.testing import mpi_test


def shared_dir(comm, name):
    import tempfile
    from pathlib import Path

    path = tempfile.mkdtemp(prefix=f"coded-{name}-") if comm.rank == 0 else None
    return Path(comm.bcast(path))


def problem(comm, lam=0.01):
    if comm.rank:
        return None
    x, y = load_data("synthetic", kind="ridge", n=240, p=12, seed=0)
    return Problem("ridge", x, y, lam=lam)


@mpi_test(ranks=[1, 2, 3, 4, 5])
def test_k_equals_m_without_stragglers_reproduces_uncoded(comm):
    """With every worker awaited, GD on a tight-frame (ETF) encoding follows the uncoded GD
    iterates exactly, and converges to the closed-form ridge solution."""
    prob = problem(comm)
    solver = SolverConfig(algorithm="lbfgs", iterations=60)
    coded = solve(comm, prob, CodeConfig(encoder="etf"), solver, shared_dir(comm, "a"), 0)
    plain = solve(comm, prob, CodeConfig(encoder="uncoded", beta=1.0), solver,
                  shared_dir(comm, "b"), 0)
    if comm.rank == 0:
        np.testing.assert_allclose(coded.w, plain.w, rtol=1e-9, atol=1e-12)
        assert coded.relative_error[-1] < 1e-6
        assert coded.discarded == plain.discarded == 0


@mpi_test(ranks=[1, 3, 4, 5])
def test_always_late_worker_is_an_erasure_and_never_applied(comm):
    """Worker 0 (rank 1) is 2 s slow every iteration and the master waits for k = m - 1:
    its answers arrive late and are discarded, so GD converges to the minimizer of the
    encoded objective restricted to the other workers' rows (computed here in closed form),
    which differs from w*: any late answer applied to a later iteration would break this."""
    m = 4 if comm.size == 1 else comm.size - 1
    comm.set_delays(make_delay_model(StragglerConfig(kind="fixed", slow_ranks=[1], delay=2.0),
                                     max(comm.size, 2)))
    prob = problem(comm)
    code = CodeConfig(encoder="etf", wait_for=m - 1)
    res = solve(comm, prob, code, SolverConfig(algorithm="lbfgs", iterations=60),
                shared_dir(comm, "c"), 0)
    if comm.rank == 0:
        enc = make_encoder("etf", prob.n, m, 2.0, 0)
        rows = np.concatenate(enc.blocks[1:])
        sx, sy = enc.apply(prob.x)[rows], enc.apply(prob.y[:, None])[rows, 0]
        scale = (m - 1) / m * 2.0 * prob.n
        w_a = np.linalg.solve(sx.T @ sx / scale + prob.lam * np.eye(prob.x.shape[1]),
                              sx.T @ sy / scale)
        np.testing.assert_allclose(res.w, w_a, rtol=1e-6, atol=1e-9)
        assert np.linalg.norm(w_a - prob.exact()) > 1e-3


@mpi_test(ranks=[1, 5])
def test_encoded_bcd_reaches_exact_ridge_under_exponential_delays(comm):
    comm.set_delays(make_delay_model(StragglerConfig(kind="exponential", mean=0.002, seed=4),
                                     comm.size))
    prob = problem(comm, lam=0.1)
    m = 4 if comm.size == 1 else comm.size - 1
    res = solve(comm, prob, CodeConfig(encoder="etf", wait_for=m - 1),
                SolverConfig(algorithm="bcd", iterations=400), shared_dir(comm, "d"), 0)
    if comm.rank == 0:
        assert res.relative_error[-1] < 1e-5
