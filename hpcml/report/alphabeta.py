"""The alpha-beta (latency-bandwidth) cost model of Allreduce, fitted to measured timings.

Model (Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in
MPICH", IJHPCA 2005, section 4.4: Rabenseifner's reduce-scatter + allgather Allreduce, the
algorithm MPICH uses for long messages; recursive doubling for short ones has the same latency
term)::

    T(n, P) = 2 ceil(log2 P) * alpha + 2 (P - 1) / P * n * beta        (P >= 2; T(n, 1) = 0)

with ``alpha`` the per-message latency (s) and ``beta`` the inverse bandwidth (s/byte); the
local reduction cost ``(P-1)/P n gamma`` has the same shape as the beta term and is folded into
it. :func:`fit` takes ``(bytes, seconds)`` pairs measured at one ``P >= 2`` and solves the
non-negative least-squares problem in relative error (each equation divided by its measured
time, so 4-byte and 4-MiB messages weigh alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls


def latency_factor(p: int) -> float:
    """Messages on the critical path: 2 ceil(log2 P) (0 at P = 1)."""
    return 2.0 * math.ceil(math.log2(p)) if p > 1 else 0.0


def bandwidth_factor(p: int) -> float:
    """Bytes on the critical path per message byte: 2 (P - 1) / P."""
    return 2.0 * (p - 1) / p


@dataclass(frozen=True)
class AlphaBeta:
    alpha: float  # seconds per message
    beta: float   # seconds per byte
    ranks: int    # P the fit was measured at
    points: int   # measurements used
    rms_rel_error: float
    link: str = ""  # where the timings were measured (hosts, transport); "" when not known

    def allreduce_seconds(self, nbytes: float, p: int) -> float:
        """Predicted Allreduce time of an ``nbytes`` vector on ``p`` ranks."""
        return latency_factor(p) * self.alpha + bandwidth_factor(p) * nbytes * self.beta

    @property
    def bandwidth_GBs(self) -> float:
        return 1e-9 / self.beta if self.beta > 0 else math.inf


def fit(nbytes: Sequence[float], seconds: Sequence[float], p: int) -> AlphaBeta:
    """Fit alpha and beta (both >= 0) to Allreduce times measured on ``p >= 2`` ranks.

    Needs at least two distinct message sizes; raises ``ValueError`` otherwise."""
    if p < 2:
        raise ValueError("an alpha-beta fit needs timings on at least 2 ranks")
    n = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if len(set(n.tolist())) < 2 or np.any(t <= 0):
        raise ValueError("an alpha-beta fit needs positive times at >= 2 message sizes")
    a = np.column_stack([np.full_like(n, latency_factor(p)), bandwidth_factor(p) * n])
    (alpha, beta), _ = nnls(a / t[:, None], np.ones_like(t))
    rel = (a @ np.array([alpha, beta]) - t) / t
    return AlphaBeta(alpha=float(alpha), beta=float(beta), ranks=p, points=len(t),
                     rms_rel_error=float(np.sqrt(np.mean(rel ** 2))))
