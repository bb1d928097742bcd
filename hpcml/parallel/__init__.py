"""hpcml.parallel: every way of splitting a model, its gradients or its optimizer state across
ranks, one module per parallelism over :mod:`hpcml.comm`; this file only re-exports them.

Data parallelism (:mod:`.optimizer`, :mod:`.data_parallel`, :mod:`.reductions`,
:mod:`.broadcast`): :class:`DistributedOptimizer` wraps any torch optimizer so that any training
loop averages its gradients over the ranks, overlapping the reduction with backward;
:func:`broadcast_parameters` and :func:`broadcast_optimizer_state` start every rank from the
same state. Tensor parallelism (:mod:`.tensor`): :func:`parallelize` splits layers over a
tensor-parallel communicator. Optimizer-state sharding (:mod:`.sharding`, ZeRO-1):
:class:`ShardedOptimizer`.
"""

from hpcml.parallel.broadcast import broadcast_optimizer_state, broadcast_parameters
from hpcml.parallel.buckets import plan_buckets
from hpcml.parallel.data_parallel import GradientReducer
from hpcml.parallel.memory import ExchangeMemory
from hpcml.parallel.optimizer import DistributedOptimizer
from hpcml.parallel.reductions import REDUCTIONS, Reduction, make_reduction
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.sparse import allgather_sparse, allgatherv, gather_counts
from hpcml.parallel.tensor import (
    full_state_dict,
    load_full_state_dict,
    parallelize,
    vocab_parallel_cross_entropy,
)
from hpcml.parallel.wrapper import WrappedOptimizer

__all__ = [
    "REDUCTIONS",
    "DistributedOptimizer",
    "ExchangeMemory",
    "GradientReducer",
    "Reduction",
    "ShardedOptimizer",
    "WrappedOptimizer",
    "allgather_sparse",
    "allgatherv",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "full_state_dict",
    "gather_counts",
    "load_full_state_dict",
    "make_reduction",
    "parallelize",
    "plan_buckets",
    "vocab_parallel_cross_entropy",
]
