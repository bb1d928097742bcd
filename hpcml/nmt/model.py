"""Encoder-decoder transformer for translation (Vaswani et al. 2017) with tied embeddings whose
gradient is *sparse*, as in the frameworks of arXiv 1905.04035.

- One ``nn.Embedding(vocab, d_model, sparse=True)`` serves as source embedding, target embedding
  and output projection (three-way tying, Vaswani §3.4; inputs scaled by sqrt(d_model)) plus
  sinusoidal positions (§3.5), pre-norm encoder/decoder layers from ``torch.nn``.
- With ``sparse=True`` the embedding lookups give sparse COO gradients, and the output projection
  :class:`SparseTiedProjection` returns its (dense) weight gradient as a COO tensor covering all
  ``vocab`` rows. That is what TensorFlow did when it summed the projection's dense gradient with
  the embeddings' ``IndexedSlices`` (the paper's account of TensorFlow's tensor accumulation:
  the result is "assumed sparse" although it covers the whole vocabulary), so the tied weight's
  ``.grad`` is an uncoalesced sparse tensor with more rows than the vocabulary (all ``vocab``
  projection rows plus rows for the looked-up tokens), and a sparse allgather of it moves more
  than a dense allreduce would. With ``sparse=False`` every gradient is dense (the torch-DDP peer).
- Loss: label-smoothed cross entropy (Szegedy et al. 2016, Vaswani §5.4) summed over non-PAD
  target tokens; learning rate: Vaswani Eq. (3), :func:`noam_lr`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcml.nmt.vocab import BOS, EOS, PAD


class SparseTiedProjection(torch.autograd.Function):
    """``logits = h @ W^T`` whose gradient w.r.t. ``W`` is a sparse COO tensor over all rows."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(h, weight)
        return h @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        h, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.shape[0])
        dense = g2.t() @ h.reshape(-1, weight.shape[1])
        rows = torch.arange(weight.shape[0], device=weight.device).unsqueeze(0)
        return grad @ weight, torch.sparse_coo_tensor(rows, dense, weight.shape,
                                                       check_invariants=False)


def sinusoids(length: int, d_model: int) -> torch.Tensor:
    """Vaswani Eq. in §3.5: PE(pos, 2i) = sin(pos/10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                     * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return pe


class Transformer(nn.Module):
    """``forward(src, tgt_in) -> logits`` of shape (batch, T, vocab); PAD = 0 is masked."""

    def __init__(self, vocab: int, d_model: int = 64, heads: int = 4, layers: int = 2,
                 ff: int = 128, dropout: float = 0.1, sparse: bool = True,
                 max_len: int = 256) -> None:
        super().__init__()
        self.sparse = sparse
        self.embed = nn.Embedding(vocab, d_model, sparse=sparse)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        self.register_buffer("pe", sinusoids(max_len, d_model), persistent=False)
        self.scale = math.sqrt(d_model)
        self.drop = nn.Dropout(dropout)
        enc = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True,
                                         norm_first=True)
        dec = nn.TransformerDecoderLayer(d_model, heads, ff, dropout, batch_first=True,
                                         norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, layers, norm=nn.LayerNorm(d_model))

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose ``.grad`` is a sparse COO tensor after backward."""
        return [self.embed.weight] if self.sparse else []

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embed(ids) * self.scale + self.pe[: ids.shape[1]])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = src == PAD
        return self.encoder(self._embed(src), src_key_padding_mask=mask), mask

    def _decoder_states(self, memory: torch.Tensor, src_mask: torch.Tensor,
                        tgt_in: torch.Tensor) -> torch.Tensor:
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        return self.decoder(self._embed(tgt_in), memory, tgt_mask=causal,
                            tgt_key_padding_mask=tgt_in == PAD, memory_key_padding_mask=src_mask)

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor,
               tgt_in: torch.Tensor) -> torch.Tensor:
        h = self._decoder_states(memory, src_mask, tgt_in)
        if self.sparse:
            return SparseTiedProjection.apply(h, self.embed.weight)
        return F.linear(h, self.embed.weight)

    def next_logits(self, memory: torch.Tensor, src_mask: torch.Tensor,
                    tgt_in: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) logits of the token after ``tgt_in``: :meth:`decode`'s last position,
        projected alone (for decoding)."""
        return F.linear(self._decoder_states(memory, src_mask, tgt_in)[:, -1], self.embed.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src)
        return self.decode(memory, mask, tgt_in)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding: (batch, <= max_len) token ids, each row stopping after EOS."""
        memory, mask = self.encode(src)
        out = torch.full((src.shape[0], 1), BOS, dtype=torch.long)
        done = torch.zeros(src.shape[0], dtype=torch.bool)
        for _ in range(max_len):
            nxt = self.next_logits(memory, mask, out).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            out = torch.cat([out, nxt.unsqueeze(1)], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return out[:, 1:]


def smoothed_loss_sum(logits: torch.Tensor, target: torch.Tensor,
                      smoothing: float) -> torch.Tensor:
    """Label-smoothed cross entropy summed over non-PAD targets (PAD targets ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=PAD, label_smoothing=smoothing, reduction="sum")


def noam_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """Vaswani Eq. (3): scale * d^-0.5 * min(step^-0.5, step * warmup^-1.5), step >= 1."""
    step = max(step, 1)
    return scale * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
