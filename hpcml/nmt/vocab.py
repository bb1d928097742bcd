"""Word-level tokenizer and joint vocabulary (pure functions, no MPI).

Tokens are maximal runs of letters, plus ``-`` and ``,`` as tokens of their own, so that
"quatre-vingt-dix" becomes ``quatre - vingt - dix`` and shares its parts with other numbers.
:func:`detokenize` inverts :func:`tokenize` on text made of such tokens separated by single
spaces. Source and target share one vocabulary because the model ties the source, target and
output embeddings (Vaswani et al. 2017, §3.4).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_TOKEN = re.compile(r"[^\W\d_]+|[-,]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``; hyphens and commas are separate tokens."""
    return _TOKEN.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens back into text: no spaces around ``-``, none before ``,``."""
    text = " ".join(tokens)
    return text.replace(" - ", "-").replace(" ,", ",")


def build_vocab(sentences: Iterable[Sequence[str]]) -> list[str]:
    """The special tokens, then every token by descending count (ties alphabetical), so the
    result depends only on the multiset of tokens."""
    counts = collections.Counter(tok for sent in sentences for tok in sent)
    ordered = sorted(counts, key=lambda t: (-counts[t], t))
    return [*SPECIALS, *(t for t in ordered if t not in SPECIALS)]


def encode(tokens: Sequence[str], index: dict[str, int]) -> list[int]:
    """Token ids; tokens missing from ``index`` map to ``UNK``."""
    return [index.get(t, UNK) for t in tokens]


def decode(ids: Iterable[int], vocab: Sequence[str]) -> list[str]:
    """Tokens of ``ids`` up to (not including) the first ``EOS``; ``PAD``/``BOS`` dropped."""
    out = []
    for i in ids:
        if i == EOS:
            break
        if i not in (PAD, BOS):
            out.append(vocab[i])
    return out
