"""Collaborative filtering with missing entries on encoded data: the ratings generator, the
per-owner codes, the worker gradient, exact ALS, and encoded runs at 1, 2 and 5 ranks."""

import numpy as np
import pytest
import scipy.sparse as sp

from hpcml.coded import cf
from hpcml.coded.config import CodeConfig
from hpcml.coded.mf import initial_factors, solve_cf
from hpcml.coded.ratings import MIN_RATINGS, digits_ratings, split, synthetic_ratings
from hpcml.comm import StragglerConfig, make_delay_model
from hpcml.testing import mpi_test


def small(seed=0, n=120, d=40, density=0.12):
    train, test = split(synthetic_ratings(n, d, 3, density, 0.5, seed), 0.1, seed)
    mean = train.values.mean()
    train.values, test.values = train.values - mean, test.values - mean
    return train, test


def test_generator_is_seeded_with_power_law_counts_and_min_ratings():
    a, b, c = (synthetic_ratings(400, 120, 4, 0.05, 0.5, seed) for seed in (3, 3, 4))
    for key in ("users", "items", "values"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert len(a) != len(c) or np.any(a.values != c.values)
    assert 0.9 * 0.05 < len(a) / (400 * 120) < 1.25 * 0.05
    per_user, per_item = a.counts()
    assert per_user.min() >= MIN_RATINGS and per_item.min() >= MIN_RATINGS
    assert per_item.max() > 4 * np.median(per_item)
    assert per_user.max() > 3 * np.median(per_user)
    assert set(np.unique(a.values)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(set(zip(a.users.tolist(), a.items.tolist(), strict=True))) == len(a)


def test_split_holds_out_a_fraction_and_keeps_every_user_and_item():
    full = synthetic_ratings(200, 60, 3, 0.08, 0.5, 1)
    train, test = split(full, 0.2, 5)
    assert len(train) + len(test) == len(full)
    assert len(test) == round(0.2 * len(full))
    pairs = set(zip(train.users.tolist(), train.items.tolist(), strict=True))
    assert not pairs & set(zip(test.users.tolist(), test.items.tolist(), strict=True))
    assert train.counts()[0].min() >= 1 and train.counts()[1].min() >= 1
    again = split(full, 0.2, 5)[1]
    np.testing.assert_array_equal(test.values, again.values)


def test_digits_entries_observed_at_the_given_fraction():
    r = digits_ratings(0.3, 0)
    assert (r.n, r.d) == (1797, 64)
    assert 0.28 < len(r) / (1797 * 64) < 0.32


@pytest.mark.parametrize("encoder,beta", [("etf", 2.0), ("uncoded", 1.0), ("replication", 2.0),
                                          ("hadamard", 2.0)])
def test_tight_frames_encode_every_owner_exactly(encoder, beta):
    """S = blockdiag(S^(i)) over owners and pieces of <= chunk observations: for a tight
    frame sum_l C_l.T C_l = beta I, so no owner's data mix with another's."""
    train, _ = small()
    for side in cf.sides(train):
        cs = cf.encode_side(side, encoder, 4, beta, 0, chunk=9)
        gram = sum(c.T @ c for c in cs)
        np.testing.assert_allclose(gram.toarray(), beta * np.eye(len(train)), atol=1e-12)


def test_non_tight_codes_never_mix_owners_or_pieces():
    train, _ = small()
    side = cf.sides(train)[1]
    gram = sum(c.T @ c for c in cf.encode_side(side, "hadamard", 4, 2.0, 0, chunk=9)).tocoo()
    assert np.all(side.owner[gram.row] == side.owner[gram.col])
    start = np.flatnonzero(np.diff(side.owner, prepend=-1))[side.owner]
    piece = (np.arange(len(side.owner)) - start) // 9
    assert np.all(piece[gram.row] == piece[gram.col])


def encoded_loss(data, w, f):
    p = np.einsum("or,or->o", w[data.owner], f[data.other])
    e = data.c @ p - data.b
    return 0.5 * e @ e


@pytest.mark.parametrize("encoder", ["etf", "hadamard", "gaussian"])
def test_worker_gradient_is_the_gradient_of_its_encoded_loss(encoder):
    train, _ = small(n=30, d=15, density=0.3)
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal((30, 3)), rng.standard_normal((15, 3))
    for side, w, f in zip(cf.sides(train), (u, v), (v, u), strict=True):
        c = cf.encode_side(side, encoder, 3, 2.0, 0, chunk=7)[1]
        data = cf.WorkerSide.from_encoded(c, side)
        grad, loss = cf.side_gradient(data, w, f)
        assert loss == pytest.approx(2 * encoded_loss(data, w, f), rel=1e-12)
        h = 1e-6
        for i, j in [(0, 0), (3, 1), (w.shape[0] - 1, 2), (7, 2)]:
            dw = np.zeros_like(w)
            dw[i, j] = h
            fd = (encoded_loss(data, w + dw, f) - encoded_loss(data, w - dw, f)) / (2 * h)
            assert grad[i, j] == pytest.approx(fd, rel=1e-6, abs=1e-7)


def test_all_workers_of_a_tight_frame_give_the_uncoded_gradient():
    train, _ = small()
    rng = np.random.default_rng(2)
    u, v = rng.standard_normal((train.n, 3)), rng.standard_normal((train.d, 3))
    for side, w, f in zip(cf.sides(train), (u, v), (v, u), strict=True):
        res = np.einsum("or,or->o", w[side.owner], f[side.other]) - side.values
        plain = np.asarray(side.owner_matrix() @ (res[:, None] * f[side.other]))
        total = sum(cf.side_gradient(cf.WorkerSide.from_encoded(c, side), w, f)[0]
                    for c in cf.encode_side(side, "etf", 4, 2.0, 0, chunk=64))
        np.testing.assert_allclose(total / 2.0, plain, rtol=1e-11, atol=1e-11)


def test_step_sizes_of_a_tight_frame_are_the_owner_smoothness():
    train, _ = small()
    side = cf.sides(train)[0]
    f = np.random.default_rng(3).standard_normal((train.d, 3))
    gram = sum(c.T @ c for c in cf.encode_side(side, "etf", 4, 2.0, 0, chunk=64))
    steps = cf.step_sizes(side, f, gram, 2.0, 1e-3, len(train))
    for i in (0, 5, train.n - 1):
        fi = f[side.other[side.owner == i]]
        lipschitz = np.linalg.eigvalsh(fi.T @ fi)[-1] / len(train) + 1e-3
        assert steps[i] == pytest.approx(1 / lipschitz, rel=1e-10)


def test_exact_als_decreases_f_and_stops_at_the_normal_equations():
    train, _ = small()
    lam = 1e-3
    u0, v0 = initial_factors(train.n, train.d, 3, 0)
    u, v, history = cf.als(train, u0, v0, lam)
    assert np.all(np.diff(history) <= 1e-15)
    assert history[-1] < 0.5 * history[0]
    assert history[-1] == pytest.approx(cf.objective(train, u, v, lam), rel=1e-12)
    side_u, _ = cf.sides(train)
    for i in (0, 17, train.n - 1):
        rows = side_u.owner == i
        vi = v[side_u.other[rows]]
        normal = (vi.T @ vi + lam * len(train) * np.eye(3)) @ u[i] - vi.T @ side_u.values[rows]
        assert np.linalg.norm(normal) < 1e-5 * np.linalg.norm(vi.T @ side_u.values[rows])


def plain_trajectory(train, rank, lam, outer, inner, seed):
    """Uncoded alternating gradient descent with per-owner steps 1 / L_i, written directly."""
    u, v = initial_factors(train.n, train.d, rank, seed)
    factors = [u, v]
    for _ in range(outer):
        for which, side in enumerate(cf.sides(train)):
            w, f = factors[which], factors[1 - which]
            fo = f[side.other]
            top = np.linalg.eigvalsh(cf.grams(side, f))[:, -1]
            step = 1.0 / (top / len(train) + lam)
            for _ in range(inner):
                res = np.einsum("or,or->o", w[side.owner], fo) - side.values
                grad = side.owner_matrix() @ (res[:, None] * fo) / len(train) + lam * w
                w = w - step[:, None] * grad
            factors[which] = w
    return factors


def shared_dir(comm, name):
    import tempfile
    from pathlib import Path

    path = tempfile.mkdtemp(prefix=f"cf-{name}-") if comm.rank == 0 else None
    return Path(comm.bcast(path))


@mpi_test(ranks=[1, 2, 4, 5])
def test_k_equals_m_reproduces_uncoded_trajectory(comm):
    """Every worker awaited and no stragglers: ETF-encoded CF follows the uncoded alternating
    gradient trajectory to 1e-10, whatever the number of workers (1, or m = ranks - 1)."""
    train, test = small() if comm.rank == 0 else (None, None)
    runs = {}
    for name, code in (("etf", CodeConfig(encoder="etf", chunk=9)),
                       ("uncoded", CodeConfig(encoder="uncoded", beta=1.0))):
        runs[name] = solve_cf(comm, train, test, code, 3, 1e-3, 3, 4, 1.0,
                              shared_dir(comm, name), 0)
    if comm.rank == 0:
        u, v = plain_trajectory(train, 3, 1e-3, 3, 4, 0)
        for res in runs.values():
            np.testing.assert_allclose(res.u, u, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(res.v, v, rtol=1e-10, atol=1e-10)
            assert res.discarded == 0 and len(res.seconds) == 3 * 2 * 4
        sub = runs["etf"].suboptimality
        assert sub[-1] < 0.25 * sub[0], sub
    else:
        assert runs == {"etf": None, "uncoded": None}


@pytest.mark.parametrize("delay_seed", [1, 2, 3])
def test_codes_beat_ignoring_stragglers(tmp_path, delay_seed):
    """k = 3 of 4 under seeded Pareto delays (simulated workers): the ETF and Hadamard
    encodings end at least 1.6x closer to exact ALS than uncoded wait-for-k, whose erasures
    drop a different quarter of every user's ratings each step (measured margins 2.1-5.6x)."""
    from hpcml.comm import world

    comm = world()
    comm.set_delays(make_delay_model(StragglerConfig(kind="pareto", scale=0.002, shape=1.1,
                                                     max_delay=0.2, seed=delay_seed)))
    train, test = small(n=300, d=80, density=0.1)
    res = {}
    for name, code in (("etf", CodeConfig(encoder="etf", wait_for=3)),
                       ("hadamard", CodeConfig(encoder="hadamard", wait_for=3)),
                       ("uncoded-k", CodeConfig(encoder="uncoded", beta=1.0, wait_for=3))):
        res[name] = solve_cf(comm, train, test, code, 3, 1e-3, 20, 8, 1.0, tmp_path / name, 0)
    base = abs(res["uncoded-k"].suboptimality[-1])
    for name in ("etf", "hadamard"):
        assert res[name].discarded > 0
        assert abs(res[name].suboptimality[-1]) < base / 1.6, name


def test_sparse_shards_round_trip_and_never_leave_partial_files(tmp_path):
    from hpcml.coded.shards import load_sparse_shard, write_sparse_shards
    from hpcml.errors import UsageError

    c = sp.random(6, 9, density=0.4, format="csr", random_state=0)
    arrays = {"data": c.data, "indices": c.indices, "indptr": c.indptr, "b": np.arange(6.0)}
    write_sparse_shards([{"u": arrays}, {"u": arrays, "v": arrays}], tmp_path / "s", {"m": 2})
    back = load_sparse_shard(tmp_path / "s", 1)
    assert set(back) == {"u", "v"}
    for key, value in arrays.items():
        np.testing.assert_array_equal(back["v"][key], value)
    bad = {"u": {"data": np.array([object()], dtype=object)}}
    with pytest.raises(TypeError):
        write_sparse_shards([bad], tmp_path / "t", {})
    assert list((tmp_path / "t").iterdir()) == []
    with pytest.raises(UsageError, match="shard-0.h5 not found"):
        load_sparse_shard(tmp_path / "t", 0)
