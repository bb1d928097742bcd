"""The real-corpus pipeline without MPI: aligned text and TSV round trips and refusals, the
subword corpus decodes back to its text, length buckets respect their token budget, the shipped
catalog corpus is consistent, and beam search is greedy at beam 1 and exhaustive search when the
beam holds every hypothesis."""

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcml.errors import UsageError
from hpcml.nmt.beam import beam_search, length_penalty
from hpcml.nmt.buckets import bucket_batches
from hpcml.nmt.model import Transformer
from hpcml.nmt.subword import detokenizer, prepare, references
from hpcml.nmt.text import read_pairs, write_pairs
from hpcml.nmt.vocab import BOS, EOS, PAD, SPECIALS

DATA = Path(__file__).resolve().parents[1] / "data" / "nmt"
PAIRS = [("Cannot open '%s'", "Impossible d'ouvrir « %s »"), ("done.", "terminé."),
         ("  spaced  out ", "espacé\u00a0: oui")]


def test_text_round_trip_and_tsv(tmp_path):
    write_pairs(tmp_path / "train", "en", "fr", PAIRS)
    assert read_pairs(tmp_path / "train", "en", "fr") == [(s.strip(), t.strip())
                                                           for s, t in PAIRS]
    (tmp_path / "t.tsv").write_text("a b\tc d\r\ne\tf\n", encoding="utf-8")
    assert read_pairs(tmp_path / "t", "en", "fr") == [("a b", "c d"), ("e", "f")]


@pytest.mark.parametrize("files, message", [
    ({"x.en": "a\nb\n", "x.fr": "c\n"}, "x.fr: 1 lines but"),
    ({"x.tsv": "a\tb\nc\n"}, "x.tsv: line 2 has 1 tab-separated fields"),
    ({"x.en": "a\n\n", "x.fr": "c\nd\n"}, "x.en: line 2 has an empty side"),
    ({}, "neither x.en + x.fr nor x.tsv")])
def test_text_refuses_misaligned_input(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(message)):
        read_pairs(tmp_path / "x", "en", "fr")


def test_subword_corpus_decodes_to_its_text(tmp_path):
    lines = {s: read_pairs(DATA / "catalogs-en-fr" / s, "en", "fr")[:n]
             for s, n in (("train", 600), ("valid", 20), ("test", 30))}
    for split, pairs in lines.items():
        write_pairs(tmp_path / "txt" / split, "en", "fr", pairs)
    out = prepare(tmp_path / "txt", tmp_path / "c.h5", vocab_size=300)
    detok = detokenizer(out)
    with h5py.File(out) as f:
        assert len(f["vocab"]) == 300
        assert [t.decode() for t in f["vocab"][:4]] == list(SPECIALS)
        for split, pairs in lines.items():
            for key, side in (("src", 0), ("tgt", 1)):
                ids, off = f[f"{split}/{key}_ids"][:], f[f"{split}/{key}_offsets"][:]
                decoded = [detok([*ids[off[i]:off[i + 1]], EOS, 7]) for i in range(len(pairs))]
                assert decoded == [p[side] for p in pairs]
    assert references(out, "test", 5, 9) == [p[1] for p in lines["test"][5:9]]


def test_buckets_respect_the_token_budget_and_cover_every_sentence():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = bucket_batches(src, tgt, 256, rng.permutation(500))
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        width = max(src[b].max(), tgt[b].max()) + 1
        assert len(b) == 1 or width * len(b) <= 256
    widths = [max(src[b].max(), tgt[b].max()) + 1 for b in batches]
    assert sum(w * len(b) for w, b in zip(widths, batches, strict=True)) < 1.3 * (
        np.maximum(src, tgt) + 1).sum()  # length-sorted: little padding


def test_shipped_catalog_corpus_is_consistent():
    root = DATA / "catalogs-en-fr"
    sources = [line.split("\t") for line in (root / "SOURCES.tsv").read_text().splitlines()[1:]]
    total = 0
    for split in ("train", "valid", "test"):
        pairs = read_pairs(root / split, "en", "fr")
        domains = (root / f"{split}.domain").read_text().splitlines()
        assert len(domains) == len(pairs) and set(domains) <= {s[0] for s in sources}
        total += len(pairs)
        assert references(DATA / "catalogs-en-fr.h5", split, 0, len(pairs)) == [
            t for _, t in pairs]
    assert total == sum(int(s[4]) for s in sources) > 10000


def tiny(vocab=12, seed=0):
    torch.manual_seed(seed)
    return Transformer(vocab, d_model=16, heads=2, layers=1, ff=32, dropout=0.0).eval()


def test_beam_one_is_greedy():
    model = tiny(vocab=40)
    src = torch.randint(4, 40, (7, 9))
    src[3, 5:] = PAD
    assert torch.equal(beam_search(model, src, 1, 12), model.greedy(src, 12))


def all_complete_scores(model, src, vocab, steps):
    """Every hypothesis that ended in EOS or reached ``steps`` tokens, with its summed
    log-probability, by walking the whole tree (one decoder call per depth)."""
    with torch.no_grad():
        memory, mask = model.encode(src)
        frontier, prefix_score, complete = [()], {(): 0.0}, {}
        for depth in range(steps):
            tgt = torch.tensor([[BOS, *p] for p in frontier])
            logits = model.decode(memory.expand(len(frontier), -1, -1),
                                  mask.expand(len(frontier), -1), tgt)
            logp = torch.log_softmax(logits[:, -1], dim=-1)
            grown = []
            for i, p in enumerate(frontier):
                for tok in range(vocab):
                    q, score = (*p, tok), prefix_score[p] + float(logp[i, tok])
                    if tok == EOS or depth == steps - 1:
                        complete[q] = score
                    else:
                        prefix_score[q] = score
                        grown.append(q)
            frontier = grown
    return complete


def test_full_beam_is_exhaustive_search():
    """With a beam holding every hypothesis of up to 3 tokens, beam search returns the best of
    all of them under the length-penalised score, found here by enumerating the tree."""
    vocab, steps, alpha = 6, 3, 0.6
    model = tiny(vocab=vocab, seed=3)
    src = torch.tensor([[4, 5, 4, EOS]])
    complete = all_complete_scores(model, src, vocab, steps)
    best = max(complete, key=lambda q: complete[q]
               / float(length_penalty(torch.tensor(len(q)), alpha)))
    out = beam_search(model, src, vocab ** steps, steps, alpha)[0].tolist()
    assert [t for t in out if t != PAD] == list(best)
