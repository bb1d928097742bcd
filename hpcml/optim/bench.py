"""``hpcml bench optimizers``: MADA against tuned Adam, AdamW, AMSGrad, AVGrad, Lion, Adan and
Yogi on a real byte-level language-modelling task (the Python standard library's source,
:mod:`hpcml.optim.corpus`).

Tuned baselines: every optimizer runs at every learning rate of one log-spaced grid and every
seed, and is reported at its best learning rate (:func:`best_of_grid`). The grid is ``lr_grid``,
multipliers of ``lr``: with ``lr > 0`` every optimizer gets the same absolute learning rates,
with ``lr = 0`` the multiples of each optimizer's own default
(:data:`~hpcml.optim.registry.DEFAULT_LR`). ``mada-frozen`` is MADA with its hyper learning rate
at 0 (its coefficients stay at their initial values, ``[mada]``), tuned over the same grid, so
that MADA minus mada-frozen is what the hyper-gradient itself contributes. AdamW runs with
``weight_decay`` (torch's default 0.01), every other optimizer without.

One run is one (optimizer, learning rate, seed): the :class:`~hpcml.optim.lm.CausalLM`
initialised from the seed, ``batch_size`` random windows of ``context + 1`` bytes per step from
the whole training split, drawn by a generator seeded by the seed alone (every optimizer and
learning rate sees the same batches), and the validation loss on fixed windows of the validation
split (disjoint files) every ``eval_every`` steps. A run whose validation loss becomes non-finite
stops and counts as diverged. Runs need no communication: the planned runs (:func:`plan`: seed
outermost, then learning rate, then optimizer) go round-robin over the ranks, one per rank per
round, and a run's result does not depend on the number of ranks or on which rank ran it.

Reported per optimizer (:func:`best_of_grid`): the best learning rate, its mean final validation
loss (nats per byte) ± the standard deviation over the seeds and their min-max, whether that
learning rate is the grid's smallest or largest (then the grid did not bracket the optimizer's
optimum, and its loss is only an upper bound of the tuned one), the difference to tuned Adam,
the median wall time of a training step and the CPU time of ``optimizer.step()``, and the
optimizer state's bytes (exact, from its tensors); plus every (optimizer, learning rate) cell.
Files: ``table.md`` (both tables), ``val-loss.png`` (curves at each optimizer's best learning
rate, mean over the seeds, shaded min-max; final loss against learning rate),
``mada-coefficients.png`` (MADA's coefficients at its best learning rate) and the summary JSON.

Preemption (SIGUSR1/SIGTERM, :mod:`hpcml.preemption`): the ranks agree after every round (one
small allreduce) and stop before the next; the tables, plots and summary then cover the runs done
(``runs_done`` of ``runs_planned``; never a half-trained run) and name ``stopped_by`` (status
``preempted``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.bench.report import markdown_table, median, pyplot, save_figure
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.optim.corpus import VOCAB, read_split, validate_corpus
from hpcml.optim.lm import CausalLM, next_token_loss
from hpcml.optim.mada import COEFFICIENTS, DEFAULT_HYPER_LR
from hpcml.optim.registry import DEFAULT_LR, OPTIMIZERS, build_optimizer

#: What the benchmark can run: every registry optimizer and MADA with frozen coefficients.
BENCH_OPTIMIZERS = (*OPTIMIZERS, "mada-frozen")


@dataclasses.dataclass
class LMConfig:
    d_model: int = option(64, min=2, help="model width (divisible by heads)")
    heads: int = option(4, min=1, help="attention heads")
    layers: int = option(2, min=1, help="transformer blocks")
    ff: int = option(256, min=1, help="feed-forward inner width")
    context: int = option(64, min=2, help="bytes of context per training window")


@dataclasses.dataclass
class MADAOptions:
    """Initial MADA coefficients (beta1/beta2: the registry's, or ``beta2``) and its
    hyper-learning."""

    beta3: float = option(0.0, help="initial Adan weight, in [0, 1)")
    c: float = option(1.0, help="initial Yogi interpolation (1 = Adam's second moment)")
    rho: float = option(0.6, help="initial AVGrad interpolation (1 = Adam, 0 = AVGrad)")
    gamma: float = option(1.0, help="initial Lion interpolation (1 = no Lion)")
    hyper_lr: float = option(1.0, help="factor on the authors' per-coefficient hyper learning "
                             "rates for mada (mada-frozen always 0)")
    vmax: str = option("avg", choices=("avg", "max"), help="avg = AVGrad, max = AMSGrad")


@dataclasses.dataclass
class BenchOptimizersConfig(JobConfig):
    data: str = option("data/lm/pystdlib.h5", help="HDF5 corpus of python -m hpcml.optim.corpus")
    model: LMConfig = option(LMConfig())
    mada: MADAOptions = option(MADAOptions())
    optimizers: list[str] = option(list(BENCH_OPTIMIZERS), choices=BENCH_OPTIMIZERS,
                                   nonempty=True, help="optimizers compared; mada-frozen = "
                                   "MADA with hyper learning rate 0")
    lr: float = option(1e-3, min=0.0, help="base learning rate that lr_grid multiplies, the "
                       "same for every optimizer; 0 = each optimizer's own default")
    lr_grid: list[float] = option([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0], gt=0.0,
                                  help="log-spaced multipliers of lr (ascending, one ratio): "
                                  "every optimizer runs at each")
    beta2: float = option(0.0, min=0.0, help="second-moment coefficient of every optimizer "
                          "(see hpcml.optim.registry); 0 = each optimizer's own default")
    weight_decay: float = option(0.01, min=0.0, help="AdamW's decoupled weight decay (the "
                                 "other optimizers run without)")
    seeds: int = option(3, min=1, help="seeds per (optimizer, lr): seed, seed + 1, ...")
    steps: int = option(200, min=1, help="optimizer steps per run")
    batch_size: int = option(16, min=1, help="windows per step")
    eval_every: int = option(20, min=1, help="validate every N steps (and at the end)")
    eval_windows: int = option(32, min=1, help="fixed validation windows (context + 1 bytes)")

    def check(self, size: int) -> None:
        if self.model.d_model % self.model.heads:
            raise ConfigError("model.d_model", f"{self.model.d_model} is not divisible by "
                              f"model.heads = {self.model.heads}", "use e.g. d_model = 16 * heads")
        grid, example = self.lr_grid, "e.g. [0.5, 1, 2, 4, 8, 16, 32]"
        if not grid:
            raise ConfigError("lr_grid", "is empty", f"give the multipliers, {example}")
        ratios = [b / a for a, b in zip(grid, grid[1:], strict=False)]
        if any(r <= 1.0 for r in ratios):
            raise ConfigError("lr_grid", f"{grid} is not strictly ascending",
                              f"sort it, {example}")
        if ratios and max(ratios) > 1.01 * min(ratios):
            raise ConfigError("lr_grid", f"{grid} is not log-spaced (ratios "
                              f"{min(ratios):.3g} to {max(ratios):.3g})",
                              f"use one ratio between neighbours, {example}")
        if not Path(self.data).is_file():
            raise ConfigError("data", f"corpus file {self.data!r} not found",
                              f"create it with: python -m hpcml.optim.corpus {self.data}")
        for name in self.optimizers:
            try:
                self.build(name, self.learning_rate(name, grid[0]),
                           [torch.zeros(1, requires_grad=True)])
            except ValueError as exc:
                raise ConfigError("mada" if name.startswith("mada") else "beta2",
                                  str(exc)) from None

    def learning_rate(self, name: str, multiplier: float) -> float:
        """The learning rate of ``name`` at grid point ``multiplier``."""
        return (self.lr or DEFAULT_LR[_registry_name(name)]) * multiplier

    def build(self, name: str, lr: float, params: Iterable[Any]) -> torch.optim.Optimizer:
        """Optimizer ``name`` (one of :data:`BENCH_OPTIMIZERS`) over ``params`` at learning rate
        ``lr``, as this benchmark runs it. Raises ``ValueError`` for invalid values."""
        kw: dict[str, Any] = {"lr": lr}
        if self.beta2:
            kw["beta2"] = self.beta2
        if name == "adamw":
            kw["weight_decay"] = self.weight_decay
        if _registry_name(name) == "mada":
            m = self.mada
            scale = 0.0 if name == "mada-frozen" else m.hyper_lr
            kw.update(beta3=m.beta3, c=m.c, rho=m.rho, gamma=m.gamma, vmax=m.vmax,
                      hyper_lr={k: v * scale for k, v in DEFAULT_HYPER_LR.items()})
        return build_optimizer(_registry_name(name), params, **kw)


def _registry_name(name: str) -> str:
    return "mada" if name == "mada-frozen" else name


def plan(cfg: BenchOptimizersConfig) -> list[dict[str, Any]]:
    """Every run of the benchmark, in the order they are started: seed outermost, then the
    learning rate (ascending), then the optimizer (so a benchmark stopped early has whole seeds
    first). Each: ``optimizer``, ``multiplier``, ``lr``, ``seed``."""
    return [{"optimizer": name, "multiplier": mult, "lr": cfg.learning_rate(name, mult),
             "seed": cfg.seed + i}
            for i in range(cfg.seeds) for mult in cfg.lr_grid for name in cfg.optimizers]


def sample_windows(tokens: np.ndarray, rng: np.random.Generator, count: int,
                   length: int) -> torch.Tensor:
    """``count`` random windows of ``length`` consecutive tokens (int64, (count, length))."""
    starts = rng.integers(0, len(tokens) - length + 1, size=count)
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


def validation_windows(tokens: np.ndarray, count: int, length: int) -> torch.Tensor:
    """``count`` windows evenly spread over ``tokens`` (deterministic)."""
    starts = np.linspace(0, len(tokens) - length, count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-byte loss over ``windows`` (not collective)."""
    return float(next_token_loss(model, windows))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state."""
    return sum(t.nbytes for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def train_once(cfg: BenchOptimizersConfig, train: np.ndarray, valid: torch.Tensor,
               optimizer: str, lr: float, seed: int, **planned: Any) -> dict[str, Any]:
    """One training run in this process (no communication). Returns the planned fields plus
    ``steps``/``val_loss`` (the curve; a non-finite loss as None), ``final`` (None when the run
    diverged), ``diverged``, the median ``step_ms`` and ``opt_cpu_ms``, ``state_bytes`` and MADA's
    ``coefficients`` per step (empty for the others). Deterministic in (cfg, optimizer, lr,
    seed) on a single torch thread."""
    m = cfg.model
    torch.manual_seed(seed)
    model = CausalLM(VOCAB, m.d_model, m.heads, m.layers, m.ff, max_len=m.context)
    opt = cfg.build(optimizer, lr, model.parameters())
    rng = np.random.default_rng(seed)
    steps, losses, coeffs = [0], [validation_loss(model, valid)], []
    step_s, opt_cpu = [], []
    track = optimizer == "mada"
    if track:
        coeffs.append(dict(opt.coefficients))
    for step in range(1, cfg.steps + 1):
        windows = sample_windows(train, rng, cfg.batch_size, m.context + 1)
        tick = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        next_token_loss(model, windows).backward()
        cpu = time.process_time()
        opt.step()
        opt_cpu.append(time.process_time() - cpu)
        step_s.append(time.perf_counter() - tick)
        if track:
            coeffs.append(dict(opt.coefficients))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            steps.append(step)
            losses.append(validation_loss(model, valid))
            if not math.isfinite(losses[-1]):
                break
    diverged = not math.isfinite(losses[-1])
    return {**planned, "optimizer": optimizer, "lr": lr, "seed": seed, "steps": steps,
            "val_loss": [v if math.isfinite(v) else None for v in losses],
            "final": None if diverged else losses[-1], "diverged": diverged,
            "step_ms": 1e3 * median(step_s), "opt_cpu_ms": 1e3 * median(opt_cpu),
            "state_bytes": state_bytes(opt), "coefficients": coeffs}


def best_of_grid(runs: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]],
                                                               list[dict[str, Any]]]:
    """The grid cells and the best-of-grid rows of ``runs`` (each with ``optimizer``, ``lr``,
    ``seed``, ``final``: the final validation loss, None when the run diverged; and
    ``step_ms``, ``opt_cpu_ms``, ``state_bytes``). Pure.

    Cells, one per (optimizer, lr), optimizers in order of first appearance, lr ascending:
    ``seeds`` run, ``diverged`` of them, ``mean`` (None when any seed diverged), ``std`` (sample
    standard deviation, None for one seed), ``min``/``max`` (of the runs that did not diverge).

    Rows, one per optimizer: its best cell, the one with the lowest ``mean`` (a diverged seed
    counts as +inf, so a learning rate that diverged for any seed is never best; ties go to the
    smaller lr): ``lr``, ``val_loss`` (its mean), ``std``, ``min``, ``max``, ``seeds``;
    ``edge``: ``"low"``/``"high"`` when that lr is the smallest/largest evaluated for this
    optimizer, ``"single"`` when only one was, else None (the grid brackets the optimum);
    ``lrs``/``lrs_diverged``: learning rates evaluated / with a diverged seed; ``vs_adam``: the
    difference to Adam's best (None without an ``adam`` row), ``vs_adam_seeds``: [min, max] of
    the same difference seed by seed (a seed is the same initialisation and batches for every
    optimizer; None without a common seed); the medians of ``step_ms`` and
    ``opt_cpu_ms`` and ``state_mib`` at the best lr. Every field that needs a best cell is None
    when every lr diverged."""
    names = list(dict.fromkeys(r["optimizer"] for r in runs))
    cells: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for name in names:
        mine = [r for r in runs if r["optimizer"] == name]
        own = []
        for lr in sorted({r["lr"] for r in mine}):
            recs = [r for r in mine if r["lr"] == lr]
            ok = [r["final"] for r in recs if r["final"] is not None]
            own.append({"optimizer": name, "lr": lr, "multiplier": recs[0].get("multiplier"),
                        "seeds": len(recs), "diverged": len(recs) - len(ok),
                        "mean": statistics.fmean(ok) if len(ok) == len(recs) else None,
                        "std": statistics.stdev(ok) if len(ok) == len(recs) > 1 else None,
                        "min": min(ok, default=None), "max": max(ok, default=None),
                        "best": False, "runs": recs})
        scored = [(c["mean"], i) for i, c in enumerate(own) if c["mean"] is not None]
        row: dict[str, Any] = {"optimizer": name, "lrs": len(own),
                               "lrs_diverged": sum(c["diverged"] > 0 for c in own)}
        if scored:
            best = min(scored)[1]
            cell = own[best]
            row.update({k: cell[k] for k in ("lr", "multiplier", "seeds", "std", "min", "max")},
                       val_loss=cell["mean"],
                       edge="single" if len(own) == 1 else "low" if best == 0
                       else "high" if best == len(own) - 1 else None,
                       step_ms=median([r["step_ms"] for r in cell["runs"]]),
                       opt_cpu_ms=median([r["opt_cpu_ms"] for r in cell["runs"]]),
                       state_mib=cell["runs"][0]["state_bytes"] / 2**20)
            cell["best"] = True
        else:
            row.update(dict.fromkeys(("lr", "multiplier", "seeds", "std", "min", "max",
                                      "val_loss", "edge", "step_ms", "opt_cpu_ms",
                                      "state_mib")))
        rows.append(row)
        cells.extend({k: v for k, v in c.items() if k != "runs"} for c in own)
    adam = next((r for r in rows if r["optimizer"] == "adam" and r["val_loss"] is not None),
                None)
    adam_final = {} if adam is None else {r["seed"]: r["final"] for r in runs
                                          if (r["optimizer"], r["lr"]) == ("adam", adam["lr"])}
    for row in rows:
        paired = [r["final"] - adam_final[r["seed"]] for r in runs
                  if (r["optimizer"], r["lr"]) == (row["optimizer"], row["lr"])
                  and r["seed"] in adam_final]
        row["vs_adam"] = None if adam is None or row["val_loss"] is None \
            else row["val_loss"] - adam["val_loss"]
        row["vs_adam_seeds"] = [min(paired), max(paired)] if paired else None
    return cells, rows


def grid_statement(cfg: BenchOptimizersConfig) -> str:
    """The learning-rate grid in words (printed at the start and atop the tables)."""
    grid = cfg.lr_grid
    spacing = f", x{grid[1] / grid[0]:.3g} apart" if len(grid) > 1 else ""
    if cfg.lr:
        values = ", ".join(f"{cfg.lr * m:.3g}" for m in grid)
        return f"learning rates {values} for every optimizer ({len(grid)} values{spacing})"
    values = ", ".join(f"{m:.3g}" for m in grid)
    return (f"learning rates = each optimizer's default x [{values}] ({len(grid)} "
            f"values{spacing})")


def run(cfg: BenchOptimizersConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    load = os.getloadavg()[0]
    train = read_split(cfg.data, "train").tokens
    valid = validation_windows(read_split(cfg.data, "valid").tokens, cfg.eval_windows,
                               cfg.model.context + 1)
    planned = plan(cfg)
    ctx.log(f"{grid_statement(cfg)}; {len(planned)} runs = {len(cfg.optimizers)} optimizers x "
            f"{len(cfg.lr_grid)} learning rates x {cfg.seeds} seeds, over {comm.size} ranks")
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    stopped = None
    for first in range(0, len(planned), comm.size):
        index = first + comm.rank
        mine = train_once(cfg, train, valid, **planned[index]) if index < len(planned) else None
        done = [r for r in comm.allgather(mine) if r is not None]
        for i, res in enumerate(done):
            final = "diverged" if res["diverged"] else f"final val loss {res['final']:.4f}"
            ctx.log(f"  {res['optimizer']:<11} lr {res['lr']:.3g} seed {res['seed']}: {final}, "
                    f"{res['step_ms']:.1f} ms/step (rank {i})")
        runs.extend(done)
        stopped = ctx.stop_requested() if len(runs) < len(planned) else None
        if stopped:
            ctx.log(f"stopped by {stopped} after {len(runs)} of {len(planned)} runs")
            break
    cells, rows = best_of_grid(runs)
    params = sum(p.numel() for p in CausalLM(VOCAB, cfg.model.d_model, cfg.model.heads,
                                             cfg.model.layers, cfg.model.ff,
                                             max_len=cfg.model.context).parameters())
    summary: dict[str, Any] = {
        "rows": rows, "grid": cells, "lr_grid": cfg.lr_grid, "lr_base": cfg.lr or None,
        "ranks": comm.size, "cores": os.cpu_count(), "load_average_1min": load,
        "parameters": params, "tokens_per_step": cfg.batch_size * cfg.model.context,
        "seconds": time.perf_counter() - started, "runs_planned": len(planned),
        "runs_done": len(runs), "stopped_by": stopped, "runs": runs}
    if ctx.is_root:
        _report(cfg, ctx, cells, rows, runs, summary)
    return summary


def _loss(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")


EDGE = {None: "no", "low": "YES: smallest lr, optimum may be lower",
        "high": "YES: largest lr, optimum may be higher", "single": "YES: one lr only"}


def best_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The best-of-grid table (markdown) of :func:`best_of_grid`'s rows."""
    shown = [{**r, "loss": _loss(r["val_loss"], r["std"]),
              "range": "-" if r["min"] is None else f"{r['min']:.4f}-{r['max']:.4f}",
              "best_lr": "diverged at every lr" if r["lr"] is None else f"{r['lr']:.3g}",
              "at_edge": EDGE[r["edge"]] if r["lr"] is not None else "-",
              "vs": "-" if r["vs_adam"] is None else f"{r['vs_adam']:+.4f}" + (
                  "" if r["vs_adam_seeds"] is None else
                  " ({:+.4f} to {:+.4f})".format(*r["vs_adam_seeds"])),
              "div": f"{r['lrs_diverged']} of {r['lrs']}"} for r in rows]
    return markdown_table(shown, [
        ("optimizer", "optimizer", ""), ("best_lr", "best lr", ""),
        ("loss", "final val loss at best lr (nats/byte, mean ± std)", ""),
        ("range", "min-max over seeds", ""), ("seeds", "seeds", "d"),
        ("at_edge", "best lr at grid edge?", ""),
        ("vs", "vs tuned Adam: mean (seed by seed min to max)", ""),
        ("div", "lrs with a diverged seed", ""), ("step_ms", "ms/step", ".1f"),
        ("opt_cpu_ms", "opt.step CPU ms", ".2f"), ("state_mib", "opt. state MiB", ".3f")])


def grid_table(cells: Sequence[Mapping[str, Any]], absolute: bool) -> str:
    """Every (optimizer, lr) cell: mean final validation loss over the seeds, ``div k/n`` when
    k of n seeds diverged, bold at each optimizer's best; columns by learning rate
    (``absolute``) or by grid multiplier."""
    key = "lr" if absolute else "multiplier"
    columns = sorted({c[key] for c in cells})
    table = []
    for name in dict.fromkeys(c["optimizer"] for c in cells):
        row: dict[str, Any] = {"optimizer": name}
        for c in cells:
            if c["optimizer"] == name:
                text = f"div {c['diverged']}/{c['seeds']}" if c["diverged"] else f"{c['mean']:.4f}"
                row[c[key]] = f"**{text}**" if c["best"] else text
        table.append({k: row.get(k, "-") for k in ["optimizer", *columns]})
    head = (lambda v: f"lr {v:.3g}") if absolute else (lambda v: f"x{v:.3g}")
    return markdown_table(table, [("optimizer", "optimizer", ""),
                                  *((v, head(v), "") for v in columns)])


def _report(cfg: BenchOptimizersConfig, ctx: RunContext, cells: list[dict[str, Any]],
            rows: list[dict[str, Any]], runs: list[dict[str, Any]],
            summary: dict[str, Any]) -> None:
    head = (f"hpcml bench optimizers: byte-level LM on the Python standard library "
            f"({summary['parameters']} parameters, {cfg.model.layers} layers, d_model "
            f"{cfg.model.d_model}, context {cfg.model.context}; {cfg.steps} steps of "
            f"{cfg.batch_size} windows = {summary['tokens_per_step']} tokens; "
            f"beta2 {cfg.beta2 or 'each default'}; {cfg.seeds} seeds; runs spread over "
            f"{summary['ranks']} ranks, {summary['cores']} cores, load average "
            f"{summary['load_average_1min']:.1f} at start; {summary['seconds']:.0f} s"
            + (f"; stopped by {summary['stopped_by']} after {summary['runs_done']} of "
               f"{summary['runs_planned']} runs" if summary["stopped_by"] else "") + ")\n"
            f"Tuned: {grid_statement(cfg)}; each optimizer at the lr of its lowest mean final "
            f"validation loss (an lr where any seed diverged is never best); spread = sample "
            f"std and min-max over the seeds at that lr. 'At grid edge' = the grid did not "
            f"bracket that optimizer's optimum: its loss is an upper bound of the tuned one.\n")
    text = (f"{head}\nBest of grid:\n\n{best_table(rows)}\n\nEvery learning rate (mean "
            f"final val loss over the seeds; best in bold):\n\n"
            f"{grid_table(cells, absolute=bool(cfg.lr))}\n")
    ctx.run_dir.write_text("table.md", text)
    print(text, flush=True)
    _plot_losses(ctx, cells, rows, runs)
    if any(r["coefficients"] for r in runs):
        _plot_coefficients(ctx, rows, runs)


def _at_best(row: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> list[Any]:
    return [r for r in runs if r["optimizer"] == row["optimizer"] and r["lr"] == row["lr"]]


def _plot_losses(ctx: RunContext, cells: Sequence[Mapping[str, Any]],
                 rows: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> None:
    plt = pyplot()
    fig, (curves_ax, lr_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    top = []  # the curves after the first evaluation: the y range that shows their differences
    for row in rows:
        if row["lr"] is None:
            continue
        recs = _at_best(row, runs)
        length = min(len(r["val_loss"]) for r in recs)
        curves = np.array([r["val_loss"][:length] for r in recs], dtype=float)
        top.append(curves[:, min(1, length - 1)].max())
        wide = 2.2 if row["optimizer"] == "mada" else 1.2
        line, = curves_ax.plot(recs[0]["steps"][:length], curves.mean(0), linewidth=wide,
                               label=f"{row['optimizer']} (lr {row['lr']:.3g})")
        curves_ax.fill_between(recs[0]["steps"][:length], curves.min(0), curves.max(0),
                               alpha=0.15, color=line.get_color())
        mine = [c for c in cells if c["optimizer"] == row["optimizer"] and c["mean"] is not None]
        lr_ax.plot([c["lr"] for c in mine], [c["mean"] for c in mine], marker="o",
                   linewidth=wide, color=line.get_color(), label=row["optimizer"])
        lr_ax.plot([row["lr"]], [row["val_loss"]], marker="*", markersize=14,
                   color=line.get_color())
    curves_ax.set_title("validation loss at each optimizer's best lr (mean, min-max of seeds)")
    curves_ax.set_xlabel("step")
    curves_ax.set_ylabel("validation loss (nats/byte)")
    if top:
        curves_ax.set_ylim(top=max(top))
    lr_ax.set_xscale("log")
    lr_ax.set_title("final validation loss against lr (mean of seeds; * = best)")
    lr_ax.set_xlabel("learning rate")
    for ax in (curves_ax, lr_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir.path / "val-loss.png")


def _plot_coefficients(ctx: RunContext, rows: Sequence[Mapping[str, Any]],
                       runs: Sequence[Mapping[str, Any]]) -> None:
    row = next((r for r in rows if r["optimizer"] == "mada" and r["lr"] is not None), None)
    if row is None:
        return
    recs = _at_best(row, runs)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    length = min(len(r["coefficients"]) for r in recs)
    for k in COEFFICIENTS:
        values = np.array([[c[k] for c in r["coefficients"][:length]] for r in recs])
        ax.plot(np.arange(length), values.mean(0), label=k)
    ax.set_title(f"MADA coefficients at lr {row['lr']:.3g} (mean of {len(recs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir.path / "mada-coefficients.png")


JOB = JobKind(config=BenchOptimizersConfig, run=run,
              description="MADA vs tuned Adam/AdamW/AMSGrad/AVGrad/Lion/Adan/Yogi on a byte LM",
              # every rank trains on the whole training split (runs are spread, not data)
              validate_data=lambda cfg, comm: validate_corpus(cfg.data, 0, 1,
                                                              cfg.model.context + 1))
