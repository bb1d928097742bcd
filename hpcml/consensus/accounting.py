"""Privacy accounting for noisy consensus: calibration and composition over a whole run.

Neighbouring inputs: node i's local data set replaced by any other (node-level DP, shared/
PAPERS.md §4). Node i's round-t message is ``x_i^t + n_i^t`` where
``x_i^t = sum_j W_ij m_j^{t-1} - alpha_{t-1} g_i^{t-1}`` and the mixed term is a function of
already-public messages. The clipped gradient obeys ``||g|| <= C`` for *every* data set and
iterate, so conditioned on the past messages the data moves the mean of the round-t message by
at most ``Delta_t = 2 alpha_{t-1} C`` (L2; ``2 alpha_{t-1} C sqrt(d)`` in L1). The conditional
law is a mixture (over the hidden iterate) of Gaussians whose means are that close, and Rényi
divergence is jointly quasi-convex (van Erven & Harremoës 2014, Thm 13), so the per-round
bounds below hold conditionally and compose adaptively. Round 0 (``x^0 = 0``) has
``Delta_0 = 0``: it leaks nothing and carries no noise.

Gaussian, (epsilon, delta)-DP, through zero-concentrated DP (Bun & Steinke 2016):
- round t with std ``sigma_t`` is ``rho_t = Delta_t^2 / (2 sigma_t^2)``-zCDP (their Prop. 1.6);
- rounds compose additively, ``rho = sum_t rho_t`` (Lemma 1.7);
- rho-zCDP implies ``(rho + 2 sqrt(rho ln(1/delta)), delta)``-DP (Prop. 1.3).
Calibration inverts the conversion in closed form,
``rho = (sqrt(ln(1/delta) + epsilon) - sqrt(ln(1/delta)))^2``, and spreads it evenly over the R
releasing rounds: ``sigma_t = Delta_t sqrt(R / (2 rho))`` (noise shrinks with the step size).

Laplace, pure epsilon-DP: round t with scale ``b_t`` is ``Delta1_t / b_t``-DP, rounds compose
by the basic composition theorem (Dwork & Roth 2014, Thm 3.16), so ``b_t = R Delta1_t / epsilon``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hpcml.errors import UsageError

MECHANISMS = ("gaussian", "laplace", "none")


def zcdp_to_dp(rho: float, delta: float) -> float:
    """epsilon of the (epsilon, delta)-DP implied by rho-zCDP (Bun & Steinke Prop. 1.3)."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def dp_to_zcdp(epsilon: float, delta: float) -> float:
    """The largest rho whose :func:`zcdp_to_dp` is ``epsilon`` (exact inverse)."""
    log_term = math.log(1.0 / delta)
    return (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2


def check_budget(epsilon: float, delta: float, mechanism: str) -> None:
    """UsageError unless epsilon > 0 and, for the Gaussian mechanism, 0 < delta < 1."""
    if mechanism == "none":
        return
    if not epsilon > 0:
        raise UsageError(f"privacy.epsilon: must be > 0, got {epsilon} (use mechanism = "
                         "\"none\" for a run without privacy)")
    if mechanism == "gaussian" and not 0 < delta < 1:
        raise UsageError(f"privacy.delta: must be in (0, 1), got {delta} (typically 1e-5, or "
                         "less than 1 / number of records)")


def sensitivities(steps: Sequence[float], clip: float, dim: int, norm: str) -> np.ndarray:
    """Per-round sensitivity of the released message, rounds 0..len(steps): round 0 is 0, round
    t >= 1 is ``2 alpha_{t-1} C`` (L2) or ``2 alpha_{t-1} C sqrt(dim)`` (L1)."""
    scale = 2.0 * clip * (math.sqrt(dim) if norm == "l1" else 1.0)
    return np.concatenate([[0.0], scale * np.asarray(steps, dtype=float)])


@dataclasses.dataclass(frozen=True)
class NoisePlan:
    """Per-round noise for one run: ``scale[t]`` is the Gaussian std or Laplace scale of round
    t's message noise (rounds 0..T, round T being the released final estimate)."""

    mechanism: str
    epsilon: float
    delta: float
    sensitivity: np.ndarray
    scale: np.ndarray

    @property
    def releasing_rounds(self) -> int:
        return int(np.count_nonzero(self.sensitivity))

    def per_round_cost(self) -> np.ndarray:
        """rho_t (Gaussian, zCDP) or epsilon_t (Laplace) of every round; 0 where no noise is
        needed."""
        s, b = self.sensitivity, self.scale
        ok = s > 0
        out = np.zeros_like(s)
        if self.mechanism == "gaussian":
            out[ok] = s[ok] ** 2 / (2.0 * b[ok] ** 2)
        elif self.mechanism == "laplace":
            out[ok] = s[ok] / b[ok]
        return out

    def spent(self) -> dict[str, float]:
        """The privacy spent by the whole run, recomputed from the per-round noise."""
        cost = float(self.per_round_cost().sum())
        if self.mechanism == "gaussian":
            return {"rho": cost, "epsilon": zcdp_to_dp(cost, self.delta), "delta": self.delta}
        if self.mechanism == "laplace":
            return {"epsilon": cost, "delta": 0.0}
        return {"epsilon": math.inf, "delta": 1.0}

    def ledger(self) -> dict[str, Any]:
        """The JSON-able privacy ledger of the run."""
        theorem = {
            "gaussian": "zCDP: Gaussian rho_t = Delta_t^2/(2 sigma_t^2), additive composition, "
                        "epsilon = rho + 2 sqrt(rho ln(1/delta)) (Bun & Steinke 2016, "
                        "Prop. 1.6, Lemma 1.7, Prop. 1.3)",
            "laplace": "pure DP: Laplace epsilon_t = Delta1_t / b_t, basic composition "
                       "(Dwork & Roth 2014, Thm 3.16)",
            "none": "no noise: no privacy guarantee",
        }[self.mechanism]
        return {"mechanism": self.mechanism, "requested": {"epsilon": self.epsilon,
                                                           "delta": self.delta},
                "spent": self.spent(), "releasing_rounds": self.releasing_rounds,
                "composition": theorem, "sensitivity": self.sensitivity.tolist(),
                "noise_scale": self.scale.tolist(),
                "per_round_cost": self.per_round_cost().tolist()}


def plan_noise(mechanism: str, epsilon: float, delta: float, steps: Sequence[float],
               clip: float, dim: int) -> NoisePlan:
    """Calibrate every round's noise so that the whole run (messages of rounds 1..T-1 and the
    released estimate of round T, ``T = len(steps)``) meets the budget exactly."""
    check_budget(epsilon, delta, mechanism)
    sens = sensitivities(steps, clip, dim, "l1" if mechanism == "laplace" else "l2")
    rounds = int(np.count_nonzero(sens))
    if mechanism == "gaussian":
        rho = dp_to_zcdp(epsilon, delta)
        scale = sens * math.sqrt(rounds / (2.0 * rho))
    elif mechanism == "laplace":
        scale = sens * rounds / epsilon
    else:
        scale = np.zeros_like(sens)
    return NoisePlan(mechanism, epsilon, delta if mechanism == "gaussian" else 0.0, sens, scale)


def sample_noise(rng: np.random.Generator, mechanism: str, scale: float,
                 dim: int) -> np.ndarray:
    """One round's noise vector; zeros when ``scale`` is 0."""
    if scale == 0 or mechanism == "none":
        return np.zeros(dim)
    if mechanism == "gaussian":
        return rng.normal(0.0, scale, dim)
    return rng.laplace(0.0, scale, dim)
