"""Encoded matrix factorization: closed-form optimum and ALS on encoded data (simulated)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from hpcml.coded.config import CodeConfig
from hpcml.coded.mf import mf_exact, mf_objective, solve_mf
from hpcml.comm import StragglerConfig, make_delay_model, world


def digits(n=300):
    x = load_digits().data[:n]
    return (x - x.mean()) / x.std()


def test_mf_exact_is_the_minimum():
    r, rank, lam = digits(), 4, 1e-4
    z, f_star = mf_exact(r, rank, lam)
    left, sv, right = np.linalg.svd(z, full_matrices=False)
    u, v = left[:, :rank] * np.sqrt(sv[:rank]), right[:rank].T * np.sqrt(sv[:rank])
    assert mf_objective(r, u, v, lam) == pytest.approx(f_star, rel=1e-10)
    rng = np.random.default_rng(0)
    for _ in range(5):
        du, dv = rng.standard_normal(u.shape) * 1e-2, rng.standard_normal(v.shape) * 1e-2
        assert mf_objective(r, u + du, v + dv, lam) > f_star


def test_encoded_als_beats_ignoring_stragglers(tmp_path):
    comm = world()
    comm.set_delays(make_delay_model(StragglerConfig(kind="exponential", mean=0.01, seed=2)))
    r = digits()
    runs = {}
    for name, code in (("all", CodeConfig(encoder="uncoded", beta=1.0, wait_for=4)),
                       ("etf", CodeConfig(encoder="etf", wait_for=3)),
                       ("uncoded-k", CodeConfig(encoder="uncoded", beta=1.0, wait_for=3))):
        runs[name] = solve_mf(comm, r, code, 4, 1e-4, outer=30, inner=10,
                              shard_dir=tmp_path / name, seed=0)
    assert runs["all"]["suboptimality"][-1] < 5e-3
    assert runs["etf"]["discarded"] > 0
    assert runs["etf"]["relative_error"] < 0.85 * runs["uncoded-k"]["relative_error"]
    assert runs["etf"]["suboptimality"][-1] < runs["uncoded-k"]["suboptimality"][-1]
