"""The DP consensus round and its single-process simulation, against closed forms."""

import numpy as np
import pytest

from hpcml.consensus import accounting, algorithm, mixing, tasks, theory, topology
from hpcml.privacy.noise import node_rngs


def no_noise(rounds):
    return accounting.plan_noise("none", 0.0, 0.0, [0.0] * rounds, 1.0, 1)


def test_clip_norm():
    g = np.array([3.0, 4.0])
    np.testing.assert_allclose(algorithm.clip_norm(g, 1.0), [0.6, 0.8])
    assert algorithm.clip_norm(g, 5.0) is g


def test_update_is_mixing_minus_clipped_step():
    msgs = np.array([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    out = algorithm.consensus_update(np.zeros(2), msgs, np.array([0.5, 0.25, 0.25]),
                                     np.array([0.0, 10.0]), alpha=0.1, clip=1.0)
    np.testing.assert_allclose(out, [1.5, 1.5 - 0.1])
    with pytest.raises(ValueError):
        algorithm.consensus_update(np.zeros(3), msgs, np.ones(3) / 3, np.zeros(3), 0.1, 1.0)


@pytest.mark.parametrize("graph", ["ring", "torus", "regular", "erdos_renyi"])
def test_zero_noise_zero_step_reaches_exact_average(graph):
    n = 12
    adj = topology.build_graph(graph, n, degree=3, p=0.4, seed=5)
    w = mixing.mixing_matrix(adj, "metropolis")
    x = np.random.default_rng(0).standard_normal((n, 4))
    avg = x.mean(axis=0)
    for _ in range(3000):
        x = np.stack([algorithm.consensus_update(x[i], x[w[i] != 0], w[i][w[i] != 0],
                                                 np.zeros(4), 0.0, 1.0) for i in range(n)])
    np.testing.assert_allclose(x, np.tile(avg, (n, 1)), atol=1e-12)


def test_zero_noise_constant_step_reaches_closed_form_fixed_point():
    # x = W x - a (x - theta)  =>  x* = a ((1 + a) I - W)^-1 Theta
    n, a = 6, 0.3
    task = tasks.load_task("mean", n)
    thetas = np.stack([-task.grad(i, np.zeros(task.dim)) for i in range(n)])
    w = mixing.mixing_matrix(topology.ring(n), "lazy")
    traj = algorithm.simulate(task, w, no_noise(400), [a] * 400, clip=10.0)
    fixed = a * np.linalg.solve((1 + a) * np.eye(n) - w, thetas)
    np.testing.assert_allclose(traj.states[-1], fixed, atol=1e-12)
    # the average of the iterates is exactly the average of the local optima (W doubly stoch.)
    np.testing.assert_allclose(fixed.mean(axis=0), task.optimum, atol=1e-14)


@pytest.mark.parametrize("name", ["mean", "ridge", "logistic"])
def test_zero_noise_decaying_step_converges_to_optimum(name):
    n = 4
    task = tasks.load_task(name, n, lam=0.05)
    w = mixing.mixing_matrix(topology.ring(n), "metropolis")
    steps = algorithm.step_sizes(1.0, 0.5, 3000)
    traj = algorithm.simulate(task, w, no_noise(3000), steps, clip=100.0)
    errors = [algorithm.mse(traj.states[t], task.optimum) for t in (0, 30, 300, 3000)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-5 * errors[0]
    np.testing.assert_allclose(np.linalg.norm(sum(task.grad(i, task.optimum) for i in range(n))),
                               0, atol=1e-12)


def test_zero_noise_ridge_reaches_closed_form_fixed_point():
    # node i: x_i = sum_j W_ij x_j - a (H_i x_i - b_i)  =>  ((I - W) (x) I + a diag(H_i)) X = a B
    n, d, a = 4, 10, 0.4
    task = tasks.load_task("ridge", n, lam=0.1)
    w = mixing.mixing_matrix(topology.ring(n), "metropolis")
    hs = [np.stack([task.grad(i, e) - task.grad(i, np.zeros(d)) for e in np.eye(d)], axis=1)
          for i in range(n)]
    bs = np.concatenate([-task.grad(i, np.zeros(d)) for i in range(n)])
    system = np.kron(np.eye(n) - w, np.eye(d))
    for i in range(n):
        system[i * d:(i + 1) * d, i * d:(i + 1) * d] += a * hs[i]
    fixed = np.linalg.solve(system, a * bs).reshape(n, d)
    traj = algorithm.simulate(task, w, no_noise(2000), [a] * 2000, clip=100.0)
    np.testing.assert_allclose(traj.states[-1], fixed, atol=1e-11)


def test_task_optima_closed_form():
    task = tasks.load_task("ridge", 3, lam=0.1)
    x0 = np.random.default_rng(1).standard_normal(task.dim)
    g = sum(task.grad(i, x0) for i in range(3))
    h = 1e-6
    numeric = [(task.objective(x0 + h * e) - task.objective(x0 - h * e)) / (2 * h)
               for e in np.eye(task.dim)]
    np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)
    for name in ("mean", "ridge", "logistic"):
        t = tasks.load_task(name, 5)
        best = t.objective(t.optimum)
        for v in np.random.default_rng(2).standard_normal((5, t.dim)) * 1e-3:
            assert t.objective(t.optimum + v) > best


def test_theory_matches_monte_carlo_when_clip_is_inactive():
    n, rounds, trials = 4, 15, 400
    task = tasks.load_task("mean", n)
    thetas = np.stack([-task.grad(i, np.zeros(task.dim)) for i in range(n)])
    w = mixing.mixing_matrix(topology.ring(n), "metropolis")
    steps = algorithm.step_sizes(0.5, 0.5, rounds)
    plan = accounting.plan_noise("gaussian", 200.0, 1e-5, steps, 0.5, task.dim)
    curve, released = theory.expected_mse(w, thetas, steps, plan)
    sims = [algorithm.simulate(task, w, plan, steps, 100.0, node_rngs("reproducible", s, n))
            for s in range(trials)]
    measured = np.array([algorithm.mse(s.released, task.optimum) for s in sims])
    assert abs(measured.mean() - released) < 4 * measured.std() / np.sqrt(trials)
    mid = np.array([algorithm.mse(s.states[7], task.optimum) for s in sims])
    assert abs(mid.mean() - curve[7]) < 4 * mid.std() / np.sqrt(trials)
    zero = theory.expected_mse(w, thetas, steps, no_noise(rounds))[0]
    exact = algorithm.simulate(task, w, no_noise(rounds), steps, 100.0)
    np.testing.assert_allclose(zero, [algorithm.mse(s, task.optimum) for s in exact.states],
                               rtol=1e-10)
