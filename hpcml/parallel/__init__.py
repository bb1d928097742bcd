"""hpcml.parallel: every way of splitting a model or its gradients across ranks.

One :class:`Mesh` owns the process-group layout (data, pipeline, tensor sub-communicators).
Data parallelism (:mod:`.optimizer`, :mod:`.data_parallel`, :mod:`.reductions`,
:mod:`.broadcast`): :class:`DistributedOptimizer` wraps any torch optimizer so that any training
loop averages its gradients over the ranks, overlapping the reduction with backward;
:func:`broadcast_parameters` and :func:`broadcast_optimizer_state` start every rank from the
same state. Pipeline parallelism (:mod:`.pipeline`): :class:`PipelineModel` splits any
``nn.Module`` into stages and :func:`step` runs the user's step over microbatches. One module
per parallelism; this file only re-exports them, each on first use (PEP 562), so that
``from hpcml.parallel import Mesh`` does not pay for importing torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    "REDUCTIONS": "reductions",
    "DistributedOptimizer": "optimizer",
    "ExchangeMemory": "memory",
    "GradientReducer": "data_parallel",
    "Mesh": "mesh",
    "PipelineModel": "pipeline",
    "Reduction": "reductions",
    "StepOutput": "pipeline",
    "WrappedOptimizer": "wrapper",
    "allgather_sparse": "sparse",
    "allgatherv": "sparse",
    "broadcast_optimizer_state": "broadcast",
    "broadcast_parameters": "broadcast",
    "gather_counts": "sparse",
    "load_full_optimizer_state": "pipeline_checkpoint",
    "load_full_state": "pipeline_checkpoint",
    "make_reduction": "reductions",
    "plan_buckets": "buckets",
    "step": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hpcml.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hpcml.parallel.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
