"""The expected mean-squared error of noisy consensus for mean estimation, in closed form.

For ``f_i(x) = 1/2 ||x - theta_i||^2`` and an inactive clip (``||x_i - theta_i|| <= C``), the
round of :mod:`hpcml.consensus.algorithm` is linear in the iterates and the noise:

    X^{t+1} = (W - alpha_t I) X^t + alpha_t Theta + W N^t,   N^t iid zero-mean, var s_t^2,

(``X`` is n x d, one row per node). Hence, coordinate by coordinate,
``E X^{t+1} = (W - alpha_t I) E X^t + alpha_t Theta`` and the n x n covariance of any one
coordinate follows ``S^{t+1} = (W - alpha_t I) S^t (W - alpha_t I)^T + s_t^2 W W^T`` with
``S^0 = 0``, where ``s_t^2`` is sigma_t^2 (Gaussian) or 2 b_t^2 (Laplace). The expected MSE is

    E[1/n sum_i ||x_i^t - x*||^2] = 1/n (||E X^t - 1 x*^T||_F^2 + d tr S^t),

the bias term (consensus/optimization error, the part that vanishes without noise) plus the
noise term that the privacy budget buys. This is the curve the benchmark plots as theory; with
clipping active (small C, large noise) the measured MSE departs from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpcml.consensus.accounting import NoisePlan


def noise_variance(plan: NoisePlan) -> np.ndarray:
    """Per-coordinate variance of each round's message noise."""
    factor = {"gaussian": 1.0, "laplace": 2.0, "none": 0.0}[plan.mechanism]
    return factor * plan.scale ** 2


def expected_mse(w: np.ndarray, thetas: np.ndarray, steps: Sequence[float],
                 plan: NoisePlan) -> tuple[np.ndarray, float]:
    """(E[MSE] after each round 0..T of the iterates, E[MSE] of the released ``x^T + n^T``)."""
    n, d = thetas.shape
    opt = thetas.mean(axis=0)
    var = noise_variance(plan)
    mean, cov = np.zeros((n, d)), np.zeros((n, n))
    wwt = w @ w.T
    out = [float((opt ** 2).sum())]
    for t, alpha in enumerate(steps):
        a = w - alpha * np.eye(n)
        mean = a @ mean + alpha * thetas
        cov = a @ cov @ a.T + var[t] * wwt
        out.append(float((((mean - opt) ** 2).sum() + d * np.trace(cov)) / n))
    return np.array(out), out[-1] + d * float(var[len(steps)])
