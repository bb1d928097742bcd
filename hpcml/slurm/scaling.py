"""Job kind ``scaling``: data-parallel least-squares gradient descent, for scaling series.

Each step every rank computes the gradient of ``0.5/N * ||X w - y||^2`` on its rows
(``g_r = X_r^T (X_r w - y_r)``, a real matrix-vector workload of ``2 * rows * features`` flops
twice), sums the gradients with one ``Allreduce`` of ``features`` float64 values, and takes the
step ``w <- w - lr * g / N``; then one allreduce of the loss (rank 0 appends it to
``metrics.jsonl``) and one of the stop flag (:meth:`~hpcml.jobs.RunContext.stop_requested`),
two small allreduces per step. The summary reports, per step and as the slowest rank's mean,
the gradient's compute time, its Allreduce time, and the wall time of the whole step (all of
the above, checkpoints and ``step_sleep`` excepted), which is what the scaling report compares
its model with. This is synchronous data-parallel SGD with full batches, the
computation/communication pattern whose weak and strong scaling the Sparse Allreduce paper
(PAPERS.md section 1) reports.

* ``mode = "weak"``: every rank owns ``rows`` rows (N = P * rows), so work per rank is fixed;
* ``mode = "strong"``: the ``rows`` rows are split by :func:`hpcml.comm.chunk_bounds`, so the
  total is fixed. Row ``i`` of the data depends only on ``seed`` and ``i``, hence a strong-scaling
  run computes the same iterates on any number of ranks (up to summation order).

Preemption: SIGUSR1/SIGTERM (see :mod:`hpcml.preemption`) make every rank stop at the same
step and save a checkpoint (:mod:`hpcml.checkpoint`: w and the step); the summary names
``stopped_by`` and the run's status is ``preempted``. ``--resume RUN_DIR`` continues from that
step. The run also checkpoints every ``checkpoint_every`` steps, so a hard kill loses at most
that many steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from hpcml.checkpoint import Restored
from hpcml.comm import Communicator, chunk_bounds
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError, UsageError
from hpcml.jobs import JobKind, RunContext
from hpcml.preemption import restart_count

BLOCK = 256  # rows generated per seeded block, so row i never depends on the rank count
SMALL_ALLREDUCES = 2  # per step besides the gradient's: the loss sum and the stop check


@dataclasses.dataclass
class ScalingConfig(JobConfig):
    mode: str = option("weak", choices=("weak", "strong"),
                       help="weak: `rows` per rank; strong: `rows` in total")
    rows: int = option(4096, min=1, help="rows per rank (weak) or in total (strong)")
    features: int = option(256, min=1, help="model size; one Allreduce of this many float64")
    steps: int = option(50, min=1, help="gradient steps")
    lr: float = option(0.5, gt=0, help="step size on the mean-squared-error gradient")
    noise: float = option(0.01, min=0, help="label noise standard deviation")
    checkpoint_every: int = option(0, min=0, help="also checkpoint every this many steps; 0=off")
    step_sleep: float = option(0.0, min=0,
                               help="seconds to sleep per step (lets tests preempt a short run)")

    def check(self, size: int) -> None:
        if self.mode == "strong" and self.rows < size:
            raise ConfigError("rows", f"{self.rows} rows cannot be split over {size} ranks",
                              f"use rows >= {size} or mode = \"weak\"")


def true_weights(features: int, seed: int) -> np.ndarray:
    """The planted model (pure)."""
    return np.random.default_rng([seed, 0]).standard_normal(features) / np.sqrt(features)


def rows_block(start: int, stop: int, features: int, noise: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the global data set (pure; identical for any rank count)."""
    w_true = true_weights(features, seed)
    xs, ys = [], []
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        rng = np.random.default_rng([seed, 1, block])
        x = rng.standard_normal((BLOCK, features))
        y = x @ w_true + noise * rng.standard_normal(BLOCK)
        lo, hi = max(start - block * BLOCK, 0), min(stop - block * BLOCK, BLOCK)
        xs.append(x[lo:hi])
        ys.append(y[lo:hi])
    return np.concatenate(xs), np.concatenate(ys)


def local_rows(cfg: ScalingConfig, size: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, global N) of this rank's rows."""
    if cfg.mode == "weak":
        return rank * cfg.rows, (rank + 1) * cfg.rows, size * cfg.rows
    start, stop = chunk_bounds(cfg.rows, size, rank)
    return start, stop, cfg.rows


def gradient_sum(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``X^T (X w - y)`` (pure; summed, not averaged)."""
    return x.T @ (x @ w - y)


def _save_checkpoint(ctx: RunContext, w: np.ndarray, step: int) -> None:
    """Collective: every rank holds the same ``w``; rank 0's is saved."""
    ctx.save_checkpoint(step, {"w": torch.from_numpy(w.copy())}, {})


def check_resume(cfg: ScalingConfig, restored: Restored) -> None:
    """The checkpoint holds ``cfg.features`` float64 weights (raises UsageError otherwise)."""
    w = restored.shared.get("w")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (cfg.features,) \
            or w.dtype != torch.float64:
        got = (f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor)
               else type(w).__name__)
        raise UsageError(f"{restored.manifest.path}: holds weights {got}, the job has "
                         f"{cfg.features} float64 features (resume with the same job file)")


def _load_checkpoint(ctx: RunContext, features: int) -> tuple[np.ndarray, int]:
    if ctx.restored is None:
        return np.zeros(features), 0
    return ctx.restored.shared["w"].numpy(), ctx.restored.step


def run(cfg: ScalingConfig, ctx: RunContext) -> dict[str, Any]:
    comm: Communicator = ctx.comm
    start, stop, n_total = local_rows(cfg, comm.size, comm.rank)
    x, y = rows_block(start, stop, cfg.features, cfg.noise, cfg.seed)
    w, first = _load_checkpoint(ctx, cfg.features)
    if first:
        ctx.log(f"resuming at step {first} (restart {restart_count()})")
    grad = np.empty(cfg.features)
    compute = comm_s = wall = 0.0
    stopped, step = None, first
    for step in range(first, cfg.steps):
        t0 = time.perf_counter()
        grad[:] = gradient_sum(x, y, w)
        t1 = time.perf_counter()
        comm.Allreduce(grad)
        t2 = time.perf_counter()
        w -= cfg.lr / n_total * grad
        compute, comm_s = compute + t1 - t0, comm_s + t2 - t1
        loss = comm.allreduce(float(np.sum((x @ w - y) ** 2)), op="sum") / (2 * n_total)
        if ctx.is_root:
            ctx.run_dir.log_metrics(step=step + 1, loss=loss, restart=restart_count())
        t3 = time.perf_counter()
        if cfg.step_sleep:
            time.sleep(cfg.step_sleep)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(ctx, w, step + 1)
        t4 = time.perf_counter()
        if step + 1 < cfg.steps:  # a signal during the last step lets the run finish
            stopped = ctx.stop_requested()
        wall += t3 - t0 + time.perf_counter() - t4  # the step without sleep and checkpoint
        if stopped:
            break
    done = step + 1 if cfg.steps > first else first
    if done != first and not (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
        _save_checkpoint(ctx, w, done)
    steps_here = max(done - first, 1)
    err = float(np.linalg.norm(w - true_weights(cfg.features, cfg.seed)))
    return {
        "stopped_by": stopped, "mode": cfg.mode, "steps_done": done, "steps_this_run": done - first,
        "rows_total": n_total, "rows_per_rank_max": comm.allreduce(stop - start, op="max"),
        "features": cfg.features, "allreduce_bytes": 8 * cfg.features,
        "compute_s_per_step": comm.allreduce(compute / steps_here, op="max"),
        "allreduce_s_per_step": comm.allreduce(comm_s / steps_here, op="max"),
        "step_s_per_step": comm.allreduce(wall / steps_here, op="max"),
        "small_allreduces_per_step": SMALL_ALLREDUCES,
        "final_loss": comm.allreduce(float(np.sum((x @ w - y) ** 2)), op="sum") / (2 * n_total),
        "weight_error": err, "restarts": restart_count(),
    }


JOB = JobKind(config=ScalingConfig, run=run,
              description="least-squares data-parallel GD (compute + Allreduce/step) for "
                          "weak/strong scaling series; checkpoints on SIGUSR1/SIGTERM",
              check_resume=check_resume)
