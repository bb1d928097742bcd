"""The two release mechanisms and their utility (arXiv 1902.04688, schemes (a) and (b)).

A data owner holds ``X`` (n x d) and ``y`` (n,), records clipped into the unit ball as rows of
``D = [X, y]``, and releases either ``D + Z`` (additive) or ``A D + Z`` (projection to m rows,
A secret, iid N(0, 1/m)). The analyst fits least squares on the released columns. Utility is the
relative objective error of that fit on the true data,

    (f(w_hat) - f(w*)) / f(w*),   f(w) = ||X w - y||^2,   w* = argmin f,

0 for a perfect fit. All functions are pure; randomness comes from the generator passed in.
"""

from __future__ import annotations

import numpy as np


def records(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[X, y]`` with every row of norm above 1 scaled onto the unit sphere (power P = 1)."""
    d = np.column_stack([x, y])
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1.0)


def release_additive(data: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return data + rng.normal(0.0, sigma, data.shape)


def release_projection(data: np.ndarray, m: int, sigma: float,
                       rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(0.0, 1.0 / np.sqrt(m), (m, data.shape[0]))
    return a @ data + rng.normal(0.0, sigma, (m, data.shape[1]))


def least_squares(data: np.ndarray) -> np.ndarray:
    """argmin_w ||D[:, :-1] w - D[:, -1]||^2 (minimum-norm solution)."""
    return np.linalg.lstsq(data[:, :-1], data[:, -1], rcond=None)[0]


def relative_objective_error(data: np.ndarray, w_hat: np.ndarray) -> float:
    """``(f(w_hat) - f(w*)) / f(w*)`` on the true records ``data``."""
    x, y = data[:, :-1], data[:, -1]
    best = float(np.sum((x @ least_squares(data) - y) ** 2))
    return (float(np.sum((x @ w_hat - y) ** 2)) - best) / best
