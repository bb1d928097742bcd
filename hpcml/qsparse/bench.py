"""``hpcml bench qsparse``: bits to a target accuracy, Qsparse-local-SGD against its baselines.

Same data (digits), model (MLP), seed, minibatch, learning rate and number of local iterations
for every method; only what is communicated differs (arXiv 1906.02367, Section 5):

==============  =====================================================================
vanilla         distributed SGD: dense float32 gradient ``Allreduce`` every step
topk            error-compensated Top-k every step (H = 1)
qsgd            error-compensated QSGD (s levels, Lemma 1 scaling) every step (H = 1)
local           local SGD: uncompressed model averaging every H steps
qsparse-sync    Q_s o Top-k with error compensation every H steps, all workers together
qsparse-async   the same, asynchronous: rank 0 serves, worker w syncs every periods[w]
==============  =====================================================================

Per method: exact uplink bits per worker until the test accuracy first reaches ``target``
(and in total), training wall time to target and in total (rank 0, evaluation excluded),
final accuracy, the bits ratio against vanilla, and the bytes each worker really handed to
MPI (ledger: payloads rounded up to whole bytes, plus the Allgather of sizes and the
start-up broadcast). Rows a method cannot run (async on 1 rank) are skipped and said so. An
untimed short vanilla run first absorbs one-time start-up costs. Writes ``table.md``,
``curves.json`` and ``qsparse.png`` (accuracy against bits per worker, log x; and against wall
time).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hpcml.bench.report import markdown_table, pyplot, save_figure
from hpcml.comm import StragglerConfig
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.qsparse.data import load_digits_h5, mlp_dimension, validate_digits
from hpcml.qsparse.train import (
    CompressorConfig,
    DataConfig,
    QsparseConfig,
    Result,
    TrainConfig,
    check_setup,
    compressor_of,
    train,
)

METHODS = ("vanilla", "topk", "qsgd", "local", "qsparse-sync", "qsparse-async")


@dataclasses.dataclass
class BenchQsparseConfig(JobConfig):
    methods: list[str] = option(list(METHODS), choices=METHODS, nonempty=True,
                                help="methods to run")
    k: int = option(48, min=1, help="Top-k coordinates (topk, qsparse)")
    s: int = option(15, min=1, help="QSGD levels (qsgd, qsparse)")
    data: DataConfig = option(DataConfig())
    train: TrainConfig = option(TrainConfig(H=8, eval_every=10, target=0.93),
                                help="shared training settings; train.H is used by 'local' "
                                "and 'qsparse-*' (the others sync every step)")
    stragglers: StragglerConfig = option(StragglerConfig())

    def check(self, size: int) -> None:
        if size < 2 and set(self.methods) == {"qsparse-async"}:
            raise ConfigError("methods", "['qsparse-async'] needs >= 2 ranks (rank 0 serves), so "
                              "one rank would measure nothing", "launch with mpiexec -n 2 or "
                              "more, or add a method")
        if self.k > mlp_dimension(self.data.hidden):
            raise ConfigError("k", f"k = {self.k} exceeds the model dimension d = "
                              f"{mlp_dimension(self.data.hidden)}", "use a smaller k")
        for method in self.methods:
            cfg = method_config(self, method)
            check_setup(cfg.mode, cfg.compressor, cfg.data, cfg.train, max(size, 2))


def method_config(cfg: BenchQsparseConfig, method: str) -> QsparseConfig:
    """The ``qsparse`` job that runs ``method`` with the bench's shared settings."""
    comp, H, mode = {
        "vanilla": ("identity", 1, "allreduce"), "topk": ("topk", 1, "sync"),
        "qsgd": ("qsgd", 1, "sync"), "local": ("identity", cfg.train.H, "sync"),
        "qsparse-sync": ("qtopk", cfg.train.H, "sync"),
        "qsparse-async": ("qtopk", cfg.train.H, "async"),
    }[method]
    return QsparseConfig(kind="qsparse", seed=cfg.seed, mode=mode,
                         compressor=CompressorConfig(comp, cfg.k, cfg.s), data=cfg.data,
                         train=dataclasses.replace(cfg.train, H=H),
                         stragglers=cfg.stragglers)


def row(method: str, cfg: QsparseConfig, result: Result, target: float, d: int,
        ranks: int) -> dict[str, Any]:
    reached = next((p for p in result.curve if p["accuracy"] >= target), None)
    comp = compressor_of(cfg.compressor)
    return {"method": method, "compressor": "allreduce" if cfg.mode == "allreduce" else comp.name,
            "H": cfg.train.H, "workers": ranks - 1 if cfg.mode == "async" else ranks,
            "bits_per_sync": 32 * d if cfg.mode == "allreduce" else comp.bits(d),
            "bits_to_target": reached["bits"] if reached else None,
            "seconds_to_target": reached["seconds"] if reached else None,
            "bits_total": result.bits_per_worker, "seconds": result.seconds,
            "final_accuracy": result.final_accuracy, "curve": result.curve}


def run(cfg: BenchQsparseConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    split = load_digits_h5(cfg.data.path)
    d = mlp_dimension(cfg.data.hidden)
    target = cfg.train.target
    rows, skipped = [], []
    warmup = method_config(cfg, "vanilla")
    warmup.train = dataclasses.replace(warmup.train, steps=cfg.train.eval_every)
    train(warmup, comm, split)  # untimed: first-call costs of torch and MPI
    for method in cfg.methods:
        job = method_config(cfg, method)
        if job.mode == "async" and comm.size < 2:
            skipped.append(method)
            ctx.log(f"  {method:<14} skipped: needs >= 2 ranks (rank 0 serves)")
            continue
        comm.ledger.reset()
        result = train(job, comm, split)
        sent = comm.allgather(comm.ledger.bytes_sent())
        if ctx.is_root:
            rows.append(row(method, job, result, target, d, comm.size))
            workers = sent[1:] if job.mode == "async" else sent
            rows[-1]["mpi_bytes"] = sum(workers) / len(workers)
            r = rows[-1]
            ctx.log(f"  {method:<14} final accuracy {r['final_accuracy']:.4f}, "
                    f"{r['bits_total']:.4g} bits/worker, {r['seconds']:.2f} s")
    if not ctx.is_root:
        return {}
    base = next((r for r in rows if r["method"] == "vanilla"), None)
    for r in rows:
        ok = base is not None and base["bits_to_target"] and r["bits_to_target"]
        r["bits_ratio"] = base["bits_to_target"] / r["bits_to_target"] if ok else None
        r["accuracy_drop_points"] = (100 * (base["final_accuracy"] - r["final_accuracy"])
                                     if base else None)
    table = markdown_table(rows, [
        ("method", "method", ""), ("compressor", "compressor", ""), ("H", "H", "d"),
        ("workers", "workers", "d"), ("bits_per_sync", "bits/sync", "d"),
        ("bits_to_target", f"bits/worker to {target:.0%}", ".4g"),
        ("bits_ratio", "vanilla/method bits", ".1f"),
        ("seconds_to_target", "s to target", ".2f"), ("bits_total", "bits/worker total", ".4g"),
        ("mpi_bytes", "MPI bytes/worker", ".4g"),
        ("seconds", "train s", ".2f"), ("final_accuracy", "final acc", ".4f"),
        ("accuracy_drop_points", "drop vs vanilla (pts)", ".2f")])
    note = (f"\n{comm.size} ranks, d = {d}, {cfg.train.steps} local steps/worker, batch "
            f"{cfg.train.batch}, lr {cfg.train.lr}; bits = exact uplink payload per worker"
            + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    ctx.run_dir.write_text("table.md", table + "\n" + note + "\n")
    ctx.run_dir.write_json("curves.json", {r["method"]: r["curve"] for r in rows})
    print(table + "\n" + note)
    _plot(rows, target, comm.size, ctx)
    return {"rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
            "target": target, "d": d, "skipped": skipped}


def _plot(rows: list[dict[str, Any]], target: float, ranks: int, ctx: RunContext) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        bits = [max(p["bits"], 1) for p in r["curve"]]
        acc = [p["accuracy"] for p in r["curve"]]
        axes[0].plot(bits, acc, ".-", label=r["method"])
        axes[1].plot([p["seconds"] for p in r["curve"]], acc, ".-", label=r["method"])
    for ax, xlabel in zip(axes, ("uplink bits per worker", "training wall time (s)"),
                          strict=True):
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.5, 1.0)
        ax.legend(fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_title(f"Qsparse-local-SGD vs baselines, digits MLP, {ranks} ranks")
    save_figure(fig, ctx.run_dir.path / "qsparse.png")


JOB = JobKind(config=BenchQsparseConfig, run=run,
              description="Qsparse-local-SGD vs vanilla/top-k/QSGD/local SGD: bits to target",
              validate_data=lambda cfg, comm: validate_digits(cfg.data.path, comm.size))
