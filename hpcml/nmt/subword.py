"""Joint subword vocabulary (SentencePiece) and the HDF5 corpus of a parallel text corpus.

:func:`train_subword` trains one SentencePiece model (unigram LM, Kudo 2018; ``model_type``
"bpe" for byte-pair encoding) on the source *and* target sides of the training split, since the
transformer ties source, target and output embeddings (Vaswani et al. 2017, §3.4). Its ids 0-3
are hpcml's PAD, BOS, EOS, UNK, under hpcml's names (:mod:`hpcml.nmt.vocab`), so the rest of
:mod:`hpcml.nmt` works on its ids unchanged. Training is made deterministic: one thread, no
input sampling or shuffling, fixed seed sentence-piece set. No normalization (identity rule,
white space kept), so decoding the ids of a sentence gives the sentence back wherever its
characters are in the vocabulary (``character_coverage`` 1.0: all characters of the training
text).

:func:`prepare` writes the layout of :mod:`hpcml.nmt.corpus` (``vocab``; per split
``src_ids``/``src_offsets``/``tgt_ids``/``tgt_offsets``) plus ``subword_model`` (the serialized
model) and, per split, ``tgt_text`` (the original target sentences: BLEU is computed against
them, never against decoded ids). :func:`detokenizer` and :func:`references` read those back.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import sentencepiece as spm

from hpcml.errors import UsageError
from hpcml.nmt.corpus import SPLITS, _flat
from hpcml.nmt.text import read_pairs
from hpcml.nmt.vocab import BOS, EOS, PAD, SPECIALS, UNK, decode, detokenize

MODEL_KEY, TEXT_KEY = "subword_model", "tgt_text"


class Subword:
    """A trained SentencePiece model: ``encode(text) -> ids``, ``decode(ids) -> text``."""

    def __init__(self, model: bytes) -> None:
        self.model = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)

    def __len__(self) -> int:
        return int(self.sp.get_piece_size())

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(len(self))]

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first EOS (PAD/BOS dropped)."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(int(i))
        return str(self.sp.decode(out))


def train_subword(sentences: Sequence[str], vocab_size: int, model_type: str = "unigram",
                  ) -> Subword:
    """A joint SentencePiece model of ``vocab_size`` pieces trained on ``sentences``."""
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, pad_id=PAD, bos_id=BOS,
            eos_id=EOS, unk_id=UNK, pad_piece=SPECIALS[PAD], bos_piece=SPECIALS[BOS],
            eos_piece=SPECIALS[EOS], unk_piece=SPECIALS[UNK], normalization_rule_name="identity",
            remove_extra_whitespaces=False, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as exc:
        raise UsageError(f"--vocab: sentencepiece could not train {vocab_size} pieces: "
                         f"{str(exc).splitlines()[-1]} (lower --vocab)") from None
    return Subword(buf.getvalue())


def prepare(prefix_dir: str | Path, out: str | Path, src: str = "en", tgt: str = "fr",
            vocab_size: int = 8000, model_type: str = "unigram") -> Path:
    """Read ``{train,valid,test}`` of ``prefix_dir`` (:func:`hpcml.nmt.text.read_pairs`),
    train the joint model on train, encode every split and write the HDF5 corpus ``out``."""
    splits = {s: read_pairs(Path(prefix_dir) / s, src, tgt) for s in SPLITS}
    sub = train_subword([x for pair in splits["train"] for x in pair], vocab_size, model_type)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("vocab", data=np.array(sub.pieces(), dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset(MODEL_KEY, data=np.frombuffer(sub.model, dtype=np.uint8))
        for split, pairs in splits.items():
            group = f.create_group(split)
            for side, key in ((0, "src"), (1, "tgt")):
                ids, offsets = _flat([sub.encode(p[side]) for p in pairs])
                group.create_dataset(f"{key}_ids", data=ids)
                group.create_dataset(f"{key}_offsets", data=offsets)
            group.create_dataset(TEXT_KEY, data=np.array([p[1] for p in pairs], dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
        f.attrs.update({"source": src, "target": tgt, "subword": model_type,
                        "sentencepiece": spm.__version__, "text": str(prefix_dir)})
    tmp.replace(out)
    return out


def validate_extras(path: str | Path, sentences: dict[str, int], vocab: int, rank: int,
                    size: int) -> None:
    """Check what a corpus of :func:`prepare` adds to :mod:`hpcml.nmt.corpus`'s layout, when
    present (the end-of-run BLEU reads it): ``subword_model`` a 1-D uint8 SentencePiece
    model that loads and has ``vocab`` pieces; ``<split>/tgt_text`` 1-D strings, one per
    sentence (``sentences[split]``), rank ``rank`` of ``size`` decoding its block as UTF-8.
    Raises a one-line ``UsageError`` naming the file and dataset (not collective)."""
    from hpcml.comm import chunk_bounds

    def bad(name: str, expected: str, got: str) -> UsageError:
        return UsageError(f"data.path: {path}: dataset {name!r}: expected {expected}, got {got} "
                          "(regenerate it with python -m hpcml.nmt.subword)")

    with h5py.File(path, "r") as f:
        model = f.get(MODEL_KEY)
        if model is not None:
            what = f"a 1-D uint8 SentencePiece model of {vocab} pieces"
            if not isinstance(model, h5py.Dataset) or model.ndim != 1 or model.dtype != np.uint8:
                raise bad(MODEL_KEY, what, "a group" if not isinstance(model, h5py.Dataset)
                          else f"shape {model.shape} of dtype {model.dtype}")
            try:
                pieces = len(Subword(model[:].tobytes()))
            except (RuntimeError, OSError, ValueError):
                raise bad(MODEL_KEY, what, f"{model.shape[0]} bytes that SentencePiece cannot "
                          "parse as a model") from None
            if pieces != vocab:
                raise bad(MODEL_KEY, what, f"{pieces} pieces")
        for split, n in sentences.items():
            text = f.get(f"{split}/{TEXT_KEY}")
            if text is None:
                continue
            name = f"{split}/{TEXT_KEY}"
            if not isinstance(text, h5py.Dataset) or text.shape != (n,) \
                    or h5py.check_string_dtype(text.dtype) is None:
                raise bad(name, f"{n} UTF-8 strings (one per sentence)",
                          "a group" if not isinstance(text, h5py.Dataset)
                          else f"shape {text.shape} of dtype {text.dtype}")
            lo, hi = chunk_bounds(n, size, rank)
            for i, line in enumerate(text[lo:hi], lo):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad(name, "UTF-8 strings", f"sentence {i} = {line[:40]!r}") from None


def detokenizer(path: str | Path) -> Callable[[Sequence[int]], str]:
    """ids -> text for the corpus ``path``: its subword model when it has one, else the
    word-level detokenizer of the numbers corpus over its vocabulary."""
    with h5py.File(path, "r") as f:
        if MODEL_KEY in f:
            return Subword(f[MODEL_KEY][:].tobytes()).decode
        vocab = [t.decode() for t in f["vocab"][:]]
    return lambda ids: detokenize(decode(ids, vocab))


def references(path: str | Path, split: str, lo: int, hi: int) -> list[str] | None:
    """Original target sentences ``lo:hi`` of ``split``, or None when the corpus has none."""
    with h5py.File(path, "r") as f:
        if TEXT_KEY not in f[split]:
            return None
        return [t.decode() for t in f[split][TEXT_KEY][lo:hi]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a joint subword model on a parallel "
                                                 "text corpus and write its HDF5 corpus.")
    parser.add_argument("text", help="directory with {train,valid,test}.{SRC,TGT} or .tsv")
    parser.add_argument("out", help="output .h5 file")
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="fr")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
    args = parser.parse_args(argv)
    print(f"wrote {prepare(args.text, args.out, args.src, args.tgt, args.vocab, args.model_type)}")


if __name__ == "__main__":
    main()
