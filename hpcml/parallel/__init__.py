"""hpcml.parallel: every way of splitting a model or its gradients across ranks.

One :class:`Mesh` owns the process-group layout (data, pipeline, tensor sub-communicators).
Data parallelism (:mod:`.optimizer`, :mod:`.data_parallel`, :mod:`.reductions`,
:mod:`.broadcast`): :class:`DistributedOptimizer` wraps any torch optimizer so that any training
loop averages its gradients over the ranks, overlapping the reduction with backward;
:func:`broadcast_parameters` and :func:`broadcast_optimizer_state` start every rank from the
same state. Pipeline parallelism (:mod:`.pipeline`): :class:`PipelineModel` splits any
``nn.Module`` into stages and :func:`step` runs the user's step over microbatches. One module
per parallelism; this file only re-exports them.
"""

from hpcml.parallel.broadcast import broadcast_optimizer_state, broadcast_parameters
from hpcml.parallel.buckets import plan_buckets
from hpcml.parallel.data_parallel import GradientReducer
from hpcml.parallel.memory import ExchangeMemory
from hpcml.parallel.mesh import Mesh
from hpcml.parallel.optimizer import DistributedOptimizer
from hpcml.parallel.pipeline import PipelineModel, StepOutput, load_full_state, step
from hpcml.parallel.reductions import REDUCTIONS, Reduction, make_reduction
from hpcml.parallel.sparse import allgather_sparse, allgatherv, gather_counts
from hpcml.parallel.wrapper import WrappedOptimizer

__all__ = [
    "REDUCTIONS",
    "DistributedOptimizer",
    "ExchangeMemory",
    "GradientReducer",
    "Mesh",
    "PipelineModel",
    "Reduction",
    "StepOutput",
    "WrappedOptimizer",
    "allgather_sparse",
    "allgatherv",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "gather_counts",
    "load_full_state",
    "make_reduction",
    "plan_buckets",
    "step",
]
