"""Tensor parallelism (Megatron-LM, arXiv 1909.08053; the SageMaker model-parallelism library,
arXiv 2111.05972 §3.3): layers split over a tensor-parallel communicator, the collectives that
join them as autograd functions, vocabulary-parallel cross entropy, ``parallelize`` and full-state
checkpoints. Every byte moves through :mod:`hpcml.comm`."""

from hpcml.parallel.tensor.layers import (
    ColumnParallelLinear,
    HeadParallelAttention,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from hpcml.parallel.tensor.loss import vocab_parallel_cross_entropy, vocab_range
from hpcml.parallel.tensor.mappings import Shard, copy_to, gather, reduce_from, scatter
from hpcml.parallel.tensor.plan import (
    default_plan,
    full_state_dict,
    load_full_state_dict,
    parallelize,
)

__all__ = ["ColumnParallelLinear", "HeadParallelAttention", "RowParallelLinear", "Shard",
           "VocabParallelEmbedding", "copy_to", "default_plan", "full_state_dict", "gather",
           "load_full_state_dict", "parallelize", "reduce_from", "scatter",
           "vocab_parallel_cross_entropy", "vocab_range"]
