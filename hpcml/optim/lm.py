"""A small GPT-style causal language model (decoder-only transformer) for byte tokens.

Token embedding scaled by sqrt(d_model) plus the sinusoidal positions of
:func:`hpcml.nmt.model.sinusoids`, pre-norm ``torch.nn.TransformerEncoderLayer`` blocks under a
causal mask (each position attends to itself and earlier ones only), a final LayerNorm and the
output projection tied to the embedding (as GPT-2). All gradients are dense.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcml.nmt.model import sinusoids


class CausalLM(nn.Module):
    """``forward(ids) -> logits``: ids (batch, T <= max_len) int64, logits (batch, T, vocab)."""

    def __init__(self, vocab: int = 256, d_model: int = 64, heads: int = 4, layers: int = 2,
                 ff: int = 256, max_len: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        self.register_buffer("pe", sinusoids(max_len, d_model), persistent=False)
        self.scale = math.sqrt(d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(d_model),
                                            enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.embed(ids) * self.scale + self.pe[:t]
        h = self.blocks(h, mask=causal, is_causal=True)
        return F.linear(h, self.embed.weight)


def next_token_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy (nats per token) of predicting ``windows[:, 1:]`` from
    ``windows[:, :-1]``; ``windows`` is (batch, T + 1) int64."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
