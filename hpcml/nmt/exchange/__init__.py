"""Gradient-exchange strategies over one mechanism (:mod:`.base`): ``sparse_allgather``,
``dense_allreduce`` and ``auto``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hpcml.comm import Communicator
from hpcml.nmt.exchange.auto import Auto
from hpcml.nmt.exchange.base import GradientExchange, plan_buckets
from hpcml.nmt.exchange.dense_allreduce import DenseAllreduce
from hpcml.nmt.exchange.memory import ExchangeMemory
from hpcml.nmt.exchange.sparse_allgather import SparseAllgather, allgather_sparse
from hpcml.nmt.exchange.strategy import Strategy

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (SparseAllgather, DenseAllreduce,
                                                             Auto)}


def make_exchange(name: str, comm: Communicator, model: nn.Module, bucket_bytes: int = 2**20,
                  on_choice: Callable[[str, str], None] | None = None) -> GradientExchange:
    """The exchange for strategy ``name`` (one of :data:`STRATEGIES`); collective."""
    return GradientExchange(comm, model, STRATEGIES[name](), bucket_bytes, on_choice)


__all__ = ["STRATEGIES", "ExchangeMemory", "GradientExchange", "allgather_sparse",
           "make_exchange", "plan_buckets"]
