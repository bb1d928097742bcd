"""Horovod's ``SyncBatchNorm``: batch normalization whose statistics, in training, are those of
the batch concatenated over the ranks (of a process set).

The mean and the (biased) variance are computed in two passes, each one differentiable sum
:func:`~hpcml.horovod.ops.allreduce` (per-channel sums, then per-channel sums of squared
deviations), so autograd's backward is the exact gradient of the concatenated batch (the
gradient of a sum-allreduce is the sum-allreduce of the gradient), and the variance does not
lose precision to ``E[x^2] - E[x]^2``. Running statistics are updated as torch's ``BatchNorm``
does, with the unbiased variance of the whole batch. In eval mode, or on one rank, it is
torch's ``BatchNorm``. Collective in training: every rank of the set runs forward (and
backward) together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from hpcml.horovod.basics import Sum, communicator
from hpcml.horovod.ops import allreduce


class SyncBatchNorm(_BatchNorm):
    """``BatchNorm`` over inputs of shape ``(N, C, ...)`` with statistics of all ranks' batches."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_set: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 (torch's name)
        if input.dim() < 2:
            raise ValueError(f"hpcml.horovod: SyncBatchNorm: expected at least 2D input (N, C, "
                             f"...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or communicator(self.process_set).size == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        counted = torch.cat([x.sum(dims), x.new_tensor([x.numel() // channels])])
        total = allreduce(counted, op=Sum, process_set=self.process_set)
        n = total[-1]
        mean = total[:channels] / n
        centred = x - mean.view(shape)
        var = allreduce((centred * centred).sum(dims), op=Sum,
                        process_set=self.process_set) / n
        count = float(n.detach())
        if count < 2:
            raise ValueError("hpcml.horovod: SyncBatchNorm: the whole batch holds one value per "
                             "channel, so its variance is undefined (use more than one sample)")
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.mul_(1 - factor).add_(mean.detach() * factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * count / (count - 1)
                                                       * factor)
        y = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y
