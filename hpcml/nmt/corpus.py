"""A deterministic parallel corpus: cardinal numbers written out in English and in French by
``num2words``, stored as HDF5.

``generate(path, pairs, max_number, seed)`` draws ``pairs`` distinct integers in
``[0, max_number]`` with ``numpy.random.default_rng(seed)``, renders each in both languages,
splits them into train/valid/test (``valid_fraction``/``test_fraction`` of the pairs, so no
number occurs in two splits), builds the joint vocabulary from the *training* split only and
writes::

    /vocab                     UTF-8 strings, id -> token (ids 0-3: <pad> <bos> <eos> <unk>)
    /<split>/src_ids, tgt_ids  int32, all sentences' token ids concatenated (no BOS/EOS)
    /<split>/src_offsets, ...  int64, n + 1 offsets: sentence i is ids[off[i]:off[i+1]]
    /<split>/numbers           int64, the integer each pair renders
    attrs: source, target, seed, pairs, max_number, num2words version

The same arguments give the same file bytes-for-content on every machine with the same
``num2words`` version (recorded in the attrs). Run ``python -m hpcml.nmt.corpus OUT.h5`` to
(re)create the shipped ``data/nmt/numbers-en-fr.h5``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
from num2words import num2words

from hpcml.errors import UsageError
from hpcml.nmt.vocab import build_vocab, encode, tokenize

SPLITS = ("train", "valid", "test")
SOURCE, TARGET = "en", "fr"


def render(number: int) -> tuple[list[str], list[str]]:
    """(English tokens, French tokens) of ``number``."""
    return tokenize(num2words(number, lang=SOURCE)), tokenize(num2words(number, lang=TARGET))


def split_sizes(pairs: int, valid_fraction: float, test_fraction: float) -> dict[str, int]:
    """Sentences per split; valid and test get at least one pair each."""
    n_valid = max(1, round(pairs * valid_fraction))
    n_test = max(1, round(pairs * test_fraction))
    if n_valid + n_test >= pairs:
        raise UsageError(f"pairs: {pairs} pairs leave no training data (use more pairs)")
    return {"train": pairs - n_valid - n_test, "valid": n_valid, "test": n_test}


def _flat(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    ids = np.fromiter((i for s in seqs for i in s), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


def generate(path: str | Path, pairs: int = 4000, max_number: int = 9999, seed: int = 1234,
             valid_fraction: float = 0.05, test_fraction: float = 0.05) -> Path:
    """Write the corpus to ``path`` (see module docstring); returns the path."""
    if pairs > max_number + 1:
        raise UsageError(f"pairs: {pairs} distinct numbers do not fit in [0, {max_number}] "
                         "(raise max_number or lower pairs)")
    numbers = np.random.default_rng(seed).choice(max_number + 1, size=pairs, replace=False)
    sizes = split_sizes(pairs, valid_fraction, test_fraction)
    rendered = [render(int(n)) for n in numbers]
    bounds = np.cumsum([0, *(sizes[s] for s in SPLITS)])
    parts = {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(SPLITS)}
    train = rendered[parts["train"]]
    vocab = build_vocab([side for pair in train for side in pair])
    index = {tok: i for i, tok in enumerate(vocab)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("vocab", data=np.array(vocab, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        for split, part in parts.items():
            group = f.create_group(split)
            for side, key in ((0, "src"), (1, "tgt")):
                ids, offsets = _flat([encode(pair[side], index) for pair in rendered[part]])
                group.create_dataset(f"{key}_ids", data=ids)
                group.create_dataset(f"{key}_offsets", data=offsets)
            group.create_dataset("numbers", data=numbers[part].astype(np.int64))
        f.attrs.update({"source": SOURCE, "target": TARGET, "seed": seed, "pairs": pairs,
                        "max_number": max_number, "num2words": version("num2words")})
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the English-French numbers corpus.")
    parser.add_argument("out", help="output .h5 file")
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--max-number", type=int, default=9999)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    path = generate(args.out, args.pairs, args.max_number, args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
