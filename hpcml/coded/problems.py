"""The problems of Karakus et al.'s experiments (JMLR 2019): ridge regression, LASSO and
l2-regularized logistic regression, on scikit-learn's bundled data sets, seeded synthetic data
or an HDF5 file, with their exact solutions computed on the full, unencoded data (the reference
for relative error and suboptimality).

Objectives (n samples, all scaled by 1/n):
  ridge     f(w) = 1/(2n) ||Xw - y||^2 + lam/2 ||w||^2          (closed form)
  lasso     f(w) = 1/(2n) ||Xw - y||^2 + l1 ||w||_1             (scikit-learn Lasso, same scaling)
  logistic  f(w) = 1/n sum log(1 + exp(-y_i x_i.w)) + lam/2 ||w||^2, y in {-1, +1} (scipy L-BFGS)
  mf        collaborative filtering on observed ratings (see :mod:`hpcml.coded.cf`)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.optimize
from scipy.special import expit

from hpcml.errors import UsageError

PROBLEMS = ("ridge", "lasso", "logistic", "mf")
DATASETS = ("diabetes", "breast_cancer", "digits", "synthetic", "hdf5")


@dataclasses.dataclass
class Problem:
    kind: str
    x: np.ndarray
    y: np.ndarray
    lam: float = 0.0
    l1: float = 0.0

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def loss(self, z: np.ndarray) -> float:
        """phi(z) for predictions z = Xw (the data term)."""
        if self.kind == "logistic":
            return float(np.mean(np.logaddexp(0.0, -self.y * z)))
        return float(0.5 * np.mean((z - self.y) ** 2))

    def loss_grad(self, z: np.ndarray) -> np.ndarray:
        """d phi / dz."""
        if self.kind == "logistic":
            return -self.y * expit(-self.y * z) / self.n
        return (z - self.y) / self.n

    def objective(self, w: np.ndarray) -> float:
        reg = self.l1 * np.abs(w).sum() if self.kind == "lasso" else 0.5 * self.lam * w @ w
        return self.loss(self.x @ w) + float(reg)

    def curvature(self) -> float:
        """phi'' bound per unit of ||X||^2: 1/n (squared loss) or 1/(4n) (logistic)."""
        return 1.0 / (4 * self.n) if self.kind == "logistic" else 1.0 / self.n

    def exact(self) -> np.ndarray:
        """The minimizer on the full data."""
        x, y, n = self.x, self.y, self.n
        if self.kind == "ridge":
            return np.linalg.solve(x.T @ x / n + self.lam * np.eye(x.shape[1]), x.T @ y / n)
        if self.kind == "lasso":
            from sklearn.linear_model import Lasso

            model = Lasso(alpha=self.l1, fit_intercept=False, tol=1e-12, max_iter=200000)
            return model.fit(x, y).coef_.astype(np.float64)
        res = scipy.optimize.minimize(
            lambda w: self.objective(w),
            np.zeros(x.shape[1]),
            jac=lambda w: x.T @ self.loss_grad(x @ w) + self.lam * w,
            method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
        return res.x


def load_data(source: str, *, kind: str, n: int = 2048, p: int = 64, noise: float = 0.5,
              spread: float = 0.2, seed: int = 0, path: str = "", x_key: str = "X",
              y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) with standardized columns; labels in {-1, +1} for logistic regression.
    Synthetic: correlated Gaussian features whose covariance has singular values from 1 down
    to ``spread`` in a random basis (condition number about spread^-2), a half-sparse true w
    and Gaussian noise."""
    if source == "hdf5":
        from hpcml.coded.shards import open_input

        fh, xd, yd = open_input(path, x_key, y_key)
        with fh:
            x, y = np.asarray(xd[...], dtype=np.float64), np.asarray(yd[...], dtype=np.float64)
    elif source == "synthetic":
        rng = np.random.default_rng([seed, 11])
        rotation = np.linalg.qr(rng.standard_normal((p, p)))[0]
        x = rng.standard_normal((n, p)) * np.linspace(1.0, spread, p) @ rotation
        w = rng.standard_normal(p) * (rng.random(p) < 0.5)
        z = x @ w + noise * rng.standard_normal(n)
        y = np.sign(z) if kind == "logistic" else z
    else:
        from sklearn import datasets

        loader = {"diabetes": datasets.load_diabetes, "breast_cancer":
                  datasets.load_breast_cancer, "digits": datasets.load_digits}[source]
        x, y = loader(return_X_y=True)
        x, y = x.astype(np.float64), y.astype(np.float64)
        if source == "digits":
            y = (y >= 5).astype(np.float64)
    x = x[:, x.std(axis=0) > 0]
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    if kind == "logistic":
        labels = np.unique(y)
        if len(labels) != 2:
            raise UsageError(f"problem.kind: logistic needs two classes, {source} has "
                             f"{len(labels)} (use breast_cancer, digits or synthetic)")
        y = np.where(y == labels[1], 1.0, -1.0)
    else:
        y = (y - y.mean()) / y.std()
    return x, y
