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
from hpcml.nmt.vocab import BOS, EOS, PAD


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


def read_vocab(path: str | Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [t.decode() for t in f["vocab"][:]]


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


class TrainStream:
    """Step-indexed training batches of one rank's shard (see module docstring)."""

    def __init__(self, shard: Shard, local_batch: int, size: int, seed: int, rank: int) -> None:
        self.shard, self.local_batch, self.seed, self.rank = shard, local_batch, seed, rank
        self.steps_per_epoch = (shard.total // size) // local_batch
        if self.steps_per_epoch < 1:
            raise UsageError(f"train.batch_size: {local_batch * size} sentences per step exceed "
                             f"the training split ({shard.total} sentences); lower batch_size")
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
