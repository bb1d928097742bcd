"""hpcml.parallel: every way of splitting a model, its gradients or its optimizer state across
ranks, one module per parallelism, all on :mod:`hpcml.comm`."""

from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.tensor import (
    full_state_dict,
    load_full_state_dict,
    parallelize,
    vocab_parallel_cross_entropy,
)

__all__ = ["ShardedOptimizer", "full_state_dict", "load_full_state_dict", "parallelize",
           "vocab_parallel_cross_entropy"]
