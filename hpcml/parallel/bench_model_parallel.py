"""``hpcml bench model-parallel``: the hpcml transformer split across ranks in every layout.

Each layout of :data:`LAYOUTS` whose rank count fits the job runs on the first ``ranks`` ranks
(the others wait without spinning), for every model of :data:`MODELS` (the hpcml transformer
and a deeper, wider one), on synthetic sentences of varying length (PAD-filled, a new length
distribution each step). Per layout:

- correctness: the first step's loss and gradients against the single-process model on the
  same global batch (every rank computes that reference itself): ``loss_abs_diff`` (largest
  over ranks) and ``grad_max_abs_diff`` (largest over parameters, gradients gathered whole to
  the first rank), ``grad_max_rel_diff`` (that difference over the parameter's largest
  reference gradient);
- memory per rank (largest over the layout's ranks): parameters, gradients and Adam state that
  the rank holds, the peak bytes of activations saved for backward (in-flight microbatches of
  the schedule) and of the data-parallel reduction buffers; ``peak_bytes_per_rank`` is their
  sum;
- time: median step (forward, backward, gradient reductions, optimizer) over ``steps`` after
  ``warmup``, slowest rank; tokens/s = global target tokens / step time; the measured bubble
  (mean over stages of 1 - busy / step time) beside the theoretical (S-1)/(v M+S-1) (v = 1
  but for interleaved 1F1B's ``virtual_stages``).
- mixed precision (``-bf16``/``-fp16`` layouts, :mod:`hpcml.parallel.precision`): the diffs are
  against the single-process run of the same recipe (autocast, same loss scale);
  ``grad_rel_diff_vs_fp32`` gives the difference from the float32 single-process run.

Every layout builds its model the way a user script would (the order documented in
:mod:`hpcml.parallel.pipeline`): tensor-parallel layouts split the whole model with
:func:`~hpcml.parallel.tensor.parallelize` (heads, feed-forward columns/rows, vocabulary rows of
the tied embedding) and compute the loss with
:func:`~hpcml.parallel.tensor.vocab_parallel_cross_entropy` on the last stage; every layout then
wraps it in a :class:`~hpcml.parallel.PipelineModel` over the layout's mesh (one stage when
``pipeline`` is 1). ``-zero1`` layouts build it with ``data_reduction="optimizer"`` and shard
Adam's state over the data group with a :class:`~hpcml.parallel.ShardedOptimizer` over
``pmodel.parameters()`` (it reduce-scatters the gradients); their gradients are read from the
optimizer's reduced shards. ``-zero2`` / ``-zero3`` layouts use ZeRO stage 2 / 3 (gradients,
and parameters, sharded too; ZeRO-3 units: the transformer layers, or pipelined the pipeline's
units), given the pipeline model; ``-clip`` clips the global gradient norm with
:func:`~hpcml.parallel.clip_grad_norm_` and compares with the single-process gradient clipped
as torch does. For the comparison the gradients are gathered whole to the first
rank with :meth:`~hpcml.parallel.PipelineModel.gather_full` (tensor shards within each stage,
then the stages), the same gather that writes full checkpoints.

Loss per microbatch = label-smoothed cross entropy summed over its tokens x D / global tokens,
so that the data-parallel average of the summed microbatch gradients is the gradient of the
global mean loss, which the reference computes directly.

At scale (``jobs/bench-model-parallel-big.toml``): ``deferred = true`` builds every model with
:func:`~hpcml.parallel.deferred.deferred_init` (traced on the meta device, each rank
materializes its stage's tensor shards only; the reference is the one-process materialized
model), ``unchecked_models`` skips the one-process reference and the gradient gather for
models too big for one process, and every row reports ``model_state_bytes`` (fp32 weights +
gradients + Adam state of the whole model), ``peak_rss_bytes_per_rank`` (largest VmHWM) and
their ratio ``state_over_rss``.

Layouts are rows of :data:`LAYOUTS` (data, pipeline, tensor sizes and schedule): a new kind of
parallelism plugs in by adding rows and its case in :func:`_parallelize` (the model and its
optimizer).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from hpcml.bench.report import human_bytes, markdown_table, median, pyplot, save_figure
from hpcml.bench.rss import peak_rss_bytes, reset_peak_rss
from hpcml.comm import Communicator
from hpcml.comm.polling import poll_all
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.nmt.model import Transformer, smoothed_loss_sum
from hpcml.nmt.vocab import PAD
from hpcml.parallel.clip import clip_grad_norm_
from hpcml.parallel.deferred import deferred_init, materialize
from hpcml.parallel.mesh import Mesh
from hpcml.parallel.pipeline import PipelineModel, step
from hpcml.parallel.pipeline_schedule import theoretical_bubble
from hpcml.parallel.precision import MixedPrecision
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.tensor import parallelize, vocab_parallel_cross_entropy


@dataclasses.dataclass(frozen=True)
class Layout:
    data: int = 1
    pipeline: int = 1
    tensor: int = 1
    schedule: str = "1f1b"
    recompute: bool = False  # activation checkpointing of every stage
    zero: bool = False  # optimizer state sharded over the data group (ZeRO-1)
    precision: str = "fp32"  # "bf16" / "fp16": MixedPrecision (fp32 master weights)
    virtual_stages: int = 1  # chunks per rank (schedule "interleaved-1f1b")
    stage: int = 1  # with zero: ZeRO stage (2: gradients sharded too, 3: parameters too)
    clip: float = 0.0  # > 0: global gradient clipping to this norm before every step

    @property
    def ranks(self) -> int:
        return self.data * self.pipeline * self.tensor


LAYOUTS: dict[str, Layout] = {
    "single": Layout(),
    "dp2": Layout(data=2),
    "pp2-gpipe": Layout(pipeline=2, schedule="gpipe"),
    "pp2-1f1b": Layout(pipeline=2),
    "pp2-1f1b-recompute": Layout(pipeline=2, recompute=True),
    "dp4": Layout(data=4),
    "pp4-gpipe": Layout(pipeline=4, schedule="gpipe"),
    "pp4-1f1b": Layout(pipeline=4),
    "dp2xpp2": Layout(data=2, pipeline=2),
    "tp2": Layout(tensor=2),
    "tp4": Layout(tensor=4),
    "dp2xtp2": Layout(data=2, tensor=2),
    "dp2-zero1": Layout(data=2, zero=True),
    "dp4-zero1": Layout(data=4, zero=True),
    "dp2xtp2-zero1": Layout(data=2, tensor=2, zero=True),
    "pp2xtp2": Layout(pipeline=2, tensor=2),
    "pp2xtp2-gpipe": Layout(pipeline=2, tensor=2, schedule="gpipe"),
    "pp2-zero1": Layout(pipeline=2, zero=True),
    "dp2xpp2-zero1": Layout(data=2, pipeline=2, zero=True),
    "dp2-bf16": Layout(data=2, precision="bf16"),
    "tp2-bf16": Layout(tensor=2, precision="bf16"),
    "pp2-fp16": Layout(pipeline=2, precision="fp16"),
    "dp2-zero1-bf16": Layout(data=2, zero=True, precision="bf16"),
    "pp2-interleaved": Layout(pipeline=2, schedule="interleaved-1f1b", virtual_stages=2),
    "pp4-interleaved": Layout(pipeline=4, schedule="interleaved-1f1b", virtual_stages=2),
    "dp2-zero2": Layout(data=2, zero=True, stage=2),
    "dp4-zero3": Layout(data=4, zero=True, stage=3),
    "dp2xtp2-zero3": Layout(data=2, tensor=2, zero=True, stage=3),
    "dp2xpp2-zero2": Layout(data=2, pipeline=2, zero=True, stage=2),
    "dp2xpp2-zero3": Layout(data=2, pipeline=2, zero=True, stage=3),
    "dp2-zero3-clip": Layout(data=2, zero=True, stage=3, clip=0.25),
}

MODELS: dict[str, dict[str, int]] = {
    "base": {"d_model": 64, "heads": 4, "layers": 2, "ff": 256},
    "deep": {"d_model": 128, "heads": 4, "layers": 6, "ff": 512},
    # jobs/bench-model-parallel-big.toml: about 480 M parameters (7.6 GB of fp32 training
    # state), built with deferred init; "big-shrunk" is the same architecture, narrow
    "big": {"d_model": 1024, "heads": 16, "layers": 16, "ff": 4096},
    "big-shrunk": {"d_model": 32, "heads": 16, "layers": 16, "ff": 64},
}


@dataclasses.dataclass
class ModelParallelConfig(JobConfig):
    models: list[str] = option(["base", "deep"], choices=tuple(MODELS), nonempty=True,
                               help="transformer sizes (MODELS in bench_model_parallel.py)")
    layouts: list[str] = option(list(LAYOUTS), choices=tuple(LAYOUTS), nonempty=True,
                                help="layouts to run; those needing more ranks than the job "
                                     "are skipped")
    vocab: int = option(1000, min=8, help="vocabulary size (synthetic tokens)")
    batch: int = option(16, min=1, help="global sentences per step")
    min_len: int = option(8, min=2, help="shortest sentence (tokens)")
    max_len: int = option(24, min=2, help="longest sentence (tokens)")
    microbatches: int = option(4, min=1, help="microbatches per step (pipeline layouts)")
    steps: int = option(5, min=1, help="timed steps per layout")
    warmup: int = option(1, min=0, help="untimed steps per layout first")
    lr: float = option(1e-4, gt=0.0, help="Adam learning rate")
    budget_mib: float = option(24.0, gt=0.0, help="per-rank memory budget the table checks "
                                                  "peak bytes against (MiB)")
    checkpoint_stages: list[int] = option([], help="pipeline stages whose activations are "
                                                   "recomputed in backward")
    checkpoint_modules: list[str] = option([], help="modules (dotted names) whose activations "
                                                    "are recomputed in backward")
    deferred: bool = option(False, help="build every model with deferred init "
                                        "(hpcml.parallel.deferred): no rank holds the whole "
                                        "model, each materializes its stage / shard")
    unchecked_models: list[str] = option([], choices=tuple(MODELS),
                                         help="models too big for the one-process reference: "
                                              "no loss/gradient comparison (NaN diffs), no "
                                              "gradient gather")

    def check(self, size: int) -> None:
        if all(LAYOUTS[name].ranks > size for name in self.layouts):
            least = min(LAYOUTS[name].ranks for name in self.layouts)
            raise ConfigError("layouts", f"none of {self.layouts} fits {size} rank"
                              f"{'s' if size > 1 else ''} (the smallest needs {least})",
                              f"launch with mpiexec -n {least} or add 'single'")
        if self.min_len > self.max_len:
            raise ConfigError("min_len", f"{self.min_len} > max_len {self.max_len}",
                              "make min_len <= max_len")
        for name in self.layouts:
            lay = LAYOUTS[name]
            if self.batch % (lay.data * self.microbatches) and lay.ranks <= size:
                raise ConfigError("batch", f"{self.batch} sentences do not split into "
                                  f"{lay.data} replicas x {self.microbatches} microbatches "
                                  f"({name})", "use a multiple of data x microbatches")
            if lay.virtual_stages > 1 and self.microbatches % lay.pipeline and \
                    lay.ranks <= size:
                raise ConfigError("microbatches", f"{self.microbatches} is not a multiple of "
                                  f"the pipeline size {lay.pipeline} ({name}, interleaved "
                                  "1F1B)", f"use microbatches="
                                  f"{-(-self.microbatches // lay.pipeline) * lay.pipeline}")
        for s in self.checkpoint_stages:
            if s < 0:
                raise ConfigError("checkpoint_stages", f"stage {s} < 0", "use stage indices")


def _constructor(cfg: ModelParallelConfig, name: str) -> Callable[[], Transformer]:
    return lambda: Transformer(cfg.vocab, dropout=0.0, sparse=False, max_len=cfg.max_len + 1,
                               **MODELS[name])


def _model(cfg: ModelParallelConfig, name: str) -> Transformer:
    """Model ``name``; with ``cfg.deferred`` on the meta device (:func:`deferred_init`)."""
    build = _constructor(cfg, name)
    if cfg.deferred:
        return deferred_init(build, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return build()


def _batch(cfg: ModelParallelConfig, step_index: int) -> tuple[torch.Tensor, ...]:
    """Global batch ``step_index`` (same on every rank): src, tgt_in, tgt_out, PAD-filled."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + step_index)

    def sentences(extra: int) -> torch.Tensor:
        lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (cfg.batch,), generator=g)
        width = int(lengths.max()) + extra
        ids = torch.randint(4, cfg.vocab, (cfg.batch, width), generator=g)
        ids[torch.arange(width) >= (lengths + extra).unsqueeze(1)] = PAD
        return ids

    src, tgt = sentences(0), sentences(1)
    return src, tgt[:, :-1], tgt[:, 1:]


@step
def _train_step(model: PipelineModel, src: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor, scale: float, tp: Communicator,
                mp: MixedPrecision | None = None) -> torch.Tensor:
    logits = model(src, tgt_in)  # this rank's vocabulary slice under tensor parallelism
    embed = model.module.embed  # its slice bounds: no exchange of the slice sizes per step
    loss = (smoothed_loss_sum(logits, tgt_out, 0.1) if tp.size == 1 else
            vocab_parallel_cross_entropy(logits, tgt_out, tp, vocab_start=embed.vocab_start,
                                         vocab_size=embed.num_embeddings, ignore_index=PAD,
                                         label_smoothing=0.1, reduction="sum")) * scale
    model.backward(mp.scale_loss(loss) if mp is not None else loss)
    return loss


def _precision(name: str, comm: Communicator | None) -> MixedPrecision | None:
    return None if name == "fp32" else MixedPrecision(name, comm)


def _reference(cfg: ModelParallelConfig, name: str, precision: str = "fp32",
               ) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss (global mean) and gradients of the single-process model on batch 0; under
    ``precision`` bf16/fp16 by the layouts' recipe (autocast forward, backward of the loss times
    the same first scale, gradients divided by it)."""
    model = _model(cfg, name)
    if cfg.deferred:
        materialize(model)
    src, tgt_in, tgt_out = _batch(cfg, 0)
    mp = _precision(precision, None)
    with mp.autocast() if mp is not None else contextlib.nullcontext():
        loss = smoothed_loss_sum(model(src, tgt_in), tgt_out, 0.1) / int((tgt_out != PAD).sum())
    (mp.scale_loss(loss) if mp is not None else loss).backward()
    scale = mp.scale if mp is not None else 1.0
    return float(loss.detach()), {n: p.grad / scale for n, p in model.named_parameters()}


def _optimizer_step(pmodel: PipelineModel, optimizer: Any, clip: float = 0.0) -> None:
    """``optimizer.step()``, after global clipping to norm ``clip`` when > 0 (no layout clips
    in mixed precision, whose gradients are still scaled here), through the layout's
    MixedPrecision (unscale, agreed skip)."""
    if clip:
        clip_grad_norm_(optimizer, clip, pipeline=pmodel)
    if pmodel.precision is not None:
        pmodel.precision.step(optimizer)
    else:
        optimizer.step()


def _parallelize(cfg: ModelParallelConfig, layout: Layout, name: str,
                 comm: Communicator) -> tuple[Mesh, PipelineModel, Any]:
    """The mesh of ``layout`` over ``comm``, the model of ``name`` split as ``layout`` and its
    optimizer (collective), in the documented order: tensor-parallel layers over
    ``mesh.tensor`` (:func:`parallelize`), stages over ``mesh.pipeline``, then the optimizer
    over the parameters this rank holds (Adam, its state sharded over the data group under
    ZeRO-1, which then reduces the gradients instead of the pipeline model)."""
    mesh = Mesh(comm, data=layout.data, pipeline=layout.pipeline, tensor=layout.tensor)
    model = _model(cfg, name)
    if layout.tensor > 1:
        parallelize(model, mesh.tensor)
    src, tgt_in, _ = _batch(cfg, 0)
    micro = cfg.batch // (layout.data * cfg.microbatches)
    pmodel = PipelineModel(model, mesh, sample=(src[:micro], tgt_in[:micro]),
                           microbatches=cfg.microbatches, schedule=layout.schedule,
                           virtual_stages=layout.virtual_stages,
                           precision=_precision(layout.precision, mesh.world),
                           checkpoint_stages=(range(layout.pipeline) if layout.recompute
                                              else cfg.checkpoint_stages),
                           checkpoint_modules=cfg.checkpoint_modules,
                           data_reduction="optimizer" if layout.zero else "allreduce")
    if layout.zero:
        # ZeRO-3 units: the encoder and decoder layers (the embedding, read again by the tied
        # output projection, stays gathered); pipelined, the pipeline's units (the default)
        units = [f"{part}.layers.{i}" for part in ("encoder", "decoder")
                 for i in range(MODELS[name]["layers"])] \
            if layout.stage == 3 and layout.pipeline == 1 else None
        optimizer = ShardedOptimizer(pmodel.parameters(), torch.optim.Adam, mesh.data,
                                     stage=layout.stage, units=units,
                                     pipeline=pmodel if layout.stage > 1 else None, lr=cfg.lr)
    else:
        optimizer = torch.optim.Adam(pmodel.parameters(), lr=cfg.lr)
    return mesh, pmodel, optimizer


def _state_bytes(optimizer: Any) -> tuple[int, int]:
    """Bytes of optimizer state on this rank, and of ZeRO's buffers beside the gradients (which
    live in its flat gradient buffer): this rank's reduced shard and its Allgather send buffer;
    0 for a plain optimizer."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.state_bytes(), optimizer.buffer_bytes()
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor)), 0


def _reduced_grads(mesh: Mesh, pmodel: PipelineModel, optimizer: Any,
                   ) -> dict[str, torch.Tensor] | None:
    """Single-process name -> the data-averaged gradient the optimizer used in the last step,
    whole (tensor shards and stages gathered), on the mesh's first rank; None elsewhere. Under
    ZeRO it is read from the optimizer's reduced shards (each element lives on one data rank:
    an Allreduce sums them). Collective over the mesh; call after ``optimizer.step()``."""
    named = pmodel.named_parameters()
    grads = {n: p.grad for n, p in named if p.grad is not None}
    if isinstance(optimizer, ShardedOptimizer):
        names = {id(p): n for n, p in named}
        grads = {names[id(p)]: g for (p, _), g in
                 zip(optimizer.offsets, optimizer.unshard(optimizer.grad_shard), strict=True)}
    return pmodel.gather_full(grads)


def _local_step(cfg: ModelParallelConfig, mesh: Mesh, pmodel: PipelineModel, optimizer: Any,
                step_index: int) -> tuple[float, int]:
    """Forward and backward on this rank's shard of global batch ``step_index``: the loss
    (global mean, on every rank) and the global target tokens."""
    src, tgt_in, tgt_out = _batch(cfg, step_index)
    tokens = int((tgt_out != PAD).sum())
    replica, data = mesh.coords["data"], mesh.sizes["data"]
    shard = [t.tensor_split(data)[replica] for t in (src, tgt_in, tgt_out)]
    optimizer.zero_grad(set_to_none=True)
    out = _train_step(pmodel, *shard, data / tokens, mesh.tensor, pmodel.precision)
    loss = mesh.data.allreduce(out.reduce_sum()) / data
    return loss, tokens


def _measure(cfg: ModelParallelConfig, name: str, layout_name: str, comm: Communicator,
             references: dict[str, tuple[float, dict[str, torch.Tensor]]] | None,
             ctx: RunContext) -> dict:
    """One row; ``references``: the single-process loss and gradients per precision recipe
    (``"fp32"`` and the layout's); None for an unchecked model (no
    comparison: its rows report NaN differences)."""
    layout = LAYOUTS[layout_name]
    rss_reset = reset_peak_rss()
    mesh, pmodel, optimizer = _parallelize(cfg, layout, name, comm)
    if layout.pipeline > 1:
        ctx.log(f"\n{name} / {layout_name}: partition\n{pmodel.partition_table()}")
    loss, _ = _local_step(cfg, mesh, pmodel, optimizer, 0)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in pmodel.parameters()
                     if p.grad is not None)  # ZeRO-2/3: freed, the shard is a ZeRO buffer
    _optimizer_step(pmodel, optimizer, layout.clip)
    checked = references is not None
    ref_loss, ref_grads = references[layout.precision] if checked else (math.nan, {})
    if layout.clip and checked:
        norm = torch.nn.utils.get_total_norm(list(ref_grads.values()))  # torch's clipping
        coef = torch.clamp(layout.clip / (norm + 1e-6), max=1.0)
        ref_grads = {n: g * coef for n, g in ref_grads.items()}
    abs_diff = rel_diff = fp32_diff = 0.0 if checked else math.nan
    full = _reduced_grads(mesh, pmodel, optimizer) if checked else None
    if full is not None:
        if full.keys() != ref_grads.keys():
            raise RuntimeError(f"{layout_name}: gathered gradients of "
                               f"{sorted(ref_grads.keys() - full.keys())} are missing")
        for pname, grad in full.items():
            err = float((grad - ref_grads[pname]).abs().max())
            abs_diff = max(abs_diff, err)
            rel_diff = max(rel_diff, err / max(float(ref_grads[pname].abs().max()), 1e-30))
            fp32 = references["fp32"][1][pname]
            fp32_diff = max(fp32_diff, float((grad - fp32).abs().max()) /
                            max(float(fp32.abs().max()), 1e-30))
    times, tokens, bubbles, peaks = [], [], [], []
    for i in range(1, cfg.warmup + cfg.steps + 1):
        comm.barrier()
        start = time.perf_counter()
        _, n = _local_step(cfg, mesh, pmodel, optimizer, i)
        _optimizer_step(pmodel, optimizer, layout.clip)
        if i > cfg.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n)
            bubbles.append(pmodel.stats["bubble"])
        peaks.append(pmodel.stats["peak_activation_bytes"])
    if layout.pipeline > 1:
        table = pmodel.stage_table()
        ctx.log(f"{name} / {layout_name}: last step per stage\n{table}")
    param_bytes = optimizer.param_bytes() if isinstance(optimizer, ShardedOptimizer) else \
        sum(p.numel() * p.element_size() for p in pmodel.parameters())
    state_bytes, zero_bytes = _state_bytes(optimizer)
    mine = {"param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": state_bytes,
            "activation_bytes": max(peaks), "exchange_bytes": pmodel.exchange_bytes + zero_bytes}
    mine["peak_bytes_per_rank"] = sum(mine.values())
    worst = {k: comm.allreduce(v, op="max") for k, v in mine.items()}
    step_s = comm.allreduce(median(times), op="max")
    stage_bubbles = pmodel.comm.allgather(median(bubbles))
    return {
        "model": name, "layout": layout_name, "ranks": layout.ranks, "data": layout.data,
        "pipeline": layout.pipeline, "tensor": layout.tensor,
        "schedule": layout.schedule if layout.pipeline > 1 else "-",
        **worst, "fits_budget": worst["peak_bytes_per_rank"] <= cfg.budget_mib * 2 ** 20,
        "ms_per_step": step_s * 1e3, "tokens_per_s": median(tokens) / step_s,
        "bubble": sum(stage_bubbles) / len(stage_bubbles) if layout.pipeline > 1 else 0.0,
        "bubble_theory": theoretical_bubble(layout.pipeline, cfg.microbatches,
                                            layout.virtual_stages),
        "loss": loss, "loss_abs_diff": comm.allreduce(abs(loss - ref_loss), op="max"),
        "grad_max_abs_diff": comm.allreduce(abs_diff, op="max"),
        "grad_max_rel_diff": comm.allreduce(rel_diff, op="max"),
        **_scale_fields(cfg, name, comm, rss_reset),
        "precision": layout.precision, "virtual_stages": layout.virtual_stages,
        "loss_diff_vs_fp32": comm.allreduce(
            abs(loss - references["fp32"][0]) if checked else math.nan, op="max"),
        "grad_rel_diff_vs_fp32": comm.allreduce(fp32_diff, op="max"),
    }


def _scale_fields(cfg: ModelParallelConfig, name: str, comm: Communicator,
                  rss_reset: bool) -> dict[str, Any]:
    """The row's memory at scale: ``model_state_bytes`` (fp32 weights + gradients + Adam's two
    moments of the whole model: 16 bytes per parameter, counted on a meta build),
    ``peak_rss_bytes_per_rank`` (the largest rank's VmHWM since the layout started, or since
    the process started where the kernel does not let it be reset: ``rss_reset``) and their
    ratio ``state_over_rss``. Collective over ``comm``."""
    params = sum(p.numel() for p in deferred_init(_constructor(cfg, name)).parameters())
    peak = comm.allreduce(peak_rss_bytes() or 0, op="max")
    state = 16 * params
    return {"model_state_bytes": state, "peak_rss_bytes_per_rank": peak,
            "state_over_rss": state / peak if peak else math.nan,
            "rss_reset": comm.allreduce(int(rss_reset), op="min") == 1,
            "deferred": cfg.deferred}


def _run_on_first(comm: Communicator, ranks: int, work: Any) -> Any:
    """``work(sub)`` on a communicator of world ranks 0..ranks-1; the other ranks sleep-poll
    until rank 0 tells them it is done (a blocking wait would spin on a shared core)."""
    active = comm.rank < ranks
    sub = comm.split(0 if active else 1, name="layout")
    result = None
    if active:
        result = work(sub)
        if comm.rank == 0:
            for r in range(ranks, comm.size):
                comm.Send(torch.zeros(1), dest=r, tag=77)
    else:
        poll_all([comm.Irecv(torch.zeros(1), source=0, tag=77)], sleep=0.01)
    return result


COLUMNS = [("model", "model", ""), ("layout", "layout", ""), ("ranks", "ranks", "d"),
           ("param_h", "params/rank", ""), ("optimizer_h", "Adam state/rank", ""),
           ("activation_h", "activations/rank", ""), ("exchange_h", "DP buffers/rank", ""),
           ("peak_h", "peak/rank", ""),
           ("fits", "fits budget", ""), ("ms_per_step", "ms/step", ".1f"),
           ("tokens_per_s", "tokens/s", ".0f"), ("bubble", "bubble", ".3f"),
           ("bubble_theory", "(S-1)/(vM+S-1)", ".3f"), ("loss_abs_diff", "loss diff", ".1e"),
           ("grad_max_abs_diff", "max grad diff", ".1e"),
           ("grad_max_rel_diff", "rel. grad diff", ".1e"),
           ("grad_rel_diff_vs_fp32", "rel. grad diff vs fp32", ".1e")]


def _return_large_frees() -> None:
    """Allocations of 1 MiB and more get their own mappings (glibc ``mallopt``), so that freed
    tensors (last step's gradients) go back to the system instead of staying in the heap as
    fragments: the peak RSS then measures what the rank holds. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def run(cfg: ModelParallelConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    if cfg.deferred:
        _return_large_frees()
    chosen = [n for n in cfg.layouts if LAYOUTS[n].ranks <= comm.size]
    skipped = [n for n in cfg.layouts if n not in chosen]
    rows = []
    for name in cfg.models:
        reference = None if name in cfg.unchecked_models else {
            p: _reference(cfg, name, p) for p in {"fp32", *(LAYOUTS[n].precision for n in chosen)}}
        for layout_name in chosen:
            row = _run_on_first(comm, LAYOUTS[layout_name].ranks,
                                lambda sub, n=name, lay=layout_name, ref=reference:
                                _measure(cfg, n, lay, sub, ref, ctx))
            if ctx.is_root:
                rows.append(row)
                ctx.log(f"  {name:<5} {layout_name:<10} {row['ms_per_step']:.1f} ms/step, "
                        f"peak {human_bytes(row['peak_bytes_per_rank'])}/rank, "
                        f"grad rel. diff {row['grad_max_rel_diff']:.1e}")
    if ctx.is_root:
        _report(cfg, ctx, rows, skipped)
    return {"rows": rows, "skipped": skipped}


def _report(cfg: ModelParallelConfig, ctx: RunContext, rows: list[dict], skipped: list[str],
            ) -> None:
    shown = [{**r, "param_h": human_bytes(r["param_bytes"]),
              "optimizer_h": human_bytes(r["optimizer_bytes"]),
              "activation_h": human_bytes(r["activation_bytes"]),
              "exchange_h": human_bytes(r["exchange_bytes"]),
              "peak_h": human_bytes(r["peak_bytes_per_rank"]),
              "fits": "yes" if r["fits_budget"] else "no"} for r in rows]
    notes = (f"\npeak/rank = parameters + gradients + Adam state + peak saved activations + "
             f"data-parallel reduction buffers (ZeRO: the reduced gradient shard, the "
             f"Allgather send buffer and, stages 2, 3, the reduction buckets; ZeRO-3 parameters: "
             f"this rank's chunks + the most gathered at once) held by the rank (largest "
             f"rank); budget "
             f"{cfg.budget_mib:g} MiB. Global batch {cfg.batch} sentences of "
             f"{cfg.min_len}-{cfg.max_len} tokens, "
             f"{cfg.microbatches} microbatches. Diffs: first step vs the single-process model "
             f"on the same global batch.\n{ctx.comm.size} ranks on {platform.node()}: "
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    if skipped:
        notes += f"\nskipped (need more ranks): {', '.join(skipped)}"
    table = markdown_table(shown, COLUMNS) + _scale_table(rows)
    ctx.run_dir.write_text("table.md", table + "\n" + notes + "\n")
    print(table + notes, flush=True)
    _plot(cfg, rows, ctx)


def _scale_table(rows: list[dict]) -> str:
    """The memory-at-scale table (whole-model training state vs measured peak RSS per rank)."""
    shown = [{**r, "state_h": human_bytes(r["model_state_bytes"]),
              "rss_h": human_bytes(r["peak_rss_bytes_per_rank"]),
              "init": "deferred" if r["deferred"] else "eager",
              "checked": "no" if math.isnan(r["grad_max_rel_diff"]) else "yes"} for r in rows]
    columns = [("model", "model", ""), ("layout", "layout", ""), ("init", "init", ""),
               ("state_h", "model state (fp32 w+g+Adam)", ""),
               ("rss_h", "peak RSS/rank (VmHWM)", ""), ("state_over_rss", "state / RSS", ".2f"),
               ("checked", "vs one process", "")]
    return "\n\n" + markdown_table(shown, columns)


def _plot(cfg: ModelParallelConfig, rows: list[dict], ctx: RunContext) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / len(models)
    for ax, key, label in ((axes[0], "peak_bytes_per_rank", "peak MiB per rank"),
                           (axes[1], "ms_per_step", "ms per step")):
        for i, model in enumerate(models):
            sel = {r["layout"]: r[key] for r in rows if r["model"] == model}
            values = [sel.get(lay, 0) / (2 ** 20 if key.endswith("rank") else 1)
                      for lay in layouts]
            ax.bar([x + i * width for x in range(len(layouts))], values, width, label=model)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layouts))], layouts,
                      rotation=30)
        if key.endswith("rank"):
            ax.axhline(cfg.budget_mib, color="k", linestyle="--", linewidth=1,
                       label=f"budget {cfg.budget_mib:g} MiB")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("model parallelism of the hpcml transformer")
    save_figure(fig, ctx.run_dir.path / "model_parallel.png")


JOB = JobKind(config=ModelParallelConfig, run=run,
              description="DP / pipeline (GPipe, 1F1B) / tensor / ZeRO-1 layouts and their "
                          "combinations: memory per rank, time, gradient equality")
