"""Mutual-information differential privacy (MI-DP) of the two release schemes.

MI-DP (Cuff & Yu 2016, the notion arXiv 1902.04688 adopts): a release ``R`` of the data set
``D`` (n records, rows of ``[X, y]``, each of dimension k = d + 1) is epsilon-MI-DP when
``sup I(D_i; R | D_-i) <= epsilon`` (nats), the supremum over records i and over distributions
of the data. We bound records by a power constraint ``E ||D_i||^2 <= P`` (the release code
clips every record onto the unit ball before it adds noise,
:func:`hpcml.privacy.release.clip_records`, so ``||D_i|| <= 1`` and P = 1 hold for any input).

Additive noise, ``R = D + Z`` with ``Z`` iid N(0, sigma^2): given ``D_-i`` the adversary sees
``D_i + Z_i``, a k-dimensional Gaussian channel, so the supremum is its capacity

    epsilon_add(sigma) = k/2 ln(1 + P / (k sigma^2)),

attained by an isotropic Gaussian record; it inverts in closed form
(:func:`additive_sigma`).

Projection then noise, ``R = A D + Z`` with a secret ``A`` (m x n, iid N(0, 1/m), so
``E A^T A = I``) and ``Z`` (m x k) iid N(0, sigma^2). Revealing A can only help the adversary:
``I(D_i; R | D_-i) <= I(D_i; R, A | D_-i) = I(D_i; R | A, D_-i)`` since A is independent of D.
Given A and ``D_-i`` the adversary sees ``a_i D_i^T + Z`` (``a_i`` column i of A), whose
sufficient statistic ``a_i^T (.) / ||a_i||`` is ``||a_i|| D_i + N(0, sigma^2 I_k)``; hence

    epsilon_proj(sigma, m) = E[k/2 ln(1 + ||a||^2 P / (k sigma^2))],  ||a||^2 ~ chi^2_m / m,

computed by quadrature. By Jensen it is below ``epsilon_add(sigma)`` and tends to it as
m -> infinity. This is the coherent (A-revealed) upper bound; the paper's non-coherent SIMO
analysis of the secret-A case is tighter, so the bound here is conservative.
"""

from __future__ import annotations

import math

from scipy import integrate, optimize, stats

from hpcml.errors import UsageError


def additive_epsilon(sigma: float, k: int, power: float = 1.0) -> float:
    """MI-DP (nats) of ``D + Z``, ``Z`` iid N(0, sigma^2), records of dimension ``k``."""
    return k / 2 * math.log1p(power / (k * sigma ** 2))


def additive_sigma(epsilon: float, k: int, power: float = 1.0) -> float:
    """The noise std whose :func:`additive_epsilon` is exactly ``epsilon``."""
    check_epsilon(epsilon)
    return math.sqrt(power / (k * math.expm1(2 * epsilon / k)))


def projection_epsilon(sigma: float, k: int, m: int, power: float = 1.0) -> float:
    """MI-DP upper bound (nats) of ``A D + Z`` with ``A`` m x n iid N(0, 1/m)."""
    snr = power / (k * sigma ** 2)
    dist = stats.chi2(m, scale=1.0 / m)

    def integrand(g: float) -> float:
        return k / 2 * math.log1p(g * snr) * dist.pdf(g)

    lo, hi = dist.ppf(1e-15), dist.isf(1e-15)
    value, _ = integrate.quad(integrand, lo, hi, limit=200, epsabs=1e-13, epsrel=1e-11)
    return value


def projection_sigma(epsilon: float, k: int, m: int, power: float = 1.0) -> float:
    """The noise std whose :func:`projection_epsilon` is ``epsilon`` (root of a decreasing
    function, bracketed by the additive calibration)."""
    check_epsilon(epsilon)
    hi = additive_sigma(epsilon, k, power)
    lo = hi / 2
    while projection_epsilon(lo, k, m, power) < epsilon:
        lo /= 2
    return optimize.brentq(lambda s: projection_epsilon(s, k, m, power) - epsilon, lo, hi,
                           xtol=1e-14, rtol=1e-12)


def check_epsilon(epsilon: float) -> None:
    if not epsilon > 0:
        raise UsageError(f"epsilons: every MI-DP budget must be > 0, got {epsilon} (e.g. 0.1)")
