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
  (mean over stages of 1 - busy / step time) beside the theoretical (S-1)/(M+S-1).

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

Layouts are rows of :data:`LAYOUTS` (data, pipeline, tensor sizes and schedule): a new kind of
parallelism plugs in by adding rows and its case in :func:`_parallelize` (the model and its
optimizer).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any

import torch

from hpcml.bench.report import human_bytes, markdown_table, median, pyplot, save_figure
from hpcml.comm import Communicator
from hpcml.comm.polling import poll_all
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.nmt.model import Transformer, smoothed_loss_sum
from hpcml.nmt.vocab import PAD
from hpcml.parallel.clip import clip_grad_norm_
from hpcml.parallel.mesh import Mesh
from hpcml.parallel.pipeline import PipelineModel, step
from hpcml.parallel.pipeline_schedule import theoretical_bubble
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
        for s in self.checkpoint_stages:
            if s < 0:
                raise ConfigError("checkpoint_stages", f"stage {s} < 0", "use stage indices")


def _model(cfg: ModelParallelConfig, name: str) -> Transformer:
    torch.manual_seed(cfg.seed)
    return Transformer(cfg.vocab, dropout=0.0, sparse=False, max_len=cfg.max_len + 1,
                       **MODELS[name])


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
                tgt_out: torch.Tensor, scale: float, tp: Communicator) -> torch.Tensor:
    logits = model(src, tgt_in)  # this rank's vocabulary slice under tensor parallelism
    embed = model.module.embed  # its slice bounds: no exchange of the slice sizes per step
    loss = (smoothed_loss_sum(logits, tgt_out, 0.1) if tp.size == 1 else
            vocab_parallel_cross_entropy(logits, tgt_out, tp, vocab_start=embed.vocab_start,
                                         vocab_size=embed.num_embeddings, ignore_index=PAD,
                                         label_smoothing=0.1, reduction="sum")) * scale
    model.backward(loss)
    return loss


def _reference(cfg: ModelParallelConfig, name: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss (global mean) and gradients of the single-process model on batch 0."""
    model = _model(cfg, name)
    src, tgt_in, tgt_out = _batch(cfg, 0)
    loss = smoothed_loss_sum(model(src, tgt_in), tgt_out, 0.1) / int((tgt_out != PAD).sum())
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


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
    out = _train_step(pmodel, *shard, data / tokens, mesh.tensor)
    loss = mesh.data.allreduce(out.reduce_sum()) / data
    return loss, tokens


def _measure(cfg: ModelParallelConfig, name: str, layout_name: str, comm: Communicator,
             reference: tuple[float, dict[str, torch.Tensor]], ctx: RunContext) -> dict:
    layout = LAYOUTS[layout_name]
    mesh, pmodel, optimizer = _parallelize(cfg, layout, name, comm)
    if layout.pipeline > 1:
        ctx.log(f"\n{name} / {layout_name}: partition\n{pmodel.partition_table()}")
    loss, _ = _local_step(cfg, mesh, pmodel, optimizer, 0)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in pmodel.parameters()
                     if p.grad is not None)  # ZeRO-2/3: freed, the shard is a ZeRO buffer
    if layout.clip:
        clip_grad_norm_(optimizer, layout.clip, pipeline=pmodel)
    optimizer.step()
    ref_loss, ref_grads = reference
    if layout.clip:
        norm = torch.nn.utils.get_total_norm(list(ref_grads.values()))  # torch's clipping
        coef = torch.clamp(layout.clip / (norm + 1e-6), max=1.0)
        ref_grads = {n: g * coef for n, g in ref_grads.items()}
    abs_diff = rel_diff = 0.0
    full = _reduced_grads(mesh, pmodel, optimizer)
    if full is not None:
        if full.keys() != ref_grads.keys():
            raise RuntimeError(f"{layout_name}: gathered gradients of "
                               f"{sorted(ref_grads.keys() - full.keys())} are missing")
        for pname, grad in full.items():
            err = float((grad - ref_grads[pname]).abs().max())
            abs_diff = max(abs_diff, err)
            rel_diff = max(rel_diff, err / max(float(ref_grads[pname].abs().max()), 1e-30))
    times, tokens, bubbles, peaks = [], [], [], []
    for i in range(1, cfg.warmup + cfg.steps + 1):
        comm.barrier()
        start = time.perf_counter()
        _, n = _local_step(cfg, mesh, pmodel, optimizer, i)
        if layout.clip:
            clip_grad_norm_(optimizer, layout.clip, pipeline=pmodel)
        optimizer.step()
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
        "bubble_theory": theoretical_bubble(layout.pipeline, cfg.microbatches),
        "loss": loss, "loss_abs_diff": comm.allreduce(abs(loss - ref_loss), op="max"),
        "grad_max_abs_diff": comm.allreduce(abs_diff, op="max"),
        "grad_max_rel_diff": comm.allreduce(rel_diff, op="max"),
    }


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
           ("bubble_theory", "(S-1)/(M+S-1)", ".3f"), ("loss_abs_diff", "loss diff", ".1e"),
           ("grad_max_abs_diff", "max grad diff", ".1e"),
           ("grad_max_rel_diff", "rel. grad diff", ".1e")]


def run(cfg: ModelParallelConfig, ctx: RunContext) -> dict[str, Any]:
    comm = ctx.comm
    chosen = [n for n in cfg.layouts if LAYOUTS[n].ranks <= comm.size]
    skipped = [n for n in cfg.layouts if n not in chosen]
    rows = []
    for name in cfg.models:
        reference = _reference(cfg, name)
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
    table = markdown_table(shown, COLUMNS)
    ctx.run_dir.write_text("table.md", table + "\n" + notes + "\n")
    print(table + notes, flush=True)
    _plot(cfg, rows, ctx)


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
