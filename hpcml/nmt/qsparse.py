"""Qsparse-local-SGD for the ``transformer-nmt`` job: the ``[qsparse]`` job-file section and the
exchange that replaces the per-step gradient averaging (arXiv 1906.02367, Algorithm 1).

With ``qsparse.enabled`` the transformer trainer keeps its loop (``train_step``: count tokens,
backward, step) and swaps two parts: the model is built with dense embedding gradients (the
local optimizer needs dense ones; compression works on parameter differences anyway), and the
optimizer is :class:`~hpcml.qsparse.optimizer.QsparseLocalSGD` around the job's optimizer
instead of :class:`~hpcml.parallel.DistributedOptimizer`: ``H`` local steps, then the
error-compensated compressed exchange of ``memory + x_sync - x_local`` over ``Allgatherv``
(synchronous mode; collective every ``H``-th step). Each rank's gradient is ``P x`` its share of
the global loss, i.e. an unbiased estimate of the global gradient (:mod:`hpcml.nmt.step`), which
is what a local step needs. The local optimizer is the job's (Adam with the Vaswani schedule,
its moments kept per worker): Algorithm 1 writes the local step as SGD, and with plain SGD the
wrapper is exactly the paper's.

Bits are the exact uplink payload of each worker (``Compressor.bits(d)`` per synchronization);
the dense-allreduce reference for the same number of steps is ``32 d`` bits per step.
With ``H = 1``, the identity compressor and a plain SGD optimizer the run equals data-parallel
SGD (tested). The asynchronous variant does not fit this trainer, whose every step is collective
(token counts, stop flags, validation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.config import option
from hpcml.errors import ConfigError
from hpcml.nmt.data import read_vocab
from hpcml.nmt.model import Transformer
from hpcml.qsparse.optimizer import QsparseLocalSGD
from hpcml.qsparse.train import CompressorConfig, compressor_of


@dataclasses.dataclass
class QsparseSection:
    """The ``[qsparse]`` section of a ``transformer-nmt`` job."""

    enabled: bool = option(False, help="train with synchronous Qsparse-local-SGD instead of "
                           "per-step gradient averaging (train.grad_reduction is then unused)")
    H: int = option(4, min=1, help="local steps between synchronizations (>= 1; divides "
                    "train.steps and eval.valid_every)")
    compressor: CompressorConfig = option(CompressorConfig())

    def check(self, steps: int, valid_every: int, dimension: Callable[[], int]) -> None:
        """Evaluations and the end of training must fall on synchronization steps, where every
        rank holds ``x_sync``, and ``k`` must not exceed the model dimension ``dimension()``
        (called only when needed); raises ``ConfigError``."""
        if not self.enabled:
            return
        comp = self.compressor
        if comp.name.endswith(("topk", "randk")) and comp.k > (d := dimension()):
            raise ConfigError("qsparse.compressor.k", f"k = {comp.k} exceeds the model "
                              f"dimension d = {d}", f"use 1 <= k <= {d}")
        if steps % self.H:
            raise ConfigError("qsparse.H", f"H = {self.H} does not divide train.steps = "
                              f"{steps}", "choose H dividing train.steps")
        if valid_every % self.H:
            raise ConfigError("qsparse.H", f"H = {self.H} does not divide eval.valid_every = "
                              f"{valid_every}", "choose H dividing eval.valid_every")


def transformer_dimension(model: Any, data_path: str) -> int:
    """Trainable parameters of the transformer of the ``[model]`` section ``model`` over the
    vocabulary of the corpus at ``data_path``."""
    net = Transformer(len(read_vocab(data_path)), model.d_model, model.heads, model.layers,
                      model.ff, model.dropout)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def qsparse_optimizer(comm: Communicator, model: nn.Module, optimizer: torch.optim.Optimizer,
                      section: QsparseSection, seed: int) -> QsparseLocalSGD:
    """The Qsparse wrapper of ``section`` around ``optimizer``; collective over ``comm``
    (rank 0's parameters are broadcast)."""
    return QsparseLocalSGD(model, optimizer, compressor=compressor_of(section.compressor),
                           H=section.H, comm=comm, seed=seed)


def accounting(qs: QsparseLocalSGD, steps: int) -> dict[str, float | int | str | None]:
    """This worker's exact uplink bits against a dense float32 allreduce of the same
    ``steps`` (``32 d`` bits per step)."""
    d = qs.x_sync.numel()
    dense = steps * d * 32
    bits = qs.bits_sent
    return {"d": d, "compressor": qs.compressor.name, "syncs": qs.syncs,
            "bits_per_sync": qs.compressor.bits(d), "bits_per_worker": bits,
            "dense_allreduce_bits_per_worker": dense,
            "dense_over_qsparse": dense / bits if bits else None}
