"""Global gradient clipping for every layout: ``clip_grad_norm_`` computes the norm of the
gradient of the *whole* model after the data-parallel reduction -- over every tensor shard,
pipeline stage and ZeRO-1 shard, each element counted once -- and scales every gradient this
rank holds by ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does
in one process.

Which elements a rank counts (so that the sums over the groups count each element once):

- a tensor-parallel shard (:class:`~hpcml.parallel.tensor.guard.ShardedParameter`): its own
  elements, summed over its tensor-parallel communicator; a replicated parameter of a
  tensor-parallel model: on tensor rank 0 only;
- a pipeline stage: its held parameters, summed over the pipeline; a parameter held by several
  stages (a tied weight, whose gradients the pipeline already summed): on its owner stage only;
- ZeRO stages 1, 2 and 3 (:class:`~hpcml.parallel.ShardedOptimizer`): the reduce-scattered
  shard of the averaged gradient (the reduction finished first), summed over the
  data-parallel communicator;
- data parallelism (:class:`~hpcml.parallel.DistributedOptimizer`, or a pipeline's own
  reduction): the reduced gradients are equal on every replica, so nothing is summed over it.

Torch's own ``clip_grad_norm_`` on ``param.grad`` before a ZeRO-1 ``step`` (or before a
``DistributedOptimizer`` has synchronized) clips unreduced local gradients, and under ZeRO-2/3
finds no ``param.grad`` at all: use this one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel.optimizer import DistributedOptimizer
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.tensor.guard import ShardedParameter


def clip_grad_norm_(target: Any, max_norm: float, norm_type: float = 2.0, *,
                    pipeline: Any = None, error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the global gradient norm of a parallel model; returns the norm before clipping
    (a 0-d float tensor, equal on every rank).

    ``target``: a :class:`~hpcml.parallel.ShardedOptimizer` (its gradients are reduce-scattered
    now; ``step`` applies the clipped shard), a :class:`~hpcml.parallel.DistributedOptimizer`
    (synchronized now), a :class:`~hpcml.parallel.PipelineModel` (after its step), any other
    optimizer, a module or an iterable of parameters (tensor-parallel or replicated, gradients
    already reduced). ``pipeline``: the :class:`~hpcml.parallel.PipelineModel` whose stage the
    optimizer's parameters belong to (needed with an optimizer under pipeline parallelism).
    Collective over every group the layout sums over (module docstring): all ranks call it."""
    from hpcml.parallel.pipeline import PipelineModel

    if not (max_norm > 0 and norm_type > 0):
        raise UsageError(f"clip_grad_norm_: max_norm ({max_norm}) and norm_type ({norm_type}) "
                         "must be > 0")
    if isinstance(target, PipelineModel):
        target, pipeline = target.parameters(), target
    comms: list[Communicator] = []
    if isinstance(target, ShardedOptimizer):
        target.reduce_gradients()
        params = [p for p, _ in target.offsets]
        parts = [(target.grad_shard[rows], params[i]) for i, piece, rows in target.pieces
                 if piece.grad is not None]
        scaled = [target.grad_shard]
        if target.comm.size > 1:
            comms.append(target.comm)
    else:
        if isinstance(target, DistributedOptimizer) and not target.reducer.synchronized:
            target.synchronize()
        params = _parameters(target)
        parts = [(p.grad, p) for p in params if p.grad is not None]
        scaled = [g for g, _ in parts]
    tensor = _tensor_comm(params, pipeline)
    skip = _not_counted(pipeline)
    split = replicated = torch.zeros((), dtype=torch.float64)
    for grad, p in parts:
        if id(p) in skip:
            continue
        value = _norm_part(grad, norm_type)
        if isinstance(p, ShardedParameter):
            split = _combine(split, value, norm_type)
        else:
            replicated = _combine(replicated, value, norm_type)
    op = "max" if math.isinf(norm_type) else "sum"
    if tensor is not None and tensor.size > 1:
        pair = torch.stack([split, replicated if tensor.rank == 0 else torch.zeros_like(split)])
        tensor.Allreduce(pair, op=op)
        split, replicated = pair[0], pair[1]
    total = _combine(split, replicated, norm_type)
    if pipeline is not None and pipeline.comm.size > 1:
        comms.append(pipeline.comm)
    for comm in comms:
        total = total.reshape(1)
        comm.Allreduce(total, op=op)
        total = total[0]
    norm = total if math.isinf(norm_type) else total ** (1.0 / norm_type)
    norm = norm.float()
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"clip_grad_norm_: the total gradient norm is {float(norm)}; pass "
                           "error_if_nonfinite=False to clip anyway")
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for g in scaled:
            g.mul_(coef.to(g.dtype))
    return norm


def _parameters(target: Any) -> list[torch.Tensor]:
    if isinstance(target, torch.optim.Optimizer):
        return [p for g in target.param_groups for p in g["params"]]
    if isinstance(target, nn.Module):
        return list(target.parameters())
    if isinstance(target, torch.Tensor):
        return [target]
    if isinstance(target, Iterable):
        return list(target)
    raise UsageError(f"clip_grad_norm_: cannot clip a {type(target).__name__}; pass an "
                     "optimizer, a PipelineModel, a module or parameters")


def _tensor_comm(params: list[torch.Tensor], pipeline: Any) -> Communicator | None:
    """The tensor-parallel group, if the model is tensor-parallel."""
    if pipeline is not None:
        return pipeline.mesh.tensor
    return next((p.comm for p in params if isinstance(p, ShardedParameter)), None)


def _not_counted(pipeline: Any) -> set[int]:
    """Ids of the pipeline-shared parameters whose owner is another stage."""
    if pipeline is None:
        return set()
    held = dict(pipeline.named_parameters())
    return {id(held[n]) for n in pipeline.plan.shared
            if n in held and pipeline.plan.owner(n) != pipeline.stage}


def _norm_part(grad: torch.Tensor, norm_type: float) -> torch.Tensor:
    """``max |g|`` (inf) or ``sum |g|^p`` in float64."""
    g = grad.detach().to_dense().double().abs()
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return g.max() if math.isinf(norm_type) else g.pow(norm_type).sum()


def _combine(a: torch.Tensor, b: torch.Tensor, norm_type: float) -> torch.Tensor:
    return torch.maximum(a, b) if math.isinf(norm_type) else a + b
