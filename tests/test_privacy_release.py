"""MI-DP calibration and utility of the linear-regression releases."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hpcml.errors import UsageError
from hpcml.privacy import midp, noise, release
from hpcml.testing import hpcml_cli


@pytest.mark.parametrize("k", [1, 5, 11])
@pytest.mark.parametrize("eps", [0.01, 0.5, 4.0])
def test_additive_closed_form_and_inverse(k, eps):
    sigma = midp.additive_sigma(eps, k)
    assert midp.additive_epsilon(sigma, k) == pytest.approx(eps, rel=1e-12)
    assert sigma ** 2 == pytest.approx(1 / (k * (math.exp(2 * eps / k) - 1)), rel=1e-12)
    assert midp.additive_epsilon(0.7, k, power=2.0) == pytest.approx(
        k / 2 * math.log(1 + 2.0 / (k * 0.49)), rel=1e-14)


def test_projection_bound_below_additive_and_tends_to_it():
    k, sigma = 11, 0.5
    add = midp.additive_epsilon(sigma, k)
    small = midp.projection_epsilon(sigma, k, 4)
    big = midp.projection_epsilon(sigma, k, 100_000)
    assert small < midp.projection_epsilon(sigma, k, 64) < big < add
    assert big == pytest.approx(add, rel=1e-4)


def test_projection_epsilon_matches_monte_carlo():
    k, m, sigma = 11, 8, 0.4
    g = np.random.default_rng(0).chisquare(m, 400_000) / m
    terms = k / 2 * np.log1p(g / (k * sigma ** 2))
    est = midp.projection_epsilon(sigma, k, m)
    assert abs(terms.mean() - est) < 5 * terms.std() / math.sqrt(terms.size)


@pytest.mark.parametrize("m", [8, 64])
def test_projection_calibration_inverts(m):
    for eps in (0.05, 1.0, 5.0):
        sigma = midp.projection_sigma(eps, 11, m)
        assert midp.projection_epsilon(sigma, 11, m) == pytest.approx(eps, rel=1e-9)
        assert sigma <= midp.additive_sigma(eps, 11)


def test_bad_budget():
    for eps in (0.0, -1.0):
        with pytest.raises(UsageError, match="epsilons"):
            midp.additive_sigma(eps, 3)
        with pytest.raises(UsageError, match="epsilons"):
            midp.projection_sigma(eps, 3, 4)


def data(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / math.sqrt(d)
    y = x @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)
    return release.records(x, y)


def test_records_in_unit_ball_and_exact_fit_without_noise():
    d = data()
    assert np.linalg.norm(d, axis=1).max() <= 1 + 1e-12
    w_star = release.least_squares(d)
    assert release.relative_objective_error(d, w_star) == pytest.approx(0.0, abs=1e-12)
    clean = release.release_additive(d, 0.0, np.random.default_rng(0))
    assert release.relative_objective_error(d, release.least_squares(clean)) == pytest.approx(
        0.0, abs=1e-12)
    sketch = release.release_projection(d, 100, 0.0, np.random.default_rng(0))
    assert sketch.shape == (100, d.shape[1])
    assert 0 < release.relative_objective_error(d, release.least_squares(sketch)) < 0.5


def test_a_norm_100_record_is_released_as_a_norm_1_record():
    """At a sigma calibrated for 1 nat, a raw record of norm 100 would leak about 42 nats (the
    channel's capacity at power 100^2, k = 11 as in the diabetes data); the release clips it
    onto the bound, so it is exactly the release of the same record scaled to norm 1."""
    d = data(d=10)
    k = d.shape[1]
    sigma = midp.additive_sigma(1.0, k)
    assert midp.additive_epsilon(sigma, k, power=100.0 ** 2) > 40
    u = np.arange(1.0, k + 1) / np.linalg.norm(np.arange(1.0, k + 1))
    raw, bounded = d.copy(), d.copy()
    raw[5], bounded[5] = 100.0 * u, u
    for publish in (lambda x, rng: release.release_additive(x, sigma, rng),
                    lambda x, rng: release.release_projection(x, 64, sigma, rng)):
        out = publish(raw, np.random.default_rng(7))
        np.testing.assert_allclose(out, publish(bounded, np.random.default_rng(7)),
                                   rtol=0, atol=1e-14)
    noise_only = release.release_additive(0 * d, sigma, np.random.default_rng(7))
    signal = release.release_additive(raw, sigma, np.random.default_rng(7)) - noise_only
    assert np.linalg.norm(signal[5]) == pytest.approx(1.0, rel=1e-14)  # not 100
    with pytest.raises(UsageError, match="records: .*non-finite"):
        release.release_additive(np.array([[np.inf, 0.0]]), sigma)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 6)),
              elements=st.floats(-1e6, 1e6)),
       st.integers(0, 11), st.integers(1, 8), st.integers(0, 2 ** 32 - 1))
def test_no_release_depends_on_a_record_beyond_the_bound(records, row, m, seed):
    """Replacing any one record by any other moves a release by at most 2 (the replace-one
    sensitivity of records of norm <= 1): additive by exactly the clipped difference, projection
    by at most 2 ||a_i||, with A read back by releasing the identity under the same generator."""
    n, k = records.shape
    row %= n
    other = records.copy()
    other[row] = -3.0 * records[row] + 1.0  # any other record, often far outside the ball
    ball = records / np.maximum(np.linalg.norm(records, axis=1, keepdims=True), 1.0)
    rng = lambda: np.random.default_rng(seed)  # noqa: E731
    # additive, no noise: exactly the records clipped onto the unit ball
    np.testing.assert_allclose(release.release_additive(records, 0.0, rng()), ball, rtol=1e-13)
    assert np.linalg.norm(release.release_additive(records, 0.0, rng()), axis=1).max() <= 1 + 1e-12
    moved = release.release_additive(records, 0.5, rng()) - release.release_additive(
        other, 0.5, rng())
    assert np.linalg.norm(moved) <= 2 + 1e-12 and not np.delete(moved, row, axis=0).any()
    a = release.release_projection(np.eye(n), m, 0.0, rng())  # rows of norm 1: unclipped
    np.testing.assert_allclose(release.release_projection(records, m, 0.0, rng()), a @ ball,
                               rtol=1e-10, atol=1e-12)
    moved = release.release_projection(records, m, 0.5, rng()) - release.release_projection(
        other, m, 0.5, rng())
    assert np.linalg.norm(moved) <= 2 * np.linalg.norm(a[:, row]) * (1 + 1e-12) + 1e-12


def test_secret_noise_is_fresh_and_ignores_the_seed():
    seeded = np.random.default_rng([0, 1]).standard_normal(8)
    first, second = (noise.noise_rng("secret", 0, 1).standard_normal(8) for _ in range(2))
    assert not np.array_equal(first, second) and not np.array_equal(first, seeded)
    np.testing.assert_array_equal(noise.noise_rng("reproducible", 0, 1).standard_normal(8),
                                  seeded)
    with pytest.raises(ValueError, match="noise mode"):
        noise.noise_rng("seeded", 0)
    d = data()
    assert not np.array_equal(release.release_additive(d, 0.1), release.release_additive(d, 0.1))
    assert noise.privacy_status([])[0] == {"private": True, "not_private_because": []}
    fields, line = noise.privacy_status(["why"])
    assert fields["private"] is False and line.endswith("NOT PRIVATE (\"private\": false): why")


def test_utility_degrades_with_noise():
    d = data()

    def mean_error(scheme, sigma):
        errs = []
        for t in range(30):
            rng = np.random.default_rng(t)
            out = (release.release_additive(d, sigma, rng) if scheme == "add"
                   else release.release_projection(d, 60, sigma, rng))
            errs.append(release.relative_objective_error(d, release.least_squares(out)))
        return np.mean(errs)

    for scheme in ("add", "proj"):
        errors = [mean_error(scheme, s) for s in (0.01, 0.1, 1.0)]
        assert errors[0] < errors[1] < errors[2], (scheme, errors)


def test_bench_privacy_same_at_one_and_two_ranks(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    results = []
    for ranks in (1, 2):
        out = tmp_path / str(ranks)
        res = hpcml_cli(ranks, "bench", "privacy", "jobs/bench-privacy.toml",
                        "--set", f"runs_dir={out}", "--set", "trials=3",
                        "--set", "epsilons=[1.0]", "--set", "projections=[64]", cwd=root)
        assert res.returncode == 0, res.stderr
        (run,) = out.iterdir()
        assert (run / "privacy.png").stat().st_size > 0 and (run / "table.md").exists()
        summary = json.loads((run / "summary.json").read_text())
        results.append(summary["points"])
    assert summary["private"] is False and summary["noise"] == "reproducible"
    for a, b in zip(*results, strict=True):
        assert a["epsilon_check"] == pytest.approx(1.0, rel=1e-9)
        assert a["error"] == pytest.approx(b["error"], rel=1e-12)
    bad = hpcml_cli(1, "bench", "privacy", "--set", f"runs_dir={tmp_path}/bad",
                    "--set", "epsilons=[0.0]", cwd=root)
    assert bad.returncode == 2 and "epsilons" in bad.stderr
    assert not (tmp_path / "bad").exists()
