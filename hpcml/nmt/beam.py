"""Beam search for :class:`~hpcml.nmt.model.Transformer` (Sutskever et al. 2014; length
penalty of Wu et al. 2016, GNMT §7: ``lp(Y) = ((5 + |Y|) / 6) ** alpha``).

Every sentence of the batch keeps ``beam`` hypotheses; each step expands every live hypothesis
by every token, scores ``sum log p``, and keeps the ``beam`` best per sentence. A hypothesis
that emits EOS is finished: it is extended only by PAD at no cost, so it keeps competing with
its final score. At the end (all hypotheses finished or ``max_len`` steps) the hypothesis with
the best ``score / lp(length)`` wins (length counts the tokens up to and including EOS; with
``alpha = 0`` the raw score). At the first step only one copy of each sentence is live, so the
beam never holds duplicates. With ``beam = 1`` this is exactly greedy decoding
(:meth:`Transformer.greedy`): the best of one candidate per step is the argmax.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcml.nmt.vocab import BOS, EOS, PAD


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's ``((5 + length) / 6) ** alpha``."""
    return ((5.0 + length.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: nn.Module, src: torch.Tensor, beam: int, max_len: int,
                alpha: float = 0.0) -> torch.Tensor:
    """Best hypothesis per sentence: (batch, <= max_len) ids, EOS then PAD, like
    :meth:`Transformer.greedy`. Not collective."""
    n = src.shape[0]
    memory, mask = model.encode(src)
    memory = memory.repeat_interleave(beam, dim=0)
    mask = mask.repeat_interleave(beam, dim=0)
    out = torch.full((n * beam, 1), BOS, dtype=torch.long)
    scores = torch.full((n, beam), float("-inf"))
    scores[:, 0] = 0.0
    done = torch.zeros(n * beam, dtype=torch.bool)
    lengths = torch.zeros(n * beam, dtype=torch.long)
    for _ in range(max_len):
        logp = torch.log_softmax(model.next_logits(memory, mask, out).float(), dim=-1)
        vocab = logp.shape[-1]
        finished = torch.full_like(logp, float("-inf"))
        finished[:, PAD] = 0.0
        logp = torch.where(done.unsqueeze(1), finished, logp)
        cand = (scores.reshape(-1, 1) + logp).reshape(n, beam * vocab)
        scores, flat = cand.topk(beam, dim=1)
        origin = (flat // vocab + torch.arange(n).unsqueeze(1) * beam).reshape(-1)
        token = (flat % vocab).reshape(-1)
        out = torch.cat([out[origin], token.unsqueeze(1)], dim=1)
        was_done = done[origin]
        lengths = lengths[origin] + (~was_done).long()
        done = was_done | (token == EOS)
        if bool(done.all()):
            break
    best = (scores / length_penalty(lengths.reshape(n, beam), alpha)).argmax(dim=1)
    return out.reshape(n, beam, -1)[torch.arange(n), best, 1:]
