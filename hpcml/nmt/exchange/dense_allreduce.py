"""Dense allreduce of assumed-sparse gradients: the fix of arXiv 1905.04035 (the Horovod
modification that converts assumed-sparse tensors to dense, ``sparse_as_dense``). Every gradient,
the sparse embedding's included, is densified into the fused buckets of
:class:`~hpcml.nmt.exchange.base.GradientExchange` and reduced by non-blocking allreduce from the
gradient hooks, so the exchange buffers are the model's size on every rank, independent of P.
"""

from __future__ import annotations

from hpcml.nmt.exchange.strategy import Strategy


class DenseAllreduce(Strategy):
    """All gradients in fused dense buckets."""

    name = "dense_allreduce"

    def fused(self, sparse: bool) -> bool:
        return True
