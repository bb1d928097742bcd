"""hpcml.parallel: every way of splitting a model or its gradients across ranks.

Data parallelism (:mod:`.optimizer`, :mod:`.data_parallel`, :mod:`.reductions`,
:mod:`.broadcast`): :class:`DistributedOptimizer` wraps any torch optimizer so that any training
loop averages its gradients over the ranks, overlapping the reduction with backward;
:func:`broadcast_parameters` and :func:`broadcast_optimizer_state` start every rank from the
same state. One module per parallelism; this file only re-exports them.
"""

from hpcml.parallel.broadcast import broadcast_optimizer_state, broadcast_parameters
from hpcml.parallel.buckets import plan_buckets
from hpcml.parallel.data_parallel import GradientReducer
from hpcml.parallel.memory import ExchangeMemory
from hpcml.parallel.optimizer import DistributedOptimizer
from hpcml.parallel.reductions import REDUCTIONS, Reduction, make_reduction
from hpcml.parallel.sparse import allgather_sparse, allgatherv, gather_counts
from hpcml.parallel.wrapper import WrappedOptimizer

__all__ = [
    "REDUCTIONS",
    "DistributedOptimizer",
    "ExchangeMemory",
    "GradientReducer",
    "Reduction",
    "WrappedOptimizer",
    "allgather_sparse",
    "allgatherv",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "gather_counts",
    "make_reduction",
    "plan_buckets",
]
