"""Tensor-parallel layers, each built from the full (single-process) layer so a parallel model
computes what the original computed (Megatron-LM, arXiv 1909.08053 §3).

- :class:`ColumnParallelLinear`: output features split; replicated input, output features
  sharded (or gathered with ``gather_output=True``).
- :class:`RowParallelLinear`: input features split; sharded input (or scattered from a
  replicated one with ``input_is_parallel=False``), outputs summed over the group, bias added once.
- :class:`VocabParallelEmbedding`: vocabulary rows split (uneven splits allowed); each rank looks
  up the ids it owns, zero elsewhere, and the rows are summed over the group. ``project(h)``
  reuses the shard as a tied output projection and returns this rank's slice of the logits, for
  :func:`~hpcml.parallel.tensor.loss.vocab_parallel_cross_entropy`.
- :class:`HeadParallelAttention`: a drop-in for ``nn.MultiheadAttention`` (same call, same
  parameter names) whose heads are split: column-parallel query/key/value, row-parallel output.
- :class:`ShardedDropout`: ``nn.Dropout`` for an activation split over the group (the hidden
  layer between a column- and a row-parallel Linear).

Dropout on sharded activations (attention probabilities of this rank's heads,
:class:`ShardedDropout`) draws masks independent across ranks; dropout on replicated activations
stays ``nn.Dropout`` on the default generator, identical on every rank
(:mod:`~hpcml.parallel.tensor.rng`).

Every layer's ``forward`` is collective over its tensor-parallel group (all ranks call it with
the same replicated inputs, forward and backward). ``tp_shards`` maps each sharded parameter's
name to its :class:`~hpcml.parallel.tensor.mappings.Shard`; the other parameters are replicated.
Column, row and head splits must be even; vocabulary splits may be uneven.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcml.comm import Communicator, chunk_bounds
from hpcml.errors import UsageError
from hpcml.parallel.tensor.guard import guard, reading, sharded_parameter
from hpcml.parallel.tensor.mappings import Shard, copy_to, gather, reduce_from, scatter
from hpcml.parallel.tensor.rng import sharded_dropout


def _even(what: str, n: int, comm: Communicator) -> int:
    if n % comm.size:
        raise UsageError(f"{what} = {n} does not split evenly over {comm.size} tensor-parallel "
                         f"ranks; choose a tensor degree that divides it, or plan it 'replicate'")
    return n // comm.size


def _param(full: nn.Parameter, shard: Shard | None, comm: Communicator,
           name: str) -> nn.Parameter:
    """A replicated parameter stays the very ``full`` Parameter (a tie to another module is
    kept); a split one becomes this rank's :class:`ShardedParameter`, named ``name``."""
    return full if shard is None else sharded_parameter(full, shard, comm, name)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with the rows of ``W`` (output features) split over ``comm``."""

    tp_shards = {"weight": Shard(0), "bias": Shard(0)}

    def __init__(self, full: nn.Linear, comm: Communicator, gather_output: bool = False) -> None:
        super().__init__()
        _even("out_features", full.out_features, comm)
        self.comm, self.gather_output = comm, gather_output
        self.in_features, self.out_features = full.in_features, full.out_features
        self.weight = _param(full.weight, Shard(0), comm, "ColumnParallelLinear.weight")
        self.bias = None if full.bias is None else \
            _param(full.bias, Shard(0), comm, "ColumnParallelLinear.bias")
        guard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to(x, self.comm), self.weight, self.bias)
        return gather(y, self.comm, -1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with the columns of ``W`` (input features) split over ``comm``."""

    tp_shards = {"weight": Shard(1)}

    def __init__(self, full: nn.Linear, comm: Communicator,
                 input_is_parallel: bool = True) -> None:
        super().__init__()
        _even("in_features", full.in_features, comm)
        self.comm, self.input_is_parallel = comm, input_is_parallel
        self.in_features, self.out_features = full.in_features, full.out_features
        self.weight = _param(full.weight, Shard(1), comm, "RowParallelLinear.weight")
        self.bias = None if full.bias is None else _param(full.bias, None, comm, "")
        guard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter(x, self.comm, -1)
        y = reduce_from(F.linear(x, self.weight), self.comm)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with its rows split over ``comm`` (rank r owns ids
    ``chunk_bounds(num_embeddings, T, r)``); ``max_norm`` is not supported."""

    tp_shards = {"weight": Shard(0)}

    def __init__(self, full: nn.Embedding, comm: Communicator) -> None:
        super().__init__()
        if full.max_norm is not None:
            raise UsageError("nn.Embedding(max_norm=...) cannot be vocabulary-parallel (the norm "
                             "would renormalise one shard); plan it 'replicate'")
        self.comm = comm
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.vocab_start, self.vocab_end = chunk_bounds(full.num_embeddings, comm.size, comm.rank)
        pad = full.padding_idx
        self.padding_idx = pad if pad is not None and self.vocab_start <= pad < self.vocab_end \
            else None
        self.sparse = full.sparse
        self.weight = _param(full.weight, Shard(0), comm, "VocabParallelEmbedding.weight")
        guard(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        pad = None if self.padding_idx is None else self.padding_idx - self.vocab_start
        rows = F.embedding(local, self.weight, pad, sparse=self.sparse)
        return reduce_from(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.comm)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output projection ``h W^T`` restricted to this rank's vocabulary: logits of shape
        ``(*h.shape[:-1], vocab_end - vocab_start)``; ``h`` replicated over the group."""
        with reading(self):
            return F.linear(copy_to(h, self.comm), self.weight)


class HeadParallelAttention(nn.Module):
    """``nn.MultiheadAttention`` (same ``forward`` signature, ``need_weights`` must be False)
    with its heads split evenly over ``comm``. Rank r computes heads ``[r H/T, (r+1) H/T)``:
    the rows of ``in_proj_weight`` for those heads of query, key and value (column-parallel) and
    the matching columns of ``out_proj.weight`` (row-parallel)."""

    tp_shards = {"in_proj_weight": Shard(0, 3), "in_proj_bias": Shard(0, 3),
                 "out_proj.weight": Shard(1)}

    def __init__(self, full: nn.MultiheadAttention, comm: Communicator) -> None:
        super().__init__()
        if not full._qkv_same_embed_dim or full.bias_k is not None or full.add_zero_attn:
            raise UsageError("head-parallel attention needs nn.MultiheadAttention without kdim/"
                             "vdim, add_bias_kv or add_zero_attn; plan it 'replicate'")
        self.comm = comm
        self.embed_dim, self.batch_first, self.dropout = full.embed_dim, full.batch_first, \
            full.dropout
        self.num_heads = _even("num_heads", full.num_heads, comm)
        self.head_dim = full.head_dim
        # torch's fused inference path reads in_proj_weight as if it held every head; this flag
        # is one of its preconditions, so setting it False keeps TransformerEncoderLayer off it.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = _param(full.in_proj_weight, Shard(0, 3), comm,
                                     "HeadParallelAttention.in_proj_weight")
        self.in_proj_bias = None if full.in_proj_bias is None else \
            _param(full.in_proj_bias, Shard(0, 3), comm, "HeadParallelAttention.in_proj_bias")
        self.out_proj = RowParallelLinear(full.out_proj, comm)
        guard(self)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise UsageError("HeadParallelAttention cannot return attention weights (each rank "
                             "holds some heads); call it with need_weights=False")
        entered: dict[int, torch.Tensor] = {}
        for t in (query, key, value):  # self-attention enters the region once, not three times
            if id(t) not in entered:
                entered[id(t)] = copy_to(t, self.comm)
        q, k, v = (entered[id(t)] for t in (query, key, value))
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (self._heads(F.linear(t, w, b)) for t, w, b in
                   ((q, w_q, b_q), (k, w_k, b_k), (v, w_v, b_v)))
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, q)
        if self.training and self.dropout > 0 and self.comm.size > 1:
            # this rank's heads: a mask independent of the other ranks' (tensor.rng)
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            scores = scores if mask is None else scores + mask
            dead = scores.isneginf().all(dim=-1, keepdim=True)  # rows that see no key: 0, as
            probs = scores.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)  # SDPA
            ctx = sharded_dropout(probs, self.dropout, True, self.comm) @ v
        else:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(ctx.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


class ShardedDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``) for an activation sharded over ``comm``: the mask is drawn by
    :func:`~hpcml.parallel.tensor.rng.sharded_dropout`, independent across ranks. Not
    collective (draws one number from the default generator, like every tensor rank)."""

    def __init__(self, full: nn.Dropout, comm: Communicator) -> None:
        super().__init__(full.p, full.inplace)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sharded_dropout(x, self.p, self.training, self.comm)


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                   is_causal: bool, q: torch.Tensor) -> torch.Tensor | None:
    """One float mask of shape broadcastable to (batch, heads, L, S), as
    ``nn.MultiheadAttention`` merges them (boolean True = not allowed = -inf)."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=q.dtype).masked_fill(m, float("-inf"))
        return m.to(q.dtype)

    if attn_mask is None and is_causal:
        n = q.shape[-2]
        attn_mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # (batch * heads, L, S) is not supported head-parallel
            raise UsageError("a per-head 3-D attn_mask cannot be split by heads; pass a 2-D mask")
    if key_padding_mask is not None:
        pad = additive(key_padding_mask)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask
