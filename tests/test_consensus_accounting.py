"""Privacy accounting: closed forms, calibration, and the noise actually added."""

import math

import numpy as np
import pytest
from scipy import stats

from hpcml.consensus import accounting, algorithm, mixing, tasks, topology
from hpcml.errors import UsageError


def test_zcdp_conversion_closed_form_and_inverse():
    rho, delta = 0.5, 1e-5
    assert accounting.zcdp_to_dp(rho, delta) == pytest.approx(
        0.5 + 2 * math.sqrt(0.5 * math.log(1e5)), rel=1e-15)
    for eps in (0.1, 1.0, 10.0):
        for d in (1e-3, 1e-8):
            assert accounting.zcdp_to_dp(accounting.dp_to_zcdp(eps, d), d) == pytest.approx(
                eps, rel=1e-12)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
@pytest.mark.parametrize("eps", [0.5, 4.0])
def test_reported_epsilon_matches_formula(mechanism, eps):
    steps = algorithm.step_sizes(0.4, 0.5, 30)
    plan = accounting.plan_noise(mechanism, eps, 1e-6, steps, clip=1.5, dim=7)
    assert plan.releasing_rounds == 30
    assert plan.scale[0] == 0 and plan.sensitivity[0] == 0
    spent = plan.spent()
    assert spent["epsilon"] == pytest.approx(eps, rel=1e-12)
    sens = 2 * 1.5 * np.asarray(steps)
    if mechanism == "gaussian":
        # every round: sensitivity 2 alpha C, sigma = sensitivity sqrt(R / (2 rho))
        rho = (math.sqrt(math.log(1e6) + eps) - math.sqrt(math.log(1e6))) ** 2
        np.testing.assert_allclose(plan.scale[1:], sens * math.sqrt(30 / (2 * rho)), rtol=1e-12)
        assert spent["rho"] == pytest.approx(sum(s**2 / (2 * b**2) for s, b in
                                                 zip(sens, plan.scale[1:], strict=True)),
                                             rel=1e-12)
        assert spent["epsilon"] == pytest.approx(
            spent["rho"] + 2 * math.sqrt(spent["rho"] * math.log(1e6)), rel=1e-12)
    else:
        np.testing.assert_allclose(plan.scale[1:], sens * math.sqrt(7) * 30 / eps, rtol=1e-12)
    ledger = plan.ledger()
    assert ledger["spent"]["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert len(ledger["noise_scale"]) == 31 and "composition" in ledger


@pytest.mark.parametrize("eps,delta,field", [(0.0, 1e-5, "privacy.epsilon"),
                                             (-1.0, 1e-5, "privacy.epsilon"),
                                             (1.0, 0.0, "privacy.delta"),
                                             (1.0, 1.0, "privacy.delta"),
                                             (1.0, 2.0, "privacy.delta")])
def test_bad_budgets(eps, delta, field):
    with pytest.raises(UsageError, match=field):
        accounting.plan_noise("gaussian", eps, delta, [0.1], 1.0, 3)


def test_laplace_needs_no_delta_and_none_needs_nothing():
    accounting.plan_noise("laplace", 1.0, 0.0, [0.1], 1.0, 3)
    plan = accounting.plan_noise("none", 0.0, 0.0, [0.1], 1.0, 3)
    assert not plan.scale.any() and plan.spent()["epsilon"] == math.inf


@pytest.mark.parametrize("mechanism,var_factor", [("gaussian", 1.0), ("laplace", 2.0)])
def test_added_noise_has_calibrated_variance(mechanism, var_factor):
    """The noise simulate() adds to messages, standardized by its planned scale, has variance 1
    (variance s^2 for Gaussian, 2 b^2 for Laplace): a chi-square-style test at fixed seed."""
    n = 40
    task = tasks.load_task("mean", n)
    w = mixing.mixing_matrix(topology.complete(n), "metropolis")
    steps = algorithm.step_sizes(0.5, 0.5, 40)
    plan = accounting.plan_noise(mechanism, 2.0, 1e-5, steps, 0.5, task.dim)
    traj = algorithm.simulate(task, w, plan, steps, 0.5, seed=3)
    np.testing.assert_array_equal(traj.noise[0], 0.0)
    z = (traj.noise[1:] / plan.scale[1:, None, None]).ravel()
    samples = z.size
    var = float(np.mean(z ** 2)) / var_factor
    kurt = 3.0 if mechanism == "gaussian" else 6.0  # E z^4 / (E z^2)^2
    assert abs(var - 1) < 5 * math.sqrt((kurt - 1) / samples)
    assert abs(float(z.mean())) < 5 * math.sqrt(var_factor / samples)
    family = stats.norm() if mechanism == "gaussian" else stats.laplace()
    assert stats.kstest(z, family.cdf).pvalue > 1e-3
    # the released estimate is the last iterate plus the last round's noise
    np.testing.assert_array_equal(traj.released, traj.states[-1] + traj.noise[-1])
