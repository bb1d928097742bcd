"""Encoded solvers in one process (workers simulated from the seeded delay model)."""

import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcml.coded.bench import plan
from hpcml.coded.bounds import erasure_bound
from hpcml.coded.config import CodeConfig, SolverConfig
from hpcml.coded.encoders import make_encoder
from hpcml.coded.problems import Problem, load_data
from hpcml.coded.regime import paired_speedups, strategy_code
from hpcml.coded.shards import encode_to_shards, load_shard, open_input
from hpcml.coded.solver import SolveResult, solve
from hpcml.comm import StragglerConfig, make_delay_model, world
from hpcml.errors import UsageError


@pytest.fixture
def comm():
    c = world()
    c.set_delays(make_delay_model(StragglerConfig(kind="exponential", mean=0.01, seed=2)))
    return c


def ridge(n=256, p=16, lam=0.01):
    x, y = load_data("synthetic", kind="ridge", n=n, p=p, seed=0)
    return Problem("ridge", x, y, lam=lam)


@pytest.mark.parametrize("encoder,k", [("etf", 4), ("etf", 3), ("hadamard", 3), ("hadamard", 2)])
def test_every_iterate_within_the_erasure_bound(comm, tmp_path, encoder, k):
    """Encoded GD under seeded delays: at every round t, ||w_t - w*|| <= rho^t ||w*|| +
    floor (1 - rho^t) with rho and floor over all k-of-4 subsets (hpcml.coded.bounds), a bound
    that holds for any erasure pattern and is informative here (rho < 1, floor < 0.3 ||w*||;
    floor 0 for k = m, a tight frame losing nothing)."""
    prob = ridge(n=1024)
    w_star = prob.exact()
    alpha = 1.0 / _encoded_smoothness(prob, make_encoder(encoder, prob.n, 4, 2.0, 0))
    bound = erasure_bound(prob.x, prob.y, prob.lam, make_encoder(encoder, prob.n, 4, 2.0, 0), k,
                          alpha)
    res = solve(comm, prob, CodeConfig(encoder=encoder, wait_for=k), SolverConfig(iterations=200),
                tmp_path, 0, w_star)
    assert (res.discarded > 0) == (k < 4) and bound.rho < 1
    assert bound.floor < (0.3 if k < 4 else 1e-12) * np.linalg.norm(w_star)
    distances = np.array(res.relative_error) * np.linalg.norm(w_star)
    limits = np.array([bound.distance(t + 1) for t in range(len(distances))])
    assert np.all(distances <= limits * (1 + 1e-9))


def _encoded_smoothness(prob, enc):
    return np.linalg.norm(enc.apply(prob.x), 2) ** 2 / (enc.beta * prob.n) + prob.lam


def _fixed_subset_offsets(prob, enc, k):
    """||w_A - w*|| for every k-subset A: w_A minimizes subset A's encoded objective, the limit
    of encoded GD when the same k workers answer every round."""
    w_star, sx = prob.exact(), enc.apply(prob.x)
    sy = enc.apply(prob.y[:, None])[:, 0]
    scale = k / enc.m * enc.beta * prob.n
    offsets = []
    for subset in itertools.combinations(range(enc.m), k):
        rows = np.concatenate([enc.blocks[i] for i in subset])
        gram = sx[rows].T @ sx[rows] / scale + prob.lam * np.eye(prob.x.shape[1])
        offsets.append(np.linalg.norm(np.linalg.solve(gram, sx[rows].T @ sy[rows] / scale)
                                      - w_star))
    return offsets


@pytest.mark.parametrize("encoder,k", [("etf", 3), ("hadamard", 2)])
def test_erasure_bound_contains_and_is_near_every_fixed_subset_limit(encoder, k):
    """A fixed subset every round is one erasure pattern: its limit lies within the floor, and
    the floor is within 10x of the worst such limit. Both shrink as n grows (p fixed)."""
    floors = []
    for n in (256, 2048):
        prob = ridge(n=n)
        enc = make_encoder(encoder, n, 4, 2.0, 0)
        bound = erasure_bound(prob.x, prob.y, prob.lam, enc, k,
                              1.0 / _encoded_smoothness(prob, enc))
        worst = max(_fixed_subset_offsets(prob, enc, k))
        assert worst <= bound.floor <= 10 * worst
        floors.append(bound.floor)
    assert floors[1] < 0.5 * floors[0]


def test_stragglers_error_below_uncoded_ignoring_them(comm, tmp_path):
    """GD on ETF-encoded data, k = 3 of 4 with exponential delays ends closer to w* than
    ignoring stragglers on uncoded data."""
    prob = ridge()
    w_star = prob.exact()
    solver = SolverConfig(iterations=300)
    coded = solve(comm, prob, CodeConfig(encoder="etf", wait_for=3), solver, tmp_path / "a", 0,
                  w_star)
    uncoded = solve(comm, prob, CodeConfig(encoder="uncoded", beta=1.0, wait_for=3), solver,
                    tmp_path / "b", 0, w_star)
    assert coded.discarded > 0
    assert coded.relative_error[-1] < 0.8 * uncoded.relative_error[-1]
    assert coded.suboptimality[-1] < 0.5 * uncoded.suboptimality[-1]


@pytest.mark.parametrize("algorithm", ["gd", "lbfgs"])
def test_all_workers_no_erasures_converges_to_exact(comm, tmp_path, algorithm):
    prob = ridge()
    solver = SolverConfig(algorithm=algorithm, iterations=400)
    res = solve(comm, prob, CodeConfig(encoder="hadamard", wait_for=4), solver, tmp_path, 0)
    assert res.relative_error[-1] < 1e-6


@pytest.mark.parametrize("data,n", [("diabetes", 442), ("synthetic", 301)])
def test_hadamard_with_every_worker_equals_the_uncoded_solution(comm, tmp_path, data, n):
    """The issue's case: diabetes (n = 442, not a power of two) and an odd n, all 4 workers
    awaited: the Hadamard code is a tight frame, so L-BFGS ends at the closed-form ridge
    solution (before: relative error 0.237 at n = 442, rows subsampled from 2 x 512)."""
    x, y = load_data(data, kind="ridge", n=n, p=10, seed=0)
    assert x.shape[0] == n
    prob = Problem("ridge", x, y, lam=1e-3)
    res = solve(comm, prob, CodeConfig(encoder="hadamard", wait_for=4),
                SolverConfig(algorithm="lbfgs", iterations=200, step=0.5), tmp_path, 0)
    assert res.relative_error[-1] <= 1e-8


def test_lasso_prox_and_fista_match_sklearn(comm, tmp_path):
    x, y = load_data("diabetes", kind="lasso")
    prob = Problem("lasso", x, y, l1=0.02)
    w_star = prob.exact()
    assert (w_star == 0).any() and (w_star != 0).any()
    for alg in ("prox", "fista"):
        res = solve(comm, prob, CodeConfig(encoder="etf", wait_for=4),
                    SolverConfig(algorithm=alg, iterations=3000), tmp_path / alg, 0, w_star)
        assert res.relative_error[-1] < 1e-3, alg
    coded = solve(comm, prob, CodeConfig(encoder="etf", wait_for=3),
                  SolverConfig(algorithm="prox", iterations=1000), tmp_path / "k", 0, w_star)
    assert coded.suboptimality[-1] < 0.05


def test_encoded_bcd_logistic_exact_despite_erasures(comm, tmp_path):
    """Model parallelism: features encoded by a tight frame; encoded BCD with k = 3 of 4
    converges to the exact logistic-regression solution (not just near it)."""
    x, y = load_data("synthetic", kind="logistic", n=200, p=12, seed=1)
    prob = Problem("logistic", x, y, lam=0.05)
    res = solve(comm, prob, CodeConfig(encoder="etf", wait_for=3),
                SolverConfig(algorithm="bcd", iterations=1500), tmp_path, 0)
    assert res.discarded > 0
    assert res.relative_error[-1] < 1e-4
    assert res.suboptimality[-1] < 1e-7


def test_asynchronous_baseline_converges_to_a_neighbourhood(comm, tmp_path):
    """Constant-step asynchronous updates with stale gradients reach a neighbourhood of w*
    whose size shrinks with the step."""
    prob = ridge(lam=0.05)
    errors = []
    for step in (0.4, 0.1):
        res = solve(comm, prob, CodeConfig(encoder="uncoded", beta=1.0),
                    SolverConfig(algorithm="async", iterations=400, step=step),
                    tmp_path / str(step), 0)
        errors.append(res.relative_error[-1])
    assert errors[1] < 0.05 and errors[1] < errors[0]


@pytest.mark.parametrize("transpose", [False, True])
def test_hdf5_streaming_encode_equals_in_memory(tmp_path, transpose):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 7)), rng.standard_normal(50)
    with h5py.File(tmp_path / "in.h5", "w") as fh:
        fh["feat"], fh["target"] = x, y
    fh, xd, yd = open_input(str(tmp_path / "in.h5"), "feat", "target")
    enc = make_encoder("hadamard", 7 if transpose else 50, 3, 2.0, seed=4)
    with fh:
        encode_to_shards(xd, yd, enc, tmp_path / "out", chunk=3, transpose=transpose)
    s = enc.matrix()
    for i in range(3):
        xi, yi = load_shard(tmp_path / "out", i)
        rows = s[enc.blocks[i]]
        np.testing.assert_allclose(xi, x @ rows.T if transpose else rows @ x, atol=1e-10)
        np.testing.assert_allclose(yi, y if transpose else rows @ y, atol=1e-10)
    assert sorted(p.name for p in Path(tmp_path / "out").iterdir()) == [
        "shard-0.h5", "shard-1.h5", "shard-2.h5"]


def test_hdf5_missing_dataset_names_field(tmp_path):
    with h5py.File(tmp_path / "in.h5", "w") as fh:
        fh["X"] = np.zeros((4, 2))
    with pytest.raises(UsageError, match=r"problem.y_key: dataset 'y' not in .*datasets there: X"):
        open_input(str(tmp_path / "in.h5"), "X", "y")
    with pytest.raises(UsageError, match="problem.path"):
        open_input(str(tmp_path / "nope.h5"), "X", "y")


def test_time_and_iterations_to_eps_take_the_first_crossing_even_at_equal_times():
    res = SolveResult(seconds=[0.0, 0.0, 0.5, 0.5], suboptimality=[0.9, 0.2, 0.05, 0.2],
                      relative_error=[0.0] * 4, discarded=0, encode_seconds=0.0,
                      w=np.zeros(1))
    assert res.iterations_to(0.1) == 3 and res.time_to(0.1) == 0.5
    assert res.iterations_to(0.3) == 2 and res.time_to(0.3) == 0.0
    assert res.iterations_to(0.01) is None and res.time_to(0.01) is None


def test_paired_speedups_count_a_miss_as_zero():
    inf = float("inf")
    assert paired_speedups([2.0, 3.0, 4.0], [1.0, inf, 4.0]) == [2.0, 0.0, 1.0]


def test_bench_plan_runs_k_free_strategies_once_and_the_others_per_k():
    strategies = ["async", "etf", "uncoded-all", "replication"]
    assert plan(strategies, [2, 3]) == [("uncoded-all", 0), ("etf", 2), ("replication", 2),
                                        ("etf", 3), ("replication", 3), ("async", 0)]
    assert plan(["etf"], [3]) == [("etf", 3)]


@pytest.mark.parametrize("name", ["uncoded-all", "uncoded-k", "etf", "async"])
def test_bench_strategy_keeps_the_worker_count_when_simulated(name):
    code, _ = strategy_code(name, 8, 6)
    assert code.workers_for(1) == 8
    assert code.wait_for_k(1) == (8 if name == "uncoded-all" else 6)
