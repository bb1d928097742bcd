"""Deterministic error bound of encoded gradient descent under any erasure pattern.

Ridge regression f(w) = 1/(2n) ||Xw - y||^2 + lam/2 ||w||^2 with minimizer w* and residual
r* = X w* - y (so X.T r* / n + lam w* = 0). Encoded GD with the k-subset A_t of the m workers
answering at round t steps along (:mod:`hpcml.coded.algorithms`)::

    g_t = X.T M_t (X w_t - y) / n + lam w_t,   M_t = S_{A_t}.T S_{A_t} / (eta beta),  eta = k / m

With e_t = w_t - w* this is, exactly::

    e_{t+1} = (I - alpha B_t) e_t - alpha d_t,   B_t = X.T M_t X / n + lam I,
                                                 d_t = X.T (M_t - I) r* / n,

so for every sequence of subsets (any straggler behaviour, adversarial included)::

    ||e_t|| <= rho^t ||e_0|| + D (1 - rho^t) / (1 - rho),
    rho = max_A max(|1 - alpha mu_A|, |1 - alpha L_A|),  D = alpha max_A ||d_A||,

mu_A, L_A the extreme eigenvalues of B_A, over all C(m, k) subsets, and f(w_t) - f* <=
lambda_max(H) ||e_t||^2 / 2 (H the Hessian of f). This is the mechanism of Karakus et al.'s GD
theorem (NeurIPS 2017; JMLR 2019): the iterates contract at the rate of the worst subset and
settle in a ball whose radius is proportional to how far each subset's S_A.T S_A is from the
identity *as seen by the data* (through X and r*), which is why a code whose subsets are nearly
tight converges close to w* and the error floor shrinks as n grows for fixed p. Derived here
for the exact iteration hpcml runs; the paper states its bound with constants from the
subset spectrum of S alone.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from hpcml.coded.encoders import Encoder


@dataclasses.dataclass(frozen=True)
class ErasureBound:
    """rho (worst-subset contraction; < 1 means convergence), floor = D / (1 - rho) (the
    limit radius of ||w_t - w*||), and the Hessian's largest eigenvalue."""

    rho: float
    floor: float
    hessian_max: float
    start: float

    def distance(self, t: int) -> float:
        """Bound on ||w_t - w*|| after t rounds from the start distance ``start``."""
        return self.rho**t * self.start + self.floor * (1 - self.rho**t)

    def suboptimality(self, t: int) -> float:
        """Bound on f(w_t) - f* after t rounds."""
        return 0.5 * self.hessian_max * self.distance(t) ** 2


def erasure_bound(x: np.ndarray, y: np.ndarray, lam: float, encoder: Encoder, k: int,
                  alpha: float, w0: np.ndarray | None = None) -> ErasureBound:
    """The bound for data (x, y) encoded by ``encoder`` over its m workers, GD step ``alpha``
    and k of m workers per round, starting at ``w0`` (zeros by default). Enumerates every
    k-subset (C(m, k) of them: meant for the small m of tests and reports). Pure."""
    n, p = x.shape
    w_star = np.linalg.solve(x.T @ x / n + lam * np.eye(p), x.T @ y / n)
    r_star = x @ w_star - y
    sx, sr = encoder.apply(x), encoder.apply(r_star[:, None])[:, 0]
    grams = [sx[b].T @ sx[b] for b in encoder.blocks]
    cross = [sx[b].T @ sr[b] for b in encoder.blocks]
    scale = (k / encoder.m) * encoder.beta
    rho, worst = 0.0, 0.0
    for subset in itertools.combinations(range(encoder.m), k):
        b_a = sum(grams[i] for i in subset) / (scale * n) + lam * np.eye(p)
        eig = np.linalg.eigvalsh(b_a)
        rho = max(rho, abs(1 - alpha * eig[0]), abs(1 - alpha * eig[-1]))
        d_a = (sum(cross[i] for i in subset) / scale - x.T @ r_star) / n
        worst = max(worst, float(np.linalg.norm(d_a)))
    start = float(np.linalg.norm((np.zeros(p) if w0 is None else w0) - w_star))
    floor = alpha * worst / (1 - rho) if rho < 1 else np.inf
    hessian_max = float(np.linalg.eigvalsh(x.T @ x / n + lam * np.eye(p))[-1])
    return ErasureBound(rho=rho, floor=floor, hessian_max=hessian_max, start=start)
