"""``hpcml bench reduction``: gradient exchange of the transformer at the P it is launched with.

On the same model (seed), data and optimizer, in the same run, every method takes ``warmup``
untimed then ``steps`` timed steps. Data: each rank's shard of the corpus, ``batch_per_rank``
sentences per rank per step (weak scaling); or, with ``synthetic.vocab`` set, token batches of
Zipf-distributed ids at the paper's scale (:mod:`hpcml.nmt.synthetic`): ``batch_tokens`` target
tokens per rank (``scaling = "weak"``) or per step in total (``"strong"``). With ``interleave``
the methods alternate step by step on the same batch (in an order rotated every step), so that
drift in machine load hits them alike; without it they run one after the other, each alone in
the process with its peak RSS reset first (:mod:`hpcml.bench.rss`), so that the process's peak
resident memory per rank is each method's own. Horovod's methods step last, each alone, either
way (:func:`schedule`: its background thread would slow the others):

- ``sparse_allgather`` / ``dense_allreduce`` / ``auto``: the reductions of
  :class:`hpcml.parallel.DistributedOptimizer`; exchange memory is their measured peak of
  exchange buffers (:class:`~hpcml.parallel.ExchangeMemory`), bytes are the ledger's received
  bytes of the exchange (taken around ``optimizer.step()``, where every request completes);
- ``ddp``: torch DDP over gloo on the all-dense model; memory = its reducer's bucket sizes; its
  traffic is not in the ledger and is given by the ledger's convention for an allreduce of those
  buckets (received = bucket bytes); ``ddp_hpcml``: the same DDP over the ``"hpcml"``
  torch.distributed backend (:mod:`hpcml.distributed`), its bytes the ledger's own count of
  its gradient allreduces;
- ``horovod`` / ``horovod_sparse``: Horovod with ``sparse_as_dense=True`` / ``False`` on the
  sparse-gradient model, when ``horovod.torch`` imports (``make horovod``); otherwise skipped
  with the reason. Horovod reports neither buffers nor bytes: compare its peak RSS.
- ``hpcml_horovod``: the ``horovod`` method's code (``HorovodPeer``) with ``hpcml.horovod``
  instead of ``horovod.torch`` (always available); its buffers and bytes are hpcml's (the
  dense buckets, plus the 128-byte header of ``join()`` per step).

Step time is each rank's median, then the slowest rank's; tokens/s = global target tokens per
step / that time; ``vs_ddp`` = DDP step time / method step time (> 1: faster than DDP);
``efficiency`` against the smallest P of the method in the results (weak: T(P0) / T(P); strong:
T(P0) P0 / (T(P) P)). Run it once per P (``mpiexec -n P``); with ``results`` set, each run
appends its rows to that JSON-lines file (:mod:`hpcml.bench.results`: nothing in it is ever
rewritten; a later run at the same P supersedes the earlier one's rows in the tables) and
table.md + reduction.png cover every P in it, and with ``projection.ranks`` set, projection.md +
projection.png extrapolate them to the paper's machine (:mod:`hpcml.nmt.projection`).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.bench import results
from hpcml.bench.report import markdown_table, median, pyplot, save_figure
from hpcml.bench.rss import peak_rss_bytes, reset_peak_rss
from hpcml.comm import Communicator
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError, UsageError
from hpcml.jobs import JobKind, RunContext
from hpcml.nmt import peers
from hpcml.nmt.config import DataConfig, ModelConfig, check_model, check_model_data
from hpcml.nmt.data import TrainStream, read_shard, read_vocab, steps_per_epoch, validate_corpus
from hpcml.nmt.model import Transformer
from hpcml.nmt.projection import ProjectionConfig, write_projection
from hpcml.nmt.step import train_step
from hpcml.nmt.synthetic import SyntheticConfig, SyntheticStream
from hpcml.nmt.vocab import SPECIALS
from hpcml.parallel import (
    REDUCTIONS,
    DistributedOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from hpcml.report.scaling import fit_bench

HOROVOD = {"horovod": True, "horovod_sparse": False}  # method -> sparse_as_dense
HPCML_HOROVOD = "hpcml_horovod"  # the same peer code through hpcml.horovod
METHODS = (*REDUCTIONS, *peers.DDP_BACKENDS, *HOROVOD, HPCML_HOROVOD)


@dataclasses.dataclass
class ReductionConfig(JobConfig):
    model: ModelConfig = option(ModelConfig())
    data: DataConfig = option(DataConfig())
    methods: list[str] = option(["sparse_allgather", "dense_allreduce", "ddp", "horovod",
                                 "hpcml_horovod"],
                                choices=METHODS, nonempty=True, help="exchanges and peers to time")
    synthetic: SyntheticConfig = option(SyntheticConfig())
    scaling: str = option("weak", choices=("weak", "strong"),
                          help="weak: fixed work per rank; strong: fixed work per step "
                               "(strong needs synthetic token batches)")
    batch_per_rank: int = option(32, min=1, help="sentences per rank per step (corpus data)")
    batch_tokens: int = option(0, min=0, help="target tokens per rank (weak) or per step "
                                              "(strong) of synthetic batches")
    interleave: bool = option(True, help="alternate the methods step by step (else one after "
                                         "the other, each with its own peak RSS); Horovod's "
                                         "always step last, alone")
    projection: ProjectionConfig = option(ProjectionConfig())
    steps: int = option(30, min=1, help="timed steps per method")
    warmup: int = option(5, min=0, help="untimed steps per method first")
    bucket_kib: int = option(1024, min=1, help="fused bucket size (hpcml and DDP), KiB")
    lr: float = option(1e-4, gt=0.0, help="constant learning rate during the benchmark")
    results: str = option("", help="JSON-lines file that collects rows over runs at several P "
                                   "('' = this run only)")

    def check(self, size: int) -> None:
        if self.synthetic.vocab:
            check_model(self.model)
            if self.synthetic.vocab <= len(SPECIALS):
                raise ConfigError("synthetic.vocab", f"{self.synthetic.vocab} leaves no "
                                  "ordinary tokens", "use e.g. 32768 (0 = corpus data)")
            if self.batch_tokens < size:
                raise ConfigError("batch_tokens", f"{self.batch_tokens} tokens cannot give "
                                  f"each of {size} ranks a sentence", "use e.g. 512")
        else:
            check_model_data(self.model, self.data, self.batch_per_rank * size, size,
                             "batch_per_rank")
            if self.scaling == "strong":
                raise ConfigError("scaling", "strong scaling needs a fixed global token "
                                  "batch", "set synthetic.vocab and batch_tokens")
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
    close: Callable[[], None] = lambda: None
    exchanged: int = 0
    rss: int | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)


def _setup(cfg: ReductionConfig, ctx: RunContext, method: str, vocab: int) -> _Runner:
    """Model (same seed for every method), optimizer and exchange of ``method``. Collective."""
    comm, bucket = ctx.comm, cfg.bucket_kib * 1024
    model = _model(cfg, vocab, sparse=method not in peers.DDP_BACKENDS)
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
        runner.close = dist.reducer.remove_hooks
        return runner
    if method in peers.DDP_BACKENDS:
        net = peers.ddp(comm, model, bucket, peers.DDP_BACKENDS[method])
        runner = _Runner(method, net, optimizer, lambda: peers.ddp_bucket_bytes(net))
        seen = [peers.torch_allreduce_bytes(comm)]

        def counted() -> None:
            if method == "ddp":
                runner.exchanged += peers.ddp_bucket_bytes(net) or 0
            else:  # the ledger's count of this step's gradient allreduces
                now = peers.torch_allreduce_bytes(comm)
                runner.exchanged += now - seen[0]
                seen[0] = now

        runner.after_step = counted
        return runner
    if method == HPCML_HOROVOD:
        import hpcml.horovod

        peer = peers.HorovodPeer(model, optimizer, True, hvd=hpcml.horovod)
        runner = _Runner(method, model, peer, lambda: peer.optimizer.memory.peak)
        step = peer.step

        def counted_step() -> None:
            before = comm.ledger.bytes_received()
            step()
            runner.exchanged += comm.ledger.bytes_received() - before

        peer.step = counted_step  # type: ignore[method-assign]
        runner.close = peer.optimizer.reducer.remove_hooks
        return runner
    return _Runner(method, model, peers.HorovodPeer(model, optimizer, HOROVOD[method]),
                   lambda: None)


def _measure(cfg: ReductionConfig, ctx: RunContext, runners: list[_Runner],
             stream: TrainStream | SyntheticStream) -> None:
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
    moved = (comm.allreduce(r.exchanged / cfg.steps, op="max") if r.method not in HOROVOD
             else None)
    rss = comm.allreduce(r.rss, op="max") if r.rss is not None else None
    return {"P": comm.size, "method": r.method, "scaling": cfg.scaling,
            "step_ms": step_s * 1e3, "tokens_per_s": float(np.mean(r.tokens)) / step_s,
            "exchange_peak_bytes": peak,
            "exchange_peak_KiB": peak / 1024 if peak is not None else None,
            "recv_KiB_per_step": moved / 1024 if moved is not None else None,
            "recv_bytes_per_step": moved, "rss_peak_bytes": rss,
            "rss_peak_MiB": rss / 2**20 if rss is not None else None}


# keys of a row (see _row): counts that must be positive numbers, and measurements a method may
# not report (None)
_POSITIVE = ("step_ms", "tokens_per_s")
_OPTIONAL = ("exchange_peak_bytes", "exchange_peak_KiB", "recv_KiB_per_step",
             "recv_bytes_per_step", "rss_peak_bytes", "rss_peak_MiB")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def is_row(obj: Any) -> bool:
    """Whether ``obj`` (a parsed JSON line) is a row this bench writes, with every key its
    tables and projection read (pure)."""
    return (isinstance(obj, dict) and type(obj.get("P")) is int and obj["P"] >= 1
            and obj.get("method") in METHODS and obj.get("scaling", "weak") in ("weak", "strong")
            and all(_number(obj.get(k)) and obj[k] > 0 for k in _POSITIVE)
            and all(obj.get(k) is None or _number(obj[k]) for k in _OPTIONAL))


def latest_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the last run at each P, in file order ``rows`` (pure): a row starts a new run
    of its P when its ``run`` (the run directory; absent in rows of older versions, which kept
    one run per P) differs from the previous row of that P. Sorted by P, then method."""
    last: dict[int, tuple[Any, list[dict[str, Any]]]] = {}
    for row in rows:
        run = row.get("run")
        if row["P"] not in last or last[row["P"]][0] != run:
            last[row["P"]] = (run, [])
        last[row["P"]][1].append(row)
    merged = [r for _, group in last.values() for r in group]
    return sorted(merged, key=lambda r: (r["P"], METHODS.index(r["method"])))


def _merge(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append ``rows`` to results file ``path`` and return the last run's rows of every P in
    it (rank 0)."""
    results.append(path, rows)
    return latest_runs([r for r in results.read(path) if is_row(r)])


def efficiency(scaling: str, p0: int, t0: float, p: int, t: float) -> float:
    """Weak: T(P0) / T(P); strong: T(P0) P0 / (T(P) P) (pure)."""
    return t0 / t * (p0 / p if scaling == "strong" else 1.0)


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ddp = {r["P"]: r["step_ms"] for r in rows if r["method"] == "ddp"}
    base = {}
    for r in sorted(rows, key=lambda r: -r["P"]):
        base[r["method"]] = r
    return [{"rss_peak_MiB": None, **r,
             "vs_ddp": ddp[r["P"]] / r["step_ms"] if r["P"] in ddp else None,
             "efficiency": efficiency(r.get("scaling", "weak"), base[r["method"]]["P"],
                                      base[r["method"]]["step_ms"], r["P"], r["step_ms"])}
            for r in rows]


def _stream(cfg: ReductionConfig,
            comm: Communicator) -> tuple[int, TrainStream | SyntheticStream]:
    """(vocabulary size, this rank's batches) of the configured data. Not collective."""
    if cfg.synthetic.vocab:
        budget = cfg.batch_tokens * (comm.size if cfg.scaling == "weak" else 1)
        return cfg.synthetic.vocab, SyntheticStream(cfg.synthetic, budget, cfg.seed, comm.rank,
                                                    comm.size)
    shard = read_shard(cfg.data.path, "train", comm.rank, comm.size)
    return (len(read_vocab(cfg.data.path)),
            TrainStream(shard, cfg.batch_per_rank, comm.size, cfg.seed, comm.rank))


def _measure_alone(cfg: ReductionConfig, ctx: RunContext, method: str, vocab: int,
                   stream: TrainStream | SyntheticStream) -> dict[str, Any]:
    """Set up, measure and tear down one method, with the peak RSS reset (after freeing the
    previous method) before its setup and read after its last step; returns its row.
    Collective."""
    gc.collect()
    reset_peak_rss()
    runner = _setup(cfg, ctx, method, vocab)
    _measure(cfg, ctx, [runner], stream)
    runner.rss = peak_rss_bytes()
    runner.close()
    return _row(cfg, ctx.comm, runner)


def schedule(methods: list[str], interleave: bool) -> list[list[str]]:
    """The groups of ``methods`` in the order they are measured; a group of several alternates
    step by step, a group of one steps alone (pure). With ``interleave`` the methods other than
    Horovod's form one group; without, each is alone. Horovod's methods always come last, each
    alone: ``hvd.init()`` starts a background thread that lives until the process ends and runs
    Horovod's negotiation (MPI collectives) every few milliseconds, which slows every method
    stepping beside it (paper preset, 4 ranks on 2 cores: ``dense_allreduce`` and DDP 1.9x
    slower when they alternate with ``horovod``)."""
    others = [m for m in methods if m not in HOROVOD]
    groups = [others] if interleave and others else [[m] for m in others]
    return groups + [[m] for m in methods if m in HOROVOD]


def run(cfg: ReductionConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    vocab, stream = _stream(cfg, comm)
    skipped: dict[str, str] = {}
    methods = []
    for method in cfg.methods:
        if method in HOROVOD:
            reason = comm.allgather(peers.horovod_unavailable())
            if any(reason):
                skipped[method] = next(r for r in reason if r)
                ctx.log(f"  {method}: skipped ({skipped[method]}); build it with make horovod")
                continue
        methods.append(method)
    rows = []
    for group in schedule(methods, cfg.interleave):
        if len(group) == 1:
            rows.append(_measure_alone(cfg, ctx, group[0], vocab, stream))
            continue
        runners = [_setup(cfg, ctx, method, vocab) for method in group]
        _measure(cfg, ctx, runners, stream)
        rows += [_row(cfg, comm, r) for r in runners]
    if cfg.interleave and any(m in HOROVOD for m in methods):
        ctx.log("  Horovod stepped after the others, alone: its background thread would slow "
                "every method it alternates with")
    for row in rows:
        ctx.log(f"  {row['method']:<17} P={comm.size}: {row['step_ms']:.1f} ms/step")
    comm.ledger.reset()
    rows = [{**row, "run": str(ctx.run_dir.path)} for row in rows]
    summary: dict[str, Any] = {"rows": rows, "skipped": skipped}
    if ctx.is_root:
        everything = _merge(Path(cfg.results), rows) if cfg.results else rows
        table = markdown_table(_with_ratios(everything), [
            ("P", "P", "d"), ("method", "method", ""), ("step_ms", "ms/step", ".1f"),
            ("tokens_per_s", "tokens/s", ".0f"), ("vs_ddp", "DDP time / time", ".2f"),
            ("efficiency", f"{cfg.scaling} efficiency", ".2f"),
            ("exchange_peak_KiB", "exchange peak KiB/rank", ".1f"),
            ("recv_KiB_per_step", "received KiB/step/rank", ".1f"),
            ("rss_peak_MiB", "peak RSS MiB/rank", ".0f")])
        notes = "".join(f"\n{m}: skipped ({why})" for m, why in skipped.items())
        notes += (f"\nP={comm.size} run on {platform.node()}: {os.cpu_count()} cores, load "
                  f"average {os.getloadavg()[0]:.1f} at the end")
        ctx.run_dir.write_text("table.md", table + "\n" + notes + "\n")
        print(table + notes)
        _plot(everything, cfg.scaling, ctx)
        if cfg.projection.ranks:
            summary["projection"] = write_projection(everything, cfg, ctx.run_dir)
    return summary


def _plot(rows: list[dict[str, Any]], scaling: str, ctx: RunContext) -> None:
    plt = pyplot()
    rows = _with_ratios(rows)
    panels = [("exchange_peak_KiB", "exchange peak memory per rank (KiB)"),
              ("recv_KiB_per_step", "received per step per rank (KiB)"),
              ("rss_peak_MiB", "peak RSS per rank (MiB)"),
              ("step_ms", "time per step (ms)"), ("efficiency", f"{scaling} efficiency")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
            sel = [r for r in rows if r["method"] == method and r.get(key) is not None]
            ax.plot([r["P"] for r in sel], [r[key] for r in sel], "o-", label=method)
        ax.set_xlabel("ranks P")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({r["P"] for r in rows}))
        ax.legend(fontsize=8)
    fig.suptitle(f"gradient exchange of the transformer ({scaling} scaling)")
    save_figure(fig, ctx.run_dir.path / "reduction.png")


def validate_data(cfg: ReductionConfig, comm: Communicator) -> None:
    """The corpus is well formed (each rank checks its block) and one step fits (synthetic
    batches read no corpus); rank 0 checks the ``results`` file (:func:`results.check`) and the
    ``projection.bench`` run (alpha-beta fits to it); methods that are all Horovod need it to
    import (else the run would measure nothing)."""
    if set(cfg.methods) <= set(HOROVOD):
        reason = peers.horovod_unavailable()
        if reason:
            raise ConfigError("methods", f"{cfg.methods} need Horovod, which does not import "
                              f"({reason}), so the run would measure nothing",
                              "build it with make horovod, or add e.g. 'dense_allreduce'")
    if comm.rank == 0:
        if cfg.results:
            results.check("results", cfg.results, is_row, "bench reduction")
        if cfg.projection.bench:
            try:
                fit_bench(cfg.projection.bench)
            except UsageError as exc:
                raise UsageError(f"projection.bench: {exc}") from None
    if cfg.synthetic.vocab:
        return
    sizes = validate_corpus(cfg.data.path, comm.rank, comm.size)
    steps_per_epoch(sizes["train"], cfg.batch_per_rank, comm.size, "batch_per_rank")


JOB = JobKind(config=ReductionConfig, run=run,
              description="sparse allgather vs dense allreduce vs torch DDP (memory, bytes, time)",
              validate_data=validate_data)
