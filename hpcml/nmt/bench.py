"""``hpcml bench reduction``: gradient exchange of the transformer at the P it is launched with.

On the same model (seed), data (each rank's shard of the corpus, ``batch_per_rank`` sentences
per rank per step: weak scaling, like the paper's weak-scaling runs) and optimizer, in the same
run, every method takes ``warmup`` untimed then ``steps`` timed steps; the methods alternate
step by step on the same batch (in an order rotated every step), so that drift in machine load
hits them alike:

- ``sparse_allgather`` / ``dense_allreduce`` / ``auto``: the reductions of
  :class:`hpcml.parallel.DistributedOptimizer`; exchange memory is their measured peak of
  exchange buffers (:class:`~hpcml.parallel.ExchangeMemory`), bytes are the ledger's received
  bytes of the exchange (taken around ``optimizer.step()``, where every request completes);
- ``ddp``: torch DDP over gloo on the all-dense model; memory = its reducer's bucket sizes; its
  traffic is not in the ledger and is given by the ledger's convention for an allreduce of those
  buckets (received = bucket bytes);
- ``horovod``: ``sparse_as_dense=True``, when ``horovod.torch`` imports; otherwise skipped with
  the reason.

Step time is each rank's median, then the slowest rank's; tokens/s = global target tokens per
step / that time; ``vs_ddp`` = DDP step time / method step time (> 1: faster than DDP). Run it
once per P (``mpiexec -n P``); with ``results`` set, rows accumulate in that JSON-lines file
(rows of the same P are replaced) and table.md + reduction.png cover every P in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.bench.report import markdown_table, median, pyplot, save_figure
from hpcml.comm import Communicator
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.nmt import peers
from hpcml.nmt.config import DataConfig, ModelConfig, check_model_data
from hpcml.nmt.data import TrainStream, read_shard, read_vocab, steps_per_epoch, validate_corpus
from hpcml.nmt.model import Transformer
from hpcml.nmt.step import train_step
from hpcml.parallel import (
    REDUCTIONS,
    DistributedOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from hpcml.rundir import atomic_write, read_metrics

METHODS = (*REDUCTIONS, "ddp", "horovod")


@dataclasses.dataclass
class ReductionConfig(JobConfig):
    model: ModelConfig = option(ModelConfig())
    data: DataConfig = option(DataConfig())
    methods: list[str] = option(["sparse_allgather", "dense_allreduce", "ddp", "horovod"],
                                choices=METHODS, help="exchanges and peers to time")
    batch_per_rank: int = option(32, min=1, help="sentences per rank per step (weak scaling)")
    steps: int = option(30, min=1, help="timed steps per method")
    warmup: int = option(5, min=0, help="untimed steps per method first")
    bucket_kib: int = option(1024, min=1, help="fused bucket size (hpcml and DDP), KiB")
    lr: float = option(1e-4, gt=0.0, help="constant learning rate during the benchmark")
    results: str = option("", help="JSON-lines file that collects rows over runs at several P "
                                   "('' = this run only)")

    def check(self, size: int) -> None:
        check_model_data(self.model, self.data, self.batch_per_rank * size, size,
                         "batch_per_rank")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("methods", f"{self.methods} lists a method twice",
                              "list each method once")


def _model(cfg: ReductionConfig, vocab: int, sparse: bool) -> Transformer:
    torch.manual_seed(cfg.seed)
    m = cfg.model
    return Transformer(vocab, m.d_model, m.heads, m.layers, m.ff, m.dropout, sparse=sparse)


@dataclasses.dataclass
class _Runner:
    """One method ready to step: its network, optimizer, exchange and measurements."""

    method: str
    net: torch.nn.Module
    optimizer: Any
    memory: Callable[[], int | None]
    after_step: Callable[[], None] = lambda: None
    exchanged: int = 0
    times: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)


def _setup(cfg: ReductionConfig, ctx: RunContext, method: str, vocab: int) -> _Runner:
    """Model (same seed for every method), optimizer and exchange of ``method``. Collective."""
    comm, bucket = ctx.comm, cfg.bucket_kib * 1024
    model = _model(cfg, vocab, sparse=method in REDUCTIONS)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    broadcast_parameters(model, comm)
    broadcast_optimizer_state(optimizer, comm)
    if method in REDUCTIONS:
        dist = DistributedOptimizer(optimizer, model, comm=comm, reduction=method,
                                    bucket_kib=cfg.bucket_kib)
        runner = _Runner(method, model, dist, lambda: dist.memory.peak)
        before = [0]

        def pre(*_: Any) -> None:
            before[0] = comm.ledger.bytes_received()

        def post(*_: Any) -> None:
            runner.exchanged += comm.ledger.bytes_received() - before[0]

        dist.register_step_pre_hook(pre)
        dist.register_step_post_hook(post)
        return runner
    if method == "ddp":
        net = peers.ddp(comm, model, bucket)
        runner = _Runner(method, net, optimizer, lambda: peers.ddp_bucket_bytes(net))

        def counted() -> None:
            runner.exchanged += peers.ddp_bucket_bytes(net) or 0

        runner.after_step = counted
        return runner
    # Horovod's step() waits for its own allreduces; it reports no exchange memory.
    return _Runner(method, model, peers.horovod_optimizer(model, optimizer), lambda: None)


def _measure(cfg: ReductionConfig, ctx: RunContext, runners: list[_Runner],
             stream: TrainStream) -> None:
    """Step every method on the same batch, in an order rotated each step, so that changes of
    machine load hit all methods alike; time the steps after ``warmup``. Collective."""
    comm = ctx.comm
    torch.manual_seed(1 + comm.rank)
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            for r in runners:
                r.exchanged = 0
            comm.barrier()
        batch = stream.batch(step)
        shift = step % len(runners)
        for r in runners[shift:] + runners[:shift]:
            start = time.perf_counter()
            _, n, _ = train_step(comm, r.net, batch, r.optimizer, 0.1, cfg.lr)
            r.after_step()
            if step >= cfg.warmup:
                r.times.append(time.perf_counter() - start)
                r.tokens.append(n)


def _row(cfg: ReductionConfig, comm: Any, r: _Runner) -> dict[str, Any]:
    """The table row of one measured method (collective: slowest rank's values)."""
    step_s = comm.allreduce(median(r.times), op="max")
    peak = r.memory()
    peak = comm.allreduce(peak, op="max") if peak is not None else None
    moved = comm.allreduce(r.exchanged / cfg.steps, op="max") if r.method != "horovod" else None
    return {"P": comm.size, "method": r.method, "step_ms": step_s * 1e3,
            "tokens_per_s": float(np.mean(r.tokens)) / step_s, "exchange_peak_bytes": peak,
            "exchange_peak_KiB": peak / 1024 if peak is not None else None,
            "recv_KiB_per_step": moved / 1024 if moved is not None else None}


def _merge(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of other P already in ``path`` plus ``rows``; rewrites ``path`` atomically."""
    sizes = {r["P"] for r in rows}
    old = [r for r in read_metrics(path) if r["P"] not in sizes] if path.is_file() else []
    merged = sorted(old + rows, key=lambda r: (r["P"], METHODS.index(r["method"])))
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in merged))
    return merged


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ddp = {r["P"]: r["step_ms"] for r in rows if r["method"] == "ddp"}
    return [{**r, "vs_ddp": ddp[r["P"]] / r["step_ms"] if r["P"] in ddp else None}
            for r in rows]


def run(cfg: ReductionConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    vocab = len(read_vocab(cfg.data.path))
    shard = read_shard(cfg.data.path, "train", comm.rank, comm.size)
    stream = TrainStream(shard, cfg.batch_per_rank, comm.size, cfg.seed, comm.rank)
    skipped: dict[str, str] = {}
    runners = []
    for method in cfg.methods:
        if method == "horovod":
            reason = comm.allgather(peers.horovod_unavailable())
            if any(reason):
                skipped[method] = next(r for r in reason if r)
                ctx.log(f"  horovod: skipped ({skipped[method]}); install it with "
                        "pip install 'hpcml[horovod]' where it builds")
                continue
        runners.append(_setup(cfg, ctx, method, vocab))
    _measure(cfg, ctx, runners, stream)
    rows = [_row(cfg, comm, r) for r in runners]
    for row in rows:
        ctx.log(f"  {row['method']:<17} P={comm.size}: {row['step_ms']:.1f} ms/step")
    comm.ledger.reset()
    summary: dict[str, Any] = {"rows": rows, "skipped": skipped}
    if ctx.is_root:
        everything = _merge(Path(cfg.results), rows) if cfg.results else rows
        table = markdown_table(_with_ratios(everything), [
            ("P", "P", "d"), ("method", "method", ""), ("step_ms", "ms/step", ".1f"),
            ("tokens_per_s", "tokens/s", ".0f"), ("vs_ddp", "DDP time / time", ".2f"),
            ("exchange_peak_KiB", "exchange peak KiB/rank", ".1f"),
            ("recv_KiB_per_step", "received KiB/step/rank", ".1f")])
        notes = "".join(f"\n{m}: skipped ({why})" for m, why in skipped.items())
        notes += (f"\nP={comm.size} run on {platform.node()}: {os.cpu_count()} cores, load "
                  f"average {os.getloadavg()[0]:.1f} at the end")
        ctx.run_dir.write_text("table.md", table + "\n" + notes + "\n")
        print(table + notes)
        _plot(everything, ctx)
    return summary


def _plot(rows: list[dict[str, Any]], ctx: RunContext) -> None:
    plt = pyplot()

    panels = [("exchange_peak_KiB", "exchange peak memory per rank (KiB)"),
              ("recv_KiB_per_step", "received per step per rank (KiB)"),
              ("step_ms", "time per step (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
            sel = [r for r in rows if r["method"] == method and r[key] is not None]
            ax.plot([r["P"] for r in sel], [r[key] for r in sel], "o-", label=method)
        ax.set_xlabel("ranks P")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({r["P"] for r in rows}))
        ax.legend(fontsize=8)
    fig.suptitle("gradient exchange of the transformer (weak scaling)")
    save_figure(fig, ctx.run_dir.path / "reduction.png")


def validate_data(cfg: ReductionConfig, comm: Communicator) -> None:
    """The corpus is well formed (each rank checks its block) and one step fits."""
    sizes = validate_corpus(cfg.data.path, comm.rank, comm.size)
    steps_per_epoch(sizes["train"], cfg.batch_per_rank, comm.size, "batch_per_rank")


JOB = JobKind(config=ReductionConfig, run=run,
              description="sparse allgather vs dense allreduce vs torch DDP (memory, bytes, time)",
              validate_data=validate_data)
