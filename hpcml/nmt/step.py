"""One data-parallel training step, shared by the trainer, the benchmark and the tests.

The global objective is the label-smoothed loss summed over the target tokens of the *global*
batch (all ranks' sentences) divided by the global token count. Each rank computes its local sum
and scales it by ``P / global_tokens``; since the optimizer (a
:class:`~hpcml.parallel.DistributedOptimizer`) averages gradients over the P ranks, the reduced
gradient is exactly the gradient of the global objective, as if one process
had run the concatenated batch. The token count travels in one small allreduce together with
the ranks' stop flags (a pending SIGTERM/SIGUSR1 on any rank), so stopping is collective too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.nmt.data import Batch
from hpcml.nmt.model import smoothed_loss_sum


def global_counts(comm: Communicator, tokens: int, stop: bool = False) -> tuple[int, bool]:
    """(sum of ``tokens`` over ranks, whether any rank asked to stop). Collective."""
    buf = np.array([tokens, int(stop)], dtype=np.int64)
    comm.Allreduce(buf)
    return int(buf[0]), bool(buf[1])


def backward(model: nn.Module, batch: Batch, smoothing: float, global_tokens: int,
             size: int) -> float:
    """Forward + backward of this rank's share of the global loss; returns the local loss sum
    (unscaled). Not collective (the reduction hooks may launch collectives during backward)."""
    logits = model(batch.src, batch.tgt_in)
    loss_sum = smoothed_loss_sum(logits, batch.tgt_out, smoothing)
    (loss_sum * (size / global_tokens)).backward()
    return float(loss_sum.detach())


def train_step(comm: Communicator, model: nn.Module, batch: Batch,
               optimizer: torch.optim.Optimizer, smoothing: float, lr: float,
               stop: bool = False) -> tuple[float, int, bool]:
    """One step: count, backward, update (``optimizer.step()`` finishes the gradient
    reduction of a :class:`~hpcml.parallel.DistributedOptimizer`). Collective.

    Returns (global mean loss per token, global tokens, stop requested on any rank)."""
    tokens, stop_any = global_counts(comm, batch.tokens, stop)
    optimizer.zero_grad()
    local = backward(model, batch, smoothing, tokens, comm.size)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    loss = np.array([local])
    comm.Allreduce(loss)
    return float(loss[0]) / tokens, tokens, stop_any
