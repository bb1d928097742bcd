"""Job kind ``transformer-nmt``: data-parallel training of :class:`~hpcml.nmt.model.Transformer`
on an HDF5 parallel corpus (the numbers corpus, or a text corpus prepared by
:mod:`hpcml.nmt.subword`) with a chosen gradient reduction of :mod:`hpcml.parallel`
(arXiv 1905.04035).

Top to bottom: read the vocabulary and this rank's shards; build the model from the job seed and
broadcast rank 0's parameters (or restore the checkpoint of ``--resume``); seed this rank's dropout
stream; train ``train.steps`` steps (rank-0 progress, :mod:`hpcml.progress`; metrics.jsonl;
validation every ``eval.valid_every``, checkpoint every ``eval.checkpoint_every`` and at the end);
on SIGTERM or SIGUSR1 on any rank (caught from launch on, :mod:`hpcml.preemption`), checkpoint
after the current step and stop with ``stopped_by`` set (status ``preempted``; a signal during the
last step lets the run finish); finally decode the test split (greedy, or beam search with
``eval.beam``) and report corpus BLEU with its sacreBLEU signature. Batches hold
``train.batch_size`` sentences, or with ``train.batch_tokens`` length-bucketed token batches
(:mod:`hpcml.nmt.buckets`). The optimizer is a :class:`~hpcml.parallel.DistributedOptimizer` around
Adam; with ``[qsparse] enabled`` it is synchronous Qsparse-local-SGD instead
(:mod:`hpcml.nmt.qsparse`), whose checkpoints also hold every rank's own model, optimizer state and
error memory. A run resumed from a checkpoint takes exactly the steps the uninterrupted run would
(same batches, dropout masks, optimizer state and learning rates).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from hpcml.checkpoint import Restored
from hpcml.comm import Communicator, chunk_bounds
from hpcml.errors import UsageError
from hpcml.jobs import JobKind, RunContext
from hpcml.nmt.buckets import BucketStream
from hpcml.nmt.config import NMTConfig
from hpcml.nmt.data import TrainStream, read_shard, read_vocab, steps_per_epoch, validate_corpus
from hpcml.nmt.decode import corpus_bleu, validation_loss
from hpcml.nmt.model import Transformer, noam_lr
from hpcml.nmt.qsparse import accounting, qsparse_optimizer
from hpcml.nmt.state import broadcast_state, restore, save
from hpcml.nmt.state import check as check_state
from hpcml.nmt.step import train_step
from hpcml.nmt.subword import detokenizer, references
from hpcml.optim.registry import build_optimizer
from hpcml.parallel import DistributedOptimizer
from hpcml.progress import Progress


def build_model(cfg: NMTConfig, vocab_size: int, sparse: bool = True) -> Transformer:
    """The model of ``cfg``, initialised from ``cfg.seed`` (identical on every rank)."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    return Transformer(vocab_size, m.d_model, m.heads, m.layers, m.ff, m.dropout, sparse=sparse)


def make_optimizer(model: torch.nn.Module, name: str = "adam") -> torch.optim.Optimizer:
    """Optimizer ``name`` (:data:`hpcml.optim.OPTIMIZERS`, default Adam) with Vaswani §5.3's
    betas and epsilon where it has them; the learning rate is set every step."""
    return build_optimizer(name, model.parameters(), lr=0.0, beta1=0.9, beta2=0.98, eps=1e-9)


def seed_rank(seed: int, rank: int) -> None:
    """This rank's own dropout stream (distinct per rank, fixed by the job seed)."""
    torch.manual_seed(np.random.SeedSequence([seed, rank, 1]).generate_state(1)[0])


def run(cfg: NMTConfig, ctx: RunContext) -> dict[str, Any]:
    comm, t = ctx.comm, cfg.train
    vocab = read_vocab(cfg.data.path)
    model = build_model(cfg, len(vocab), sparse=not cfg.qsparse.enabled)
    optimizer = make_optimizer(model, t.optimizer)
    if cfg.qsparse.enabled:
        stepper = qsparse_optimizer(comm, model, optimizer, cfg.qsparse, cfg.seed)
    else:
        stepper = DistributedOptimizer(optimizer, model, comm=comm, reduction=t.grad_reduction,
                                       bucket_kib=t.bucket_kib,
                                       on_choice=lambda n, m: ctx.log(f"auto: {n} -> {m}"))
    start, history = 0, []
    if ctx.restored is not None:
        record = restore(comm, ctx.restored, model, optimizer)
        start, history = ctx.restored.step, record["history"]
        if cfg.qsparse.enabled:
            own = record["rank_state"]
            model.load_state_dict(own["model"])
            stepper.load_state_dict(own["optimizer"])
        ctx.log(f"resumed from step {start}")
    else:
        broadcast_state(comm, model, optimizer)
        seed_rank(cfg.seed, comm.rank)
    train = read_shard(cfg.data.path, "train", comm.rank, comm.size)
    valid = read_shard(cfg.data.path, "valid", comm.rank, comm.size)
    stream = (BucketStream(comm, train, t.batch_tokens, cfg.seed) if t.batch_tokens
              else TrainStream(train, t.batch_size // comm.size, comm.size, cfg.seed, comm.rank))
    ctx.log(f"{train.total} training pairs, vocabulary {len(vocab)}, "
            f"{sum(p.numel() for p in model.parameters())} parameters, "
            f"{stream.steps_per_epoch} steps/epoch, exchange "
            + (f"qsparse {stepper.compressor.name} H={cfg.qsparse.H}" if cfg.qsparse.enabled
               else t.grad_reduction))

    def checkpoint(step: int) -> None:
        own = ({"model": model.state_dict(), "optimizer": stepper.state_dict()}
               if cfg.qsparse.enabled else None)
        save(ctx, model, optimizer, step,
             {"history": history, "epoch": step // stream.steps_per_epoch}, own)

    stopped, step, loss, tokens_total, busy = None, start, float("nan"), 0, 0.0
    bar = Progress(t.steps, initial=start, enabled=ctx.is_root)
    flag = ctx.preemption
    for step in range(start + 1, t.steps + 1):
        comm.straggle(step)
        tick = time.perf_counter()
        lr = noam_lr(step, cfg.model.d_model, t.warmup, t.lr_scale)
        loss, tokens, stop = train_step(comm, model, stream.batch(step - 1), stepper,
                                        t.label_smoothing, lr, stop=flag.local)
        busy += time.perf_counter() - tick
        tokens_total += tokens
        record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens}
        bar.update(1, loss=loss)
        if cfg.eval.valid_every and step % cfg.eval.valid_every == 0:
            record["valid_loss"] = validation_loss(comm, model, valid, cfg.eval.batch_size,
                                                   t.label_smoothing)
            history.append({"step": step, "valid_loss": record["valid_loss"]})
            if ctx.is_root:
                bar.write(f"step {step}: train loss {loss:.4f}, valid loss "
                          f"{record['valid_loss']:.4f}")
        if ctx.is_root:
            ctx.run_dir.log_metrics(**record)
        if stop and step < t.steps:  # a signal during the last step lets the run finish
            stopped = flag.reason()
            checkpoint(step)
            break
        if (cfg.eval.checkpoint_every and step % cfg.eval.checkpoint_every == 0) \
                or step == t.steps:
            checkpoint(step)
    bar.close()
    summary: dict[str, Any] = {
        "steps": step, "train_loss": loss,
        "tokens_per_s": tokens_total / busy if busy else None, "stopped_by": stopped,
        "valid_loss": validation_loss(comm, model, valid, cfg.eval.batch_size,
                                      t.label_smoothing)}
    if cfg.qsparse.enabled:
        bits = summary["qsparse"] = accounting(stepper, step)
        ctx.log(f"qsparse: {bits['bits_per_worker']} bits per worker; dense allreduce of the "
                f"same steps: {bits['dense_allreduce_bits_per_worker']} (ratio "
                f"{bits['dense_over_qsparse']})")
    else:
        summary.update({"grad_reduction": t.grad_reduction,
                        "exchange_peak_bytes": stepper.memory.peak,
                        "auto_choices": stepper.choices})
    if stopped is None and cfg.eval.bleu:
        test = read_shard(cfg.data.path, "test", comm.rank, comm.size)
        refs = references(cfg.data.path, "test", *chunk_bounds(test.total, comm.size,
                                                               comm.rank))
        bleu, signature, hyps = corpus_bleu(comm, model, test, cfg.eval.batch_size,
                                            detokenizer(cfg.data.path), refs, cfg.eval.beam,
                                            cfg.eval.length_penalty)
        summary.update(test_bleu=bleu, bleu_signature=signature, beam=cfg.eval.beam)
        ctx.log(f"sacreBLEU {bleu:.2f} (beam {cfg.eval.beam}): {signature}")
        if ctx.is_root:
            ctx.run_dir.write_text("test-hypotheses.txt", "\n".join(hyps) + "\n")
    ctx.log(f"done: step {step}, valid loss {summary['valid_loss']:.4f}"
            + (f", test BLEU {summary['test_bleu']:.2f}" if "test_bleu" in summary else "")
            + (f" (stopped by {stopped}; resume with --resume {ctx.run_dir.path})"
               if stopped else ""))
    return summary


def validate_data(cfg: NMTConfig, comm: Communicator) -> None:
    """The corpus is well formed (each rank checks its block) and one training step fits."""
    sizes = validate_corpus(cfg.data.path, comm.rank, comm.size)
    steps_per_epoch(sizes["train"], cfg.train.batch_size // comm.size, comm.size)


def check_resume(cfg: NMTConfig, restored: Restored) -> None:
    """The checkpoint's parameters have this config's names, dtypes and shapes, and
    everything else a resumed run reads fits (:func:`hpcml.nmt.state.check`; raises
    UsageError otherwise)."""
    saved = restored.shared.get("model", {})
    vocab = len(read_vocab(cfg.data.path))
    expected = build_model(cfg, vocab).state_dict()
    wrong = [k for k in expected.keys() | saved.keys()
             if k not in saved or k not in expected or not isinstance(saved[k], torch.Tensor)
             or saved[k].shape != expected[k].shape] if isinstance(saved, dict) else ["model"]
    if wrong:
        raise UsageError(f"{restored.manifest.path}: its model does not fit this config "
                         f"({len(wrong)} tensors differ, e.g. {sorted(wrong)[0]}); resume with "
                         "the same [model] section")

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = build_model(cfg, vocab, sparse=not cfg.qsparse.enabled)
        return model, make_optimizer(model, cfg.train.optimizer)

    check_state(restored, fresh, restored.rank, cfg.qsparse.enabled)


JOB = JobKind(config=NMTConfig, run=run,
              description="data-parallel transformer NMT, sparse allgather vs dense allreduce",
              validate_data=validate_data, check_resume=check_resume)
