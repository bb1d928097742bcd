"""Rank-sharded HDF5 loader for the corpus written by :mod:`hpcml.nmt.corpus`.

Rank r of P opens the file and reads only its block ``chunk_bounds(n, P, r)`` of a split's
sentences (the offsets slice, then the ids between its first and last offset), never the whole
split. Training batches: every step each rank takes ``batch_size / P`` sentences from its shard,
in an order that is a permutation drawn from ``(seed, epoch, rank)`` only, so the position in the
data is fully described by the step number and a resumed run reads exactly the batches an
uninterrupted run would. Every rank runs the same number of steps per epoch,
``(n // P) // (batch_size / P)`` (a rank's shard has at least ``n // P`` sentences).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcml.comm import chunk_bounds
from hpcml.errors import UsageError
from hpcml.nmt.subword import validate_extras
from hpcml.nmt.vocab import BOS, EOS, PAD, SPECIALS

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class Shard:
    """One rank's sentences of one split: ``src[i]``/``tgt[i]`` are int id arrays."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    total: int  # sentences in the whole split

    def __len__(self) -> int:
        return len(self.src)


@dataclasses.dataclass
class Batch:
    """Padded tensors for ``n`` sentences: ``src`` (n, S) ending in EOS, ``tgt_in`` (n, T) =
    BOS + target, ``tgt_out`` (n, T) = target + EOS; PAD fills the rest."""

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor

    @property
    def tokens(self) -> int:
        """Target tokens that count in the loss (non-PAD entries of ``tgt_out``)."""
        return int((self.tgt_out != PAD).sum())


REGENERATE = "regenerate it with python -m hpcml.nmt.corpus"


def _bad(path: str | Path, dataset: str, expected: str, got: str) -> UsageError:
    return UsageError(f"data.path: {path}: dataset {dataset!r}: expected {expected}, got {got} "
                      f"({REGENERATE})")


def _dataset(f: h5py.File, path: str | Path, name: str, what: str) -> h5py.Dataset:
    """``f[name]`` as a 1-D dataset, or the UsageError naming it."""
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise _bad(path, name, what, "nothing" if obj is None else "a group")
    if obj.ndim != 1:
        raise _bad(path, name, what, f"shape {obj.shape}")
    return obj


def read_vocab(path: str | Path) -> list[str]:
    """The corpus vocabulary (id -> token); a one-line UsageError when the file is not a
    corpus (not collective)."""
    try:
        with h5py.File(path, "r") as f:
            vocab = _dataset(f, path, "vocab", "1-D UTF-8 strings (id -> token)")
            if h5py.check_string_dtype(vocab.dtype) is None:
                raise _bad(path, "vocab", "1-D UTF-8 strings (id -> token)", str(vocab.dtype))
            tokens = vocab[:]
    except OSError as exc:
        raise UsageError(f"data.path: {path}: not a readable HDF5 file ({exc}; "
                         f"{REGENERATE})") from None
    words = []
    for index, token in enumerate(tokens):
        try:
            words.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            raise _bad(path, "vocab", "1-D UTF-8 strings (id -> token)",
                       f"token {index} = {token!r}, which is not UTF-8") from None
    return words


def validate_corpus(path: str | Path, rank: int, size: int) -> dict[str, int]:
    """Check a corpus file as :mod:`hpcml.nmt.corpus` writes it: the vocabulary starts with the
    special tokens and has no duplicates, and every split has 1-D integer ``src``/``tgt`` ids
    and ``n + 1`` offsets from 0 to ``len(ids)``, non-decreasing, with ids inside the
    vocabulary; the subword model and reference texts of a subword corpus
    (:func:`~hpcml.nmt.subword.validate_extras`). Rank ``rank`` of ``size`` reads only its
    block of each array, so the ranks
    together check every entry once (not collective: the caller combines the outcomes).
    Returns the sentences of each split; raises a one-line ``UsageError`` naming the file and
    dataset."""
    vocab = read_vocab(path)
    if tuple(vocab[:len(SPECIALS)]) != SPECIALS or len(set(vocab)) != len(vocab):
        raise _bad(path, "vocab", f"{', '.join(SPECIALS)} first and no duplicate token",
                   f"{vocab[:len(SPECIALS)]} and {len(vocab) - len(set(vocab))} duplicates")
    sizes: dict[str, int] = {}
    try:
        with h5py.File(path, "r") as f:
            for split in SPLITS:
                sizes[split] = _check_split(f, path, split, len(vocab), rank, size)
        validate_extras(path, sizes, len(vocab), rank, size)
    except OSError as exc:
        raise UsageError(f"data.path: {path}: not a readable HDF5 file ({exc}; "
                         f"{REGENERATE})") from None
    return sizes


def _check_split(f: h5py.File, path: str | Path, split: str, vocab: int, rank: int,
                 size: int) -> int:
    counts = []
    for side in ("src", "tgt"):
        ids_name, off_name = f"{split}/{side}_ids", f"{split}/{side}_offsets"
        ids = _dataset(f, path, ids_name, "1-D integer token ids")
        offsets = _dataset(f, path, off_name, "1-D integer sentence offsets")
        for name, ds in ((ids_name, ids), (off_name, offsets)):
            if ds.dtype.kind not in "iu":
                raise _bad(path, name, "integers", str(ds.dtype))
        n_ids = ids.shape[0]
        if offsets.shape[0] < 2:
            raise _bad(path, off_name, "n + 1 >= 2 offsets (at least one sentence)",
                       f"{offsets.shape[0]}")
        ends = offsets[[0, -1]]
        if ends[0] != 0 or ends[1] != n_ids:
            raise _bad(path, off_name, f"offsets from 0 to len({ids_name}) = {n_ids}",
                       f"{int(ends[0])} to {int(ends[1])}")
        lo, hi = chunk_bounds(offsets.shape[0] - 1, size, rank)
        block = offsets[lo:hi + 1]
        if np.any(np.diff(block) < 0):
            raise _bad(path, off_name, "non-decreasing offsets", "a decrease")
        lo, hi = chunk_bounds(n_ids, size, rank)
        block = ids[lo:hi]
        if block.size and (block.min() < 0 or block.max() >= vocab):
            raise _bad(path, ids_name, f"ids in [0, {vocab}) (the vocabulary size)",
                       f"ids in [{int(block.min())}, {int(block.max())}]")
        counts.append(offsets.shape[0] - 1)
    if counts[0] != counts[1]:
        raise _bad(path, f"{split}/tgt_offsets", f"{counts[0]} sentences like "
                   f"{split}/src_offsets", f"{counts[1]}")
    return counts[0]


def split_size(path: str | Path, split: str) -> int:
    with h5py.File(path, "r") as f:
        return int(f[f"{split}/src_offsets"].shape[0] - 1)


def _read_side(group: h5py.Group, key: str, lo: int, hi: int) -> list[np.ndarray]:
    offsets = group[f"{key}_offsets"][lo:hi + 1]
    ids = group[f"{key}_ids"][int(offsets[0]):int(offsets[-1])]
    rel = offsets - offsets[0]
    return [ids[rel[i]:rel[i + 1]].astype(np.int64) for i in range(hi - lo)]


def read_shard(path: str | Path, split: str, rank: int, size: int) -> Shard:
    """Sentences ``chunk_bounds(n, size, rank)`` of ``split`` (not collective)."""
    try:
        with h5py.File(path, "r") as f:
            group = f[split]
            total = int(group["src_offsets"].shape[0] - 1)
            lo, hi = chunk_bounds(total, size, rank)
            return Shard(_read_side(group, "src", lo, hi), _read_side(group, "tgt", lo, hi),
                         total)
    except (OSError, KeyError) as exc:
        raise UsageError(f"data.path: cannot read split {split!r} of {path}: {exc} (regenerate "
                         "it with python -m hpcml.nmt.corpus)") from None


def collate(src: list[np.ndarray], tgt: list[np.ndarray]) -> Batch:
    """Pad a list of sentence pairs into a :class:`Batch`."""
    n = len(src)
    s_len = max(len(s) for s in src) + 1
    t_len = max(len(t) for t in tgt) + 1
    s = torch.full((n, s_len), PAD, dtype=torch.long)
    ti = torch.full((n, t_len), PAD, dtype=torch.long)
    to = torch.full((n, t_len), PAD, dtype=torch.long)
    for i, (a, b) in enumerate(zip(src, tgt, strict=True)):
        s[i, :len(a)] = torch.from_numpy(a)
        s[i, len(a)] = EOS
        ti[i, 0] = BOS
        ti[i, 1:len(b) + 1] = torch.from_numpy(b)
        to[i, :len(b)] = torch.from_numpy(b)
        to[i, len(b)] = EOS
    return Batch(s, ti, to)


def steps_per_epoch(total: int, local_batch: int, size: int,
                    key: str = "train.batch_size") -> int:
    """Steps of ``local_batch`` sentences per rank in one epoch of ``total`` training pairs
    over ``size`` ranks; a ``UsageError`` naming ``key`` when not even one fits (pure)."""
    steps = (total // size) // local_batch
    if steps < 1:
        raise UsageError(f"{key}: {local_batch * size} sentences per step exceed the training "
                         f"split ({total} sentences); lower it")
    return steps


class TrainStream:
    """Step-indexed training batches of one rank's shard (see module docstring)."""

    def __init__(self, shard: Shard, local_batch: int, size: int, seed: int, rank: int) -> None:
        self.shard, self.local_batch, self.seed, self.rank = shard, local_batch, seed, rank
        self.steps_per_epoch = steps_per_epoch(shard.total, local_batch, size)
        self._perm: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sentence order in ``epoch``."""
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            self._perm = (epoch, rng.permutation(len(self.shard)))
        return self._perm[1]

    def indices(self, step: int) -> np.ndarray:
        """Shard indices of this rank's part of global step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[k * self.local_batch:(k + 1) * self.local_batch]

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)
        return collate([self.shard.src[i] for i in idx], [self.shard.tgt[i] for i in idx])


def eval_batches(shard: Shard, batch: int) -> list[Batch]:
    """The shard in file order, ``batch`` sentences at a time (for validation/decoding)."""
    return [collate(shard.src[i:i + batch], shard.tgt[i:i + batch])
            for i in range(0, len(shard), batch)]
