"""The local objectives f_i of distributed consensus optimization, on real data split by rank.

Each task holds the data of all ``n`` nodes (node i gets the contiguous block
``chunk_bounds(rows, n, i)`` of the rows, the same on every rank, so no data moves), the local
gradient ``grad(i, x)`` of ``f_i`` and the minimizer ``optimum`` of ``sum_i f_i`` in closed form
(mean, ridge) or by Newton's method to machine precision (logistic).

Data (scikit-learn's bundled sets, nothing is downloaded) are standardized per feature and every
record is scaled into the unit ball, ``||x|| <= 1``: the bounded-data assumption that makes the
gradients Lipschitz-bounded, so that the clipping bound C of the privacy analysis is active
only for iterates far from the data.

- ``mean``: distributed mean estimation (the numerical study of Showkatbakhsh, Karakus &
  Diggavi): ``f_i(x) = 1/2 ||x - theta_i||^2`` with ``theta_i`` the mean of node i's records of
  the diabetes features (d = 10, min-max scaled rather than centered so the mean is not 0); the
  optimum is the average of the ``theta_i``.
- ``ridge``: ``f_i(w) = 1/(2 m_i) ||X_i w - y_i||^2 + lam/2 ||w||^2`` on the diabetes
  regression set (d = 10, y standardized and clipped to [-1, 1]).
- ``logistic``: ``f_i(w) = 1/m_i sum log(1 + exp(-y x^T w)) + lam/2 ||w||^2`` on the
  breast-cancer set (d = 30, y in {-1, +1}).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from hpcml.comm import chunk_bounds
from hpcml.errors import UsageError

TASKS = ("mean", "ridge", "logistic")


def unit_rows(x: np.ndarray, center: bool = True) -> np.ndarray:
    """Standardize columns (``center``) or min-max scale them to [0, 1] (not ``center``), then
    scale each row with norm above 1 onto the unit sphere."""
    if center:
        x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    else:
        span = x.max(axis=0) - x.min(axis=0)
        x = (x - x.min(axis=0)) / np.where(span > 0, span, 1.0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1.0)


@dataclasses.dataclass(frozen=True)
class Task:
    """``grad(i, x)``: gradient of node i's f_i at x; ``objective(x)``: sum_i f_i(x);
    ``optimum``: its minimizer, shape ``(dim,)``."""

    name: str
    nodes: int
    dim: int
    grad: Callable[[int, np.ndarray], np.ndarray]
    objective: Callable[[np.ndarray], float]
    optimum: np.ndarray


def _blocks(x: np.ndarray, y: np.ndarray | None, nodes: int) -> list[tuple[np.ndarray, ...]]:
    if x.shape[0] < nodes:
        raise UsageError(f"task: {x.shape[0]} records cannot be split over {nodes} nodes "
                         "(launch fewer ranks)")
    out = []
    for i in range(nodes):
        lo, hi = chunk_bounds(x.shape[0], nodes, i)
        out.append((x[lo:hi],) if y is None else (x[lo:hi], y[lo:hi]))
    return out


def mean_task(x: np.ndarray, nodes: int) -> Task:
    thetas = np.stack([b[0].mean(axis=0) for b in _blocks(x, None, nodes)])
    return Task("mean", nodes, x.shape[1], grad=lambda i, w: w - thetas[i],
                objective=lambda w: 0.5 * float(((w - thetas) ** 2).sum()),
                optimum=thetas.mean(axis=0))


def ridge_task(x: np.ndarray, y: np.ndarray, nodes: int, lam: float) -> Task:
    blocks = _blocks(x, y, nodes)
    d = x.shape[1]
    grams = [(bx.T @ bx / len(bx), bx.T @ by / len(bx)) for bx, by in blocks]
    hess = sum(g for g, _ in grams) + nodes * lam * np.eye(d)
    opt = np.linalg.solve(hess, sum(b for _, b in grams))

    def objective(w: np.ndarray) -> float:
        return float(sum(0.5 * np.mean((bx @ w - by) ** 2) for bx, by in blocks)
                     + nodes * lam / 2 * w @ w)

    return Task("ridge", nodes, d, grad=lambda i, w: grams[i][0] @ w - grams[i][1] + lam * w,
                objective=objective, optimum=opt)


def _logistic_grad(bx: np.ndarray, by: np.ndarray, w: np.ndarray, lam: float) -> np.ndarray:
    margin = by * (bx @ w)
    return -(bx.T @ (by / (1.0 + np.exp(margin)))) / len(bx) + lam * w


def logistic_task(x: np.ndarray, y: np.ndarray, nodes: int, lam: float) -> Task:
    blocks = _blocks(x, y, nodes)
    d = x.shape[1]

    def objective(w: np.ndarray) -> float:
        return float(sum(np.mean(np.logaddexp(0.0, -by * (bx @ w))) for bx, by in blocks)
                     + nodes * lam / 2 * w @ w)

    def total_grad(w: np.ndarray) -> np.ndarray:
        return sum(_logistic_grad(bx, by, w, lam) for bx, by in blocks)

    w = np.zeros(d)
    for _ in range(100):
        hess = nodes * lam * np.eye(d)
        for bx, by in blocks:
            p = 1.0 / (1.0 + np.exp(-by * (bx @ w)))
            hess = hess + (bx * (p * (1 - p))[:, None]).T @ bx / len(bx)
        step = np.linalg.solve(hess, total_grad(w))
        w = w - step
        if np.linalg.norm(step) < 1e-14:
            break
    return Task("logistic", nodes, d,
                grad=lambda i, v: _logistic_grad(blocks[i][0], blocks[i][1], v, lam),
                objective=objective, optimum=w)


def load_task(name: str, nodes: int, lam: float = 1e-2) -> Task:
    """Task ``name`` on its bundled scikit-learn data set, split over ``nodes`` nodes."""
    from sklearn.datasets import load_breast_cancer, load_diabetes

    if name == "mean":
        return mean_task(unit_rows(load_diabetes().data, center=False), nodes)
    if name == "ridge":
        data = load_diabetes()
        y = (data.target - data.target.mean()) / data.target.std()
        return ridge_task(unit_rows(data.data), np.clip(y, -1.0, 1.0), nodes, lam)
    if name == "logistic":
        data = load_breast_cancer()
        return logistic_task(unit_rows(data.data), 2.0 * data.target - 1.0, nodes, lam)
    raise UsageError(f"task: unknown task {name!r}; choose from {', '.join(TASKS)}")
