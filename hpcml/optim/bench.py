"""``hpcml bench optimizers``: MADA against Adam, AMSGrad, AVGrad, Lion, Adan and Yogi on a real
byte-level language-modelling task (the Python standard library's source,
:mod:`hpcml.optim.corpus`), data parallel over the ranks it is launched with.

For every setting x optimizer x seed, in one run: the same :class:`~hpcml.optim.lm.CausalLM`
(initialised from the seed), the same batches (each rank draws ``batch_size / P`` random windows
of ``context + 1`` bytes from its shard of the training split, seeded by (seed, rank)), gradients
averaged over the ranks (dense allreduce, :class:`~hpcml.parallel.DistributedOptimizer`) before
every optimizer step, and the validation loss on fixed windows of the validation split (disjoint
files) every ``eval_every`` steps. Settings (the paper's robustness study): ``default`` (each
optimizer at its own defaults, :data:`~hpcml.optim.registry.DEFAULT_LR`), ``beta2=0.9`` (the
second-moment coefficient set to 0.9; see :mod:`hpcml.optim.registry` for what that is per
optimizer; for MADA only its initial value), ``lr*10`` and ``lr*0.1``. A run whose validation loss
becomes non-finite stops and counts as diverged.

Reported per (setting, optimizer): final validation loss (nats per byte) as mean ± standard
deviation and min-max over the seeds, perplexity and bits per byte of the mean, the difference to
Adam in the same setting, the median wall time of a whole training step and of
``optimizer.step()`` alone and the CPU time of ``optimizer.step()`` (which shared, oversubscribed
cores inflate less than wall time; each the slowest rank's), and the optimizer state's bytes per
rank (exact, from its tensors). Files: ``table.md``, ``val-loss.png`` (curves, mean over seeds,
shaded min-max), ``mada-coefficients.png`` (MADA's coefficients during training, per setting)
and the summary JSON.

Preemption (SIGUSR1/SIGTERM, :mod:`hpcml.preemption`): the ranks agree after every training run
(one small allreduce) and stop before the next; the table, plots and summary then cover the
runs done (``runs_done`` of ``runs_planned``; never a half-trained run) and name ``stopped_by``
(status ``preempted``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.bench.report import markdown_table, median, pyplot, save_figure
from hpcml.comm import Communicator
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.optim.corpus import VOCAB, read_split
from hpcml.optim.lm import CausalLM, next_token_loss
from hpcml.optim.mada import COEFFICIENTS
from hpcml.optim.registry import DEFAULT_LR, build_optimizer
from hpcml.parallel import DistributedOptimizer

BENCH_OPTIMIZERS = ("adam", "amsgrad", "avgrad", "lion", "adan", "yogi", "mada", "adamw")
SETTINGS = ("default", "beta2=0.9", "lr*10", "lr*0.1")


@dataclasses.dataclass
class LMConfig:
    d_model: int = option(64, min=2, help="model width (divisible by heads)")
    heads: int = option(4, min=1, help="attention heads")
    layers: int = option(2, min=1, help="transformer blocks")
    ff: int = option(256, min=1, help="feed-forward inner width")
    context: int = option(64, min=2, help="bytes of context per training window")


@dataclasses.dataclass
class MADAOptions:
    """Initial MADA coefficients (beta1/beta2 come from the setting) and its hyper-learning."""

    beta3: float = option(0.0, help="initial Adan weight, in [0, 1)")
    c: float = option(1.0, help="initial Yogi interpolation (1 = Adam's second moment)")
    rho: float = option(0.6, help="initial AVGrad interpolation (1 = Adam, 0 = AVGrad)")
    gamma: float = option(1.0, help="initial Lion interpolation (1 = no Lion)")
    hyper_lr: float = option(1.0, help="factor on the authors' per-coefficient hyper learning "
                             "rates (0 freezes the coefficients)")
    vmax: str = option("avg", choices=("avg", "max"), help="avg = AVGrad, max = AMSGrad")


@dataclasses.dataclass
class BenchOptimizersConfig(JobConfig):
    data: str = option("data/lm/pystdlib.h5", help="HDF5 corpus of python -m hpcml.optim.corpus")
    model: LMConfig = option(LMConfig())
    mada: MADAOptions = option(MADAOptions())
    optimizers: list[str] = option(list(BENCH_OPTIMIZERS[:7]), choices=BENCH_OPTIMIZERS,
                                   nonempty=True, help="optimizers compared")
    settings: list[str] = option(list(SETTINGS), choices=SETTINGS, nonempty=True,
                                 help="hyper-parameter settings: default, beta2=0.9, lr*10, lr*0.1")
    seeds: int = option(3, min=1, help="seeds per (setting, optimizer): seed, seed + 1, ...")
    steps: int = option(200, min=1, help="optimizer steps per run")
    batch_size: int = option(16, min=1, help="global windows per step (divisible by ranks)")
    lr: float = option(0.0, min=0.0, help="learning rate for every optimizer; 0 = each "
                       "optimizer's own default")
    eval_every: int = option(20, min=1, help="validate every N steps (and at the end)")
    eval_windows: int = option(32, min=1, help="fixed validation windows (context + 1 bytes)")

    def check(self, size: int) -> None:
        if self.model.d_model % self.model.heads:
            raise ConfigError("model.d_model", f"{self.model.d_model} is not divisible by "
                              f"model.heads = {self.model.heads}", "use e.g. d_model = 16 * heads")
        if self.batch_size % size:
            raise ConfigError("batch_size", f"{self.batch_size} windows do not split evenly "
                              f"over {size} ranks", f"use a multiple of {size}")
        if not Path(self.data).is_file():
            raise ConfigError("data", f"corpus file {self.data!r} not found",
                              f"create it with: python -m hpcml.optim.corpus {self.data}")
        try:
            build_optimizer("mada", [torch.zeros(1, requires_grad=True)], **self._mada({}))
        except ValueError as exc:
            raise ConfigError("mada", str(exc)) from None

    def _mada(self, kw: dict[str, Any]) -> dict[str, Any]:
        from hpcml.optim.mada import DEFAULT_HYPER_LR

        m = self.mada
        return {**kw, "beta3": m.beta3, "c": m.c, "rho": m.rho, "gamma": m.gamma, "vmax": m.vmax,
                "hyper_lr": {k: v * m.hyper_lr for k, v in DEFAULT_HYPER_LR.items()}}

    def optimizer_kwargs(self, name: str, setting: str) -> dict[str, Any]:
        """Keyword arguments of :func:`build_optimizer` for ``name`` under ``setting``."""
        lr = self.lr or DEFAULT_LR[name]
        kw: dict[str, Any] = {"lr": lr * {"lr*10": 10.0, "lr*0.1": 0.1}.get(setting, 1.0)}
        if setting == "beta2=0.9":
            kw["beta2"] = 0.9
        return self._mada(kw) if name == "mada" else kw


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
def validation_loss(comm: Communicator, model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-byte loss over ``windows``, which every rank holds; rank r evaluates windows
    r, r + P, ... Collective; the same value on every rank."""
    mine = windows[comm.rank::comm.size]
    buf = np.zeros(2)
    if len(mine):
        buf[:] = float(next_token_loss(model, mine)) * len(mine), len(mine)
    comm.Allreduce(buf)
    return float(buf[0] / buf[1])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state."""
    return sum(t.nbytes for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def train_once(cfg: BenchOptimizersConfig, comm: Communicator, train: np.ndarray,
               valid: torch.Tensor, name: str, setting: str, seed: int) -> dict[str, Any]:
    """One data-parallel training run; collective. Returns its curves and measurements."""
    m = cfg.model
    torch.manual_seed(seed)
    model = CausalLM(VOCAB, m.d_model, m.heads, m.layers, m.ff, max_len=m.context)
    optimizer = build_optimizer(name, model.parameters(), **cfg.optimizer_kwargs(name, setting))
    distributed = DistributedOptimizer(optimizer, model, comm=comm)
    rng = np.random.default_rng([seed, comm.rank])
    per_rank = cfg.batch_size // comm.size
    steps, losses, coeffs = [0], [validation_loss(comm, model, valid)], []
    step_s, opt_s, opt_cpu = [], [], []
    if name == "mada":
        coeffs.append(dict(optimizer.coefficients))
    diverged = False
    for step in range(1, cfg.steps + 1):
        windows = sample_windows(train, rng, per_rank, m.context + 1)
        tick = time.perf_counter()
        distributed.zero_grad(set_to_none=True)
        next_token_loss(model, windows).backward()
        distributed.synchronize()
        mid, mid_cpu = time.perf_counter(), time.process_time()
        distributed.step()
        end = time.perf_counter()
        opt_cpu.append(time.process_time() - mid_cpu)
        step_s.append(end - tick)
        opt_s.append(end - mid)
        if name == "mada":
            coeffs.append(dict(optimizer.coefficients))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            steps.append(step)
            losses.append(validation_loss(comm, model, valid))
            if not math.isfinite(losses[-1]):
                diverged = True
                break
    distributed.reducer.remove_hooks()
    timing = np.array([median(step_s), median(opt_s), median(opt_cpu)])
    comm.Allreduce(timing, op="max")
    return {"setting": setting, "optimizer": name, "seed": seed, "steps": steps,
            "val_loss": losses, "final": losses[-1] if not diverged else math.inf,
            "diverged": diverged, "step_ms": 1e3 * timing[0], "opt_step_ms": 1e3 * timing[1],
            "opt_cpu_ms": 1e3 * timing[2],
            "state_bytes": state_bytes(optimizer), "coefficients": coeffs}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, optimizer): statistics over seeds (see the module docstring)."""
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r["setting"], r["optimizer"]) for r in runs))
    for setting, name in keys:
        recs = [r for r in runs if (r["setting"], r["optimizer"]) == (setting, name)]
        finals = [r["final"] for r in recs]
        ok = [f for f in finals if math.isfinite(f)]
        mean = statistics.fmean(ok) if ok else math.inf
        rows.append({
            "setting": setting, "optimizer": name, "seeds": len(recs),
            "diverged": len(finals) - len(ok), "val_loss": mean if ok else None,
            "std": statistics.stdev(ok) if len(ok) > 1 else 0.0 if ok else None,
            "range": f"{min(ok):.3f}-{max(ok):.3f}" if ok else "-",
            "ppl": math.exp(mean) if ok else None,
            "bits_per_byte": mean / math.log(2) if ok else None,
            "step_ms": median([r["step_ms"] for r in recs]),
            "opt_step_ms": median([r["opt_step_ms"] for r in recs]),
            "opt_cpu_ms": median([r["opt_cpu_ms"] for r in recs]),
            "state_mib": recs[0]["state_bytes"] / 2**20})
    for row in rows:
        adam = next((r for r in rows if r["setting"] == row["setting"]
                     and r["optimizer"] == "adam"), None)
        row["vs_adam"] = (row["val_loss"] - adam["val_loss"]) if adam and adam["val_loss"] \
            is not None and row["val_loss"] is not None else None
    return rows


def run(cfg: BenchOptimizersConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    load = os.getloadavg()[0]
    train = read_split(cfg.data, "train", comm.rank, comm.size).tokens
    valid = validation_windows(read_split(cfg.data, "valid").tokens, cfg.eval_windows,
                               cfg.model.context + 1)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    planned = [(setting, name, cfg.seed + i) for setting in cfg.settings
               for name in cfg.optimizers for i in range(cfg.seeds)]
    stopped = None
    for setting, name, seed in planned:
        res = train_once(cfg, comm, train, valid, name, setting, seed)
        runs.append(res)
        ctx.log(f"  {setting:<10} {name:<8} seed {seed}: final val loss "
                f"{res['final']:.4f}, {res['step_ms']:.1f} ms/step")
        stopped = ctx.stop_requested() if len(runs) < len(planned) else None
        if stopped:
            ctx.log(f"stopped by {stopped} after {len(runs)} of {len(planned)} runs")
            break
    rows = aggregate(runs)
    params = sum(p.numel() for p in CausalLM(VOCAB, cfg.model.d_model, cfg.model.heads,
                                             cfg.model.layers, cfg.model.ff,
                                             max_len=cfg.model.context).parameters())
    summary: dict[str, Any] = {
        "rows": rows, "ranks": comm.size, "cores": os.cpu_count(), "load_average_1min": load,
        "parameters": params, "tokens_per_step": cfg.batch_size * cfg.model.context,
        "seconds": time.perf_counter() - started, "runs_planned": len(planned),
        "runs_done": len(runs), "stopped_by": stopped,
        "runs": [{k: v for k, v in r.items()} for r in runs]}
    if ctx.is_root:
        _report(cfg, ctx, rows, runs, summary)
    return summary


def _report(cfg: BenchOptimizersConfig, ctx: RunContext, rows: list[dict[str, Any]],
            runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    table = markdown_table(rows, [
        ("setting", "setting", ""), ("optimizer", "optimizer", ""),
        ("val_loss", "final val loss (nats/byte)", ".4f"), ("std", "± std", ".4f"),
        ("range", "min-max", ""), ("diverged", "diverged", "d"), ("ppl", "ppl", ".3f"),
        ("bits_per_byte", "bits/byte", ".3f"), ("vs_adam", "vs Adam", "+.4f"),
        ("step_ms", "ms/step", ".1f"), ("opt_step_ms", "opt.step ms", ".2f"),
        ("opt_cpu_ms", "opt.step CPU ms", ".2f"),
        ("state_mib", "opt. state MiB/rank", ".3f")])
    head = (f"hpcml bench optimizers: byte-level LM on the Python standard library "
            f"({summary['parameters']} parameters, {cfg.model.layers} layers, d_model "
            f"{cfg.model.d_model}, context {cfg.model.context}; {cfg.steps} steps of "
            f"{cfg.batch_size} windows = {summary['tokens_per_step']} tokens; {cfg.seeds} seeds; "
            f"data parallel on {summary['ranks']} ranks, {summary['cores']} cores, load average "
            f"{summary['load_average_1min']:.1f} at start; {summary['seconds']:.0f} s"
            + (f"; stopped by {summary['stopped_by']} after {summary['runs_done']} of "
               f"{summary['runs_planned']} runs" if summary["stopped_by"] else "") + ")\n")
    ctx.run_dir.write_text("table.md", f"{head}\n{table}\n")
    print(head, flush=True)
    print(table, flush=True)
    _plot_losses(cfg, ctx, runs)
    if any(r["coefficients"] for r in runs):
        _plot_coefficients(cfg, ctx, runs)


def _panels(cfg: BenchOptimizersConfig) -> tuple[Any, Any, Any]:
    plt = pyplot()
    n = len(cfg.settings)
    cols = min(n, 2)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6.5 * cols,
                             4.2 * ((n + cols - 1) // cols)), squeeze=False)
    return plt, fig, axes.reshape(-1)


def _plot_losses(cfg: BenchOptimizersConfig, ctx: RunContext,
                 runs: list[dict[str, Any]]) -> None:
    _, fig, axes = _panels(cfg)
    for ax, setting in zip(axes, cfg.settings, strict=False):
        for name in cfg.optimizers:
            recs = [r for r in runs if (r["setting"], r["optimizer"]) == (setting, name)]
            if not recs:  # not run: the benchmark was stopped early
                continue
            length = min(len(r["val_loss"]) for r in recs)
            steps = recs[0]["steps"][:length]
            curves = np.array([r["val_loss"][:length] for r in recs])
            line, = ax.plot(steps, curves.mean(0), label=name,
                            linewidth=2.2 if name == "mada" else 1.2)
            ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.15,
                            color=line.get_color())
        ax.set_title(setting)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir.path / "val-loss.png")


def _plot_coefficients(cfg: BenchOptimizersConfig, ctx: RunContext,
                       runs: list[dict[str, Any]]) -> None:
    _, fig, axes = _panels(cfg)
    for ax, setting in zip(axes, cfg.settings, strict=False):
        recs = [r for r in runs if r["setting"] == setting and r["coefficients"]]
        if not recs:
            continue
        length = min(len(r["coefficients"]) for r in recs)
        for k in COEFFICIENTS:
            values = np.array([[c[k] for c in r["coefficients"][:length]] for r in recs])
            ax.plot(np.arange(length), values.mean(0), label=k)
        ax.set_title(f"MADA coefficients, {setting} (mean of {len(recs)} seeds)")
        ax.set_xlabel("step")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir.path / "mada-coefficients.png")


JOB = JobKind(config=BenchOptimizersConfig, run=run,
              description="MADA vs Adam/AMSGrad/AVGrad/Lion/Adan/Yogi on a byte-level LM")
