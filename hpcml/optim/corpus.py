"""A real text corpus every machine already has: the Python standard library's own source.

``python -m hpcml.optim.corpus data/lm/pystdlib.h5`` reads every top-level ``*.py`` module of the
running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, sorted by name),
puts every 10th file (indices 0, 10, 20, ... in that order) into the validation split and the
rest into the training split, and writes byte-level tokens (vocabulary 256; each file's bytes
followed by one NUL byte, which no source file contains, as end-of-document) to HDF5:

- ``train/tokens``, ``valid/tokens``: uint8, 1-D, gzip-compressed chunks; a data-parallel rank
  reads only its own contiguous shard of ``train/tokens`` (:func:`read_split`);
- ``train/files``, ``valid/files``: the file names in order, with ``offsets`` (start of each file);
- attributes: ``python_version``, ``stdlib``, ``licence``, ``command`` and ``manifest`` (JSON:
  name -> sha256 of the file's bytes), the provenance that README files quote.

The same interpreter gives the same tokens (no timestamps are stored); another Python version
has other sources, which the attributes record. The source is under the PSF licence (see
``data/lm/README.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcml.errors import UsageError

EOD = 0
VOCAB = 256
VALID_EVERY = 10
LICENCE = "PSF-2.0 (Python Software Foundation License Version 2), Python standard library"


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The top-level ``*.py`` modules of the standard library at ``root`` (default: this
    interpreter's), sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    return sorted(root.glob("*.py"), key=lambda p: p.name)


def tokens_of(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 tokens of the files joined with an EOD byte after each, int64 start offsets)."""
    chunks, offsets, pos = [], [], 0
    for p in paths:
        data = p.read_bytes()
        if EOD in data:
            raise ValueError(f"{p} contains a NUL byte, which is the end-of-document token")
        offsets.append(pos)
        chunks.append(data + bytes([EOD]))
        pos += len(data) + 1
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), np.array(offsets, dtype=np.int64)


def build(out: Path, root: Path | None = None) -> dict[str, int]:
    """Write the corpus to ``out`` (HDF5, see the module docstring); returns token counts."""
    import h5py

    files = stdlib_files(root)
    if not files:
        raise UsageError(f"no *.py files in the standard library at {root}")
    splits = {"valid": [p for i, p in enumerate(files) if i % VALID_EVERY == 0],
              "train": [p for i, p in enumerate(files) if i % VALID_EVERY != 0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    counts = {}
    with h5py.File(tmp, "w", track_order=True) as f:
        for split, paths in splits.items():
            tokens, offsets = tokens_of(paths)
            g = f.create_group(split, track_order=True)
            g.create_dataset("tokens", data=tokens, chunks=(1 << 16,), compression="gzip",
                             compression_opts=9, shuffle=False, track_times=False)
            g.create_dataset("offsets", data=offsets, track_times=False)
            g.create_dataset("files", data=[p.name for p in paths],
                             dtype=h5py.string_dtype(), track_times=False)
            counts[split] = len(tokens)
        f.attrs["python_version"] = sys.version
        f.attrs["stdlib"] = str(files[0].parent)
        f.attrs["licence"] = LICENCE
        f.attrs["vocab"] = VOCAB
        f.attrs["command"] = f"python -m hpcml.optim.corpus {out}"
        f.attrs["manifest"] = json.dumps({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                          for p in files}, sort_keys=True)
    tmp.replace(out)
    return counts


@dataclass
class Split:
    """One rank's contiguous share of a split's tokens (``start`` within the whole split)."""

    tokens: np.ndarray
    start: int
    total: int


def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank``'s contiguous share of ``total`` tokens (pure)."""
    return rank * total // size, (rank + 1) * total // size


def read_split(path: str | Path, split: str, rank: int = 0, size: int = 1) -> Split:
    """Rank ``rank``'s shard of ``split`` ('train' or 'valid'): tokens [r L / P, (r+1) L / P)
    of the split's L tokens, read from disk without loading the rest. Not collective."""
    import h5py

    with h5py.File(path, "r") as f:
        if split not in f or "tokens" not in f[split]:
            raise UsageError(f"{path}: no {split}/tokens (rebuild it with "
                             f"python -m hpcml.optim.corpus {path})")
        ds = f[split]["tokens"]
        total = ds.shape[0]
        lo, hi = shard_bounds(total, rank, size)
        return Split(np.asarray(ds[lo:hi], dtype=np.uint8), lo, total)


def validate_corpus(path: str | Path, rank: int, size: int, window: int,
                    field: str = "data") -> None:
    """Check a corpus as :func:`build` writes it, for rank ``rank`` of ``size`` drawing windows
    of ``window`` tokens: ``train/tokens`` and ``valid/tokens`` 1-D integer datasets of byte
    tokens in [0, 255]; this rank's shard of the training split (:func:`read_split`) and the
    whole validation split hold at least one window. The rank checks the values of its own
    shard (the ranks together check every training token once) and of the validation split,
    which every rank reads. Raises a one-line ``UsageError`` naming ``field``, the file and
    the dataset (not collective)."""
    import h5py

    fix = f"rebuild it with python -m hpcml.optim.corpus {path}"
    name = "the file"
    try:
        with h5py.File(path, "r") as f:
            for split in ("train", "valid"):
                name = f"{split}/tokens"
                ds = f.get(name)
                expected = f"1-D integer byte tokens in [0, {VOCAB - 1}]"
                if not isinstance(ds, h5py.Dataset):
                    got = "nothing" if ds is None else "a group"
                elif ds.ndim != 1 or ds.dtype.kind not in "iu":
                    got = f"shape {ds.shape} of dtype {ds.dtype}"
                else:
                    total = ds.shape[0]
                    lo, hi = shard_bounds(total, rank, size) if split == "train" else (0, total)
                    if hi - lo < window:
                        whose = (f"each of the {size} ranks' shards" if split == "train"
                                 and size > 1 else f"a {split} window")
                        expected = f"at least {window} tokens (model.context + 1) for {whose}"
                        got = f"{hi - lo} tokens" + (f" on rank {rank}" if size > 1 else "")
                    else:
                        tokens = np.asarray(ds[lo:hi])
                        if tokens.min() >= 0 and tokens.max() < VOCAB:
                            continue
                        got = f"tokens in [{tokens.min()}, {tokens.max()}]"
                raise UsageError(f"{field}: {path}: dataset {name!r}: expected {expected}, "
                                 f"got {got} ({fix})")
    except OSError as exc:
        raise UsageError(f"{field}: {path}: cannot read {name} as HDF5 ({exc}; {fix})") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="HDF5 file to write, e.g. data/lm/pystdlib.h5")
    args = parser.parse_args(argv)
    counts = build(args.out)
    print(f"wrote {args.out}: {counts['train']} training and {counts['valid']} validation "
          f"byte tokens from the Python {sys.version.split()[0]} standard library")


if __name__ == "__main__":
    main()
