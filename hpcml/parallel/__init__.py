"""hpcml.parallel: every way of splitting a model, its gradients or its optimizer state across
ranks, one module per parallelism over :mod:`hpcml.comm`; this file only re-exports them.

One :class:`Mesh` owns the process-group layout (data, pipeline, tensor sub-communicators).
Data parallelism (:mod:`.optimizer`, :mod:`.data_parallel`, :mod:`.reductions`,
:mod:`.broadcast`): :class:`DistributedOptimizer` wraps any torch optimizer so that any training
loop averages its gradients over the ranks, overlapping the reduction with backward;
:func:`broadcast_parameters` and :func:`broadcast_optimizer_state` start every rank from the
same state. Tensor parallelism (:mod:`.tensor`): :func:`parallelize` splits layers over a
tensor-parallel communicator. Sharding of optimizer state, gradients and parameters
(:mod:`.sharding`, :mod:`.zero`; ZeRO stages 1, 2, 3): :class:`ShardedOptimizer`. Pipeline
parallelism (:mod:`.pipeline`): :class:`PipelineModel` splits any ``nn.Module`` into stages
and :func:`step` runs the user's step over microbatches.
Checkpoints across layouts (:mod:`.layout_checkpoint`): :func:`save_checkpoint` /
:func:`load_checkpoint` move a model and its optimizer state between any (D, S, T, ZeRO-1)
layouts and one process. :func:`clip_grad_norm_` (:mod:`.clip`) clips the global gradient norm
of any of these layouts. Deferred initialization (:mod:`.deferred`): :func:`deferred_init`
builds a model on the meta device, and each rank :func:`materialize` s only its stage and shard.
:class:`MixedPrecision` (:mod:`.precision`) runs any of these layouts in bfloat16/float16 with
float32 master weights and a loss scale whose skip decision every rank shares;
``PipelineModel(schedule="interleaved-1f1b", virtual_stages=v)`` interleaves v chunks per
pipeline rank.

Names are imported on first use (PEP 562), so that ``from hpcml.parallel import Mesh`` does
not pay for importing torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    "REDUCTIONS": "reductions",
    "DistributedOptimizer": "optimizer",
    "ExchangeMemory": "memory",
    "GradientReducer": "data_parallel",
    "Mesh": "mesh",
    "MixedPrecision": "precision",
    "PipelineModel": "pipeline",
    "Reduction": "reductions",
    "ShardedOptimizer": "sharding",
    "StepOutput": "pipeline",
    "WrappedOptimizer": "wrapper",
    "allgather_sparse": "sparse",
    "allgatherv": "sparse",
    "broadcast_optimizer_state": "broadcast",
    "clip_grad_norm_": "clip",
    "deferred_init": "deferred",
    "broadcast_parameters": "broadcast",
    "full_checkpoint": "layout_checkpoint",
    "full_state_dict": "tensor",
    "gather_counts": "sparse",
    "load_checkpoint": "layout_checkpoint",
    "load_full_checkpoint": "layout_checkpoint",
    "load_full_optimizer_state": "pipeline_checkpoint",
    "load_full_state": "pipeline_checkpoint",
    "load_full_state_dict": "tensor",
    "make_reduction": "reductions",
    "materialize": "deferred",
    "parallelize": "tensor",
    "plan_buckets": "buckets",
    "save_checkpoint": "layout_checkpoint",
    "step": "pipeline",
    "vocab_parallel_cross_entropy": "tensor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hpcml.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hpcml.parallel.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
