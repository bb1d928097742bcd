"""The two release mechanisms and their utility (arXiv 1902.04688, schemes (a) and (b)).

A data owner holds ``X`` (n x d) and ``y`` (n,), records as rows of ``D = [X, y]``, and releases
either ``D + Z`` (additive) or ``A D + Z`` (projection to m rows, A secret, iid N(0, 1/m)). The
MI-DP calibration (:mod:`hpcml.privacy.midp`) assumes every record has norm at most 1, and the
release functions enforce it: they clip every row of norm above 1 onto the unit sphere
(:func:`clip_records`) before adding noise, so no record enters a release above the bound
(whatever the caller passes; up to a relative rounding of 1e-15). The analyst fits least squares
on the released columns. Utility is the relative objective error of that fit on the true data,

    (f(w_hat) - f(w*)) / f(w*),   f(w) = ||X w - y||^2,   w* = argmin f,

0 for a perfect fit. All functions are pure except for the noise, which comes from the generator
passed in or, by default, from a secret generator seeded by OS entropy
(:func:`hpcml.privacy.noise.secret_rng`).
"""

from __future__ import annotations

import numpy as np

from hpcml.errors import UsageError
from hpcml.privacy.noise import secret_rng

BOUND = 1.0  # the record norm bound the MI-DP calibration assumes (power P = BOUND^2)


def clip_records(data: np.ndarray) -> np.ndarray:
    """``data`` (n x k) with every row of norm above :data:`BOUND` scaled onto the sphere of
    that radius (direction kept; rows inside the ball unchanged). UsageError on non-finite
    values, whose norm cannot be bounded."""
    if not np.isfinite(data).all():
        raise UsageError("records: the data hold non-finite values, so no norm bound holds "
                         "(remove or impute them before the release)")
    norms = np.linalg.norm(data, axis=1, keepdims=True)
    return data * (BOUND / np.maximum(norms, BOUND))


def records(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[X, y]`` with every row clipped into the unit ball (:func:`clip_records`)."""
    return clip_records(np.column_stack([x, y]))


def release_additive(data: np.ndarray, sigma: float,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """``clip_records(data) + Z``, ``Z`` iid N(0, sigma^2), same shape as ``data``."""
    rng = secret_rng() if rng is None else rng
    return clip_records(data) + rng.normal(0.0, sigma, data.shape)


def release_projection(data: np.ndarray, m: int, sigma: float,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """``A clip_records(data) + Z`` with ``A`` (m x n) iid N(0, 1/m) and ``Z`` (m x k) iid
    N(0, sigma^2); both secret (drawn from ``rng``, never returned)."""
    rng = secret_rng() if rng is None else rng
    a = rng.normal(0.0, 1.0 / np.sqrt(m), (m, data.shape[0]))
    return a @ clip_records(data) + rng.normal(0.0, sigma, (m, data.shape[1]))


def least_squares(data: np.ndarray) -> np.ndarray:
    """argmin_w ||D[:, :-1] w - D[:, -1]||^2 (minimum-norm solution)."""
    return np.linalg.lstsq(data[:, :-1], data[:, -1], rcond=None)[0]


def relative_objective_error(data: np.ndarray, w_hat: np.ndarray) -> float:
    """``(f(w_hat) - f(w*)) / f(w*)`` on the true records ``data``."""
    x, y = data[:, :-1], data[:, -1]
    best = float(np.sum((x @ least_squares(data) - y) ** 2))
    return (float(np.sum((x @ w_hat - y) ** 2)) - best) / best
