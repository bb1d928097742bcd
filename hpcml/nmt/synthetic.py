"""Synthetic translation batches at the paper's scale: token-count batches of sentence pairs
whose lengths follow a WMT-like distribution and whose token ids follow Zipf's law.

What the gradient exchange of arXiv 1905.04035 depends on is the vocabulary (32,768 shared
subwords in its WMT En-De setup), the model widths and how many tokens each rank looks up per
step; the words themselves do not matter. So the paper-scale benchmark draws:

- **lengths**: source length ~ log-normal (median ``median_len`` subwords, shape ``sigma``),
  rounded and clipped to [1, ``max_len``]; target length = source length x a log-normal ratio
  (median 1, shape 0.1), clipped alike. With the defaults (median 24, sigma 0.55) the mean is
  about 28 subwords, roughly WMT14 En-De after 32k BPE;
- **ids**: rank k of the vocabulary (k = 1 .. vocab - 4, id = k + 3, after PAD/BOS/EOS/UNK) with
  probability proportional to 1 / k^``zipf`` (Zipf's law, exponent about 1 for natural text);
- **token batches**: sentences are drawn until the batch holds ``budget`` target tokens (the last
  sentence is kept whole), the way tensor2tensor/fairseq batch by token count.

:meth:`SyntheticStream.batch` gives the same global batch for ``step`` at every P (it is drawn
from ``(seed, step)`` only) and hands rank r its contiguous share of the sentences, balanced by
token count. Weak scaling uses ``budget = tokens_per_rank x P``, strong scaling a fixed global
``budget``: one mechanism, the budget is the parameter. Pure; no MPI.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hpcml.config import option
from hpcml.nmt.data import Batch, collate
from hpcml.nmt.vocab import SPECIALS


@dataclasses.dataclass
class SyntheticConfig:
    vocab: int = option(0, min=0, help="shared subword vocabulary of synthetic batches "
                                       "(0 = read batches from data.path instead)")
    zipf: float = option(1.0, gt=0.0, help="Zipf exponent of the token ids")
    median_len: float = option(24.0, gt=0.0, help="median source length in subwords")
    sigma: float = option(0.55, min=0.0, help="log-normal shape of the sentence lengths")
    max_len: int = option(100, min=1, help="longest sentence (subwords)")


def zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    """Cumulative probabilities of the ``vocab - len(SPECIALS)`` non-special ids (Zipf)."""
    ranks = np.arange(1, vocab - len(SPECIALS) + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -exponent)
    return cdf / cdf[-1]


class SyntheticStream:
    """Step-indexed synthetic batches of one rank (see module docstring)."""

    def __init__(self, cfg: SyntheticConfig, budget: int, seed: int, rank: int,
                 size: int) -> None:
        self.cfg, self.budget, self.seed, self.rank, self.size = cfg, budget, seed, rank, size
        self._cdf = zipf_cdf(cfg.vocab, cfg.zipf)

    def _lengths(self, rng: np.random.Generator, n: int) -> np.ndarray:
        src = np.rint(self.cfg.median_len * rng.lognormal(0.0, self.cfg.sigma, n))
        src = np.clip(src, 1, self.cfg.max_len)
        tgt = np.clip(np.rint(src * rng.lognormal(0.0, 0.1, n)), 1, self.cfg.max_len)
        return np.stack([src, tgt], axis=1).astype(np.int64)

    def global_pairs(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """All sentence pairs of global step ``step`` (identical on every rank and every P)."""
        rng = np.random.default_rng([self.seed, step, 7])
        lengths = np.zeros((0, 2), dtype=np.int64)
        while lengths[:, 1].sum() < self.budget:
            lengths = np.concatenate([lengths, self._lengths(rng, 64)])
        cut = int(np.searchsorted(np.cumsum(lengths[:, 1]), self.budget)) + 1
        lengths = lengths[:max(cut, self.size)]
        ids = np.searchsorted(self._cdf, rng.random(int(lengths.sum()))) + len(SPECIALS)
        pairs, pos = [], 0
        for s, t in lengths:
            pairs.append((ids[pos:pos + s], ids[pos + s:pos + s + t]))
            pos += s + t
        return pairs

    def batch(self, step: int) -> Batch:
        """This rank's contiguous, token-balanced share of global step ``step``."""
        pairs = self.global_pairs(step)
        edges = token_split([len(t) for _, t in pairs], self.size)
        mine = pairs[edges[self.rank]:edges[self.rank + 1]]
        return collate([s for s, _ in mine], [t for _, t in mine])


def token_split(tokens: list[int], parts: int) -> list[int]:
    """Edges ``e`` (``parts + 1`` of them, ``e[0] = 0``, ``e[-1] = len(tokens)``) of contiguous
    slices holding about equal token sums, each slice non-empty (``len(tokens) >= parts``)."""
    before = np.concatenate([[0], np.cumsum(tokens)[:-1]])
    n, total = len(tokens), float(np.sum(tokens))
    edges = [0]
    for i in range(1, parts):
        want = int(np.searchsorted(before, total * i / parts))
        edges.append(min(max(want, edges[-1] + 1), n - (parts - i)))
    return [*edges, n]
