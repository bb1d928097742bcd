"""``hpcml bench privacy``: privacy–utility curves of the two linear-regression releases.

For each MI-DP budget (nats) the additive scheme and the projection scheme (for each projected
row count m) are calibrated to exactly that budget (:mod:`hpcml.privacy.midp`), released
``trials`` times on the diabetes regression set, and scored by the relative objective error of
least squares (:mod:`hpcml.privacy.release`). The trials are split across ranks
(``chunk_bounds``) and summed with one ``Allreduce``. The noise is secret (OS entropy) unless
``noise = "reproducible"``, where trial t of point j uses the generator ``[seed, t, j]`` whatever
the rank count, so the table is the same at any rank count up to float summation order.

The benchmark is an evaluation: it scores every release against the true records and publishes
no release, so its summary says ``"private": false``, with the reasons.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hpcml.bench.report import markdown_table, pyplot, save_figure
from hpcml.comm import chunk_bounds
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.privacy import midp
from hpcml.privacy.noise import NOISE_MODES, noise_rng, privacy_status, reproducible_reason
from hpcml.privacy.release import (
    least_squares,
    records,
    relative_objective_error,
    release_additive,
    release_projection,
)

# the most projected rows m: each release draws an m x n Gaussian matrix (n = 442 diabetes
# records), 231 MiB of float64 at this bound
MAX_PROJECTION = 2**16


@dataclasses.dataclass
class PrivacyBenchConfig(JobConfig):
    epsilons: list[float] = option([0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                                   help="MI-DP budgets in nats (> 0)")
    projections: list[int] = option([32, 64, 128], min=1,
                                    help="projected row counts m of the projection scheme")
    trials: int = option(20, min=1, help="independent releases per point")
    noise: str = option("secret", choices=NOISE_MODES,
                        help="secret: noise from OS entropy; reproducible: from the seed, so "
                             "the table is the same at any rank count")

    def check(self, size: int) -> None:
        bad = [e for e in self.epsilons if not e > 0]
        if bad or not self.epsilons:
            raise ConfigError("epsilons", f"every budget must be > 0, got {self.epsilons}",
                              "e.g. [0.1, 1.0, 10.0]")
        big = [m for m in self.projections if m > MAX_PROJECTION]
        if big:
            raise ConfigError("projections", f"m = {big[0]} rows: each release would draw an "
                              f"m x 442 Gaussian matrix ({big[0] * 442 * 8 / 2**30:.3g} GiB)",
                              f"use m <= {MAX_PROJECTION}")


def load_records() -> np.ndarray:
    """Diabetes features (standardized) and target (standardized), rows in the unit ball."""
    from sklearn.datasets import load_diabetes

    from hpcml.consensus.tasks import unit_rows

    data = load_diabetes()
    return records(unit_rows(data.data), (data.target - data.target.mean()) / data.target.std())


def schemes(cfg: PrivacyBenchConfig, k: int) -> list[dict[str, Any]]:
    """One calibrated point per (scheme, epsilon): its sigma and the epsilon it recomputes to."""
    out = []
    for eps in cfg.epsilons:
        sigma = midp.additive_sigma(eps, k)
        out.append({"scheme": "additive", "m": None, "epsilon": eps, "sigma": sigma,
                    "epsilon_check": midp.additive_epsilon(sigma, k)})
        for m in cfg.projections:
            sigma = midp.projection_sigma(eps, k, m)
            out.append({"scheme": "projection", "m": m, "epsilon": eps, "sigma": sigma,
                        "epsilon_check": midp.projection_epsilon(sigma, k, m)})
    return out


def utility(data: np.ndarray, point: dict[str, Any], rng: np.random.Generator) -> float:
    if point["scheme"] == "additive":
        released = release_additive(data, point["sigma"], rng)
    else:
        released = release_projection(data, point["m"], point["sigma"], rng)
    return relative_objective_error(data, least_squares(released))


def run(cfg: PrivacyBenchConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    data = load_records()
    points = schemes(cfg, data.shape[1])
    lo, hi = chunk_bounds(cfg.trials, comm.size, comm.rank)
    sums = np.zeros((len(points), 2))
    for t in range(lo, hi):
        for j, point in enumerate(points):
            u = utility(data, point, noise_rng(cfg.noise, cfg.seed, t, j))
            sums[j] += (u, u * u)
    comm.Allreduce(sums)
    for point, (s, s2) in zip(points, sums, strict=True):
        point["error"] = s / cfg.trials
        var = max(s2 / cfg.trials - point["error"] ** 2, 0.0)
        point["stderr"] = float(np.sqrt(var / cfg.trials))
        point["label"] = "additive" if point["m"] is None else f"projection m={point['m']}"
    status, line = privacy_status(
        ["benchmark: every release is scored against the true records (an evaluation)",
         *reproducible_reason(cfg.noise, cfg.seed)])
    if ctx.is_root:
        table = markdown_table(points, [
            ("label", "scheme", ""), ("epsilon", "MI-DP epsilon (nats)", "g"),
            ("epsilon_check", "recomputed", ".6g"), ("sigma", "noise std", ".4g"),
            ("error", "rel. objective error", ".4g"), ("stderr", "± s.e.", ".2g")])
        ctx.run_dir.write_text("table.md", table + "\n")
        print(table)
        print(f"\ndiabetes: n = {data.shape[0]} records, d = {data.shape[1] - 1} features, "
              f"{cfg.trials} releases per point over {comm.size} ranks\n{line}")
        _plot(points, ctx)
    return {"points": points, **status, "noise": cfg.noise}


def _plot(points: list[dict[str, Any]], ctx: RunContext) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label in dict.fromkeys(p["label"] for p in points):
        sel = [p for p in points if p["label"] == label]
        ax.errorbar([p["epsilon"] for p in sel], [p["error"] for p in sel],
                    yerr=[p["stderr"] for p in sel], marker="o", capsize=2, label=label)
    ax.set(xscale="log", yscale="log", xlabel="MI-DP epsilon (nats per record)",
           ylabel="relative objective error of least squares",
           title="linear-regression release: privacy vs utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, ctx.run_dir.path / "privacy.png")


JOB = JobKind(config=PrivacyBenchConfig, run=run,
              description="private linear-regression release: MI-DP vs least-squares error")
