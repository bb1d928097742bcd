"""Length-bucketed training batches by token count (the batching of tensor2tensor and fairseq).

Each epoch, rank r orders its shard by (target length, source length) with ties broken by a
permutation drawn from ``(seed, epoch, rank)``, cuts it into consecutive batches whose *padded*
size ``sentences x (longest source or target + 1)`` stays within ``batch_tokens`` (a sentence
longer than that gets a batch of its own), and visits the batches in an order drawn from the
same seed. Sentences of similar length share a batch, so little of it is padding. Every rank
runs ``steps_per_epoch`` = the smallest number of batches of any rank (agreed once by an
allreduce at construction), so the ranks step together; a rank's surplus batches of an epoch
are skipped (they come back, in another order, next epoch). Like
:class:`~hpcml.nmt.data.TrainStream` the batch of a step depends on the step number only, so a
resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.nmt.data import Batch, Shard, collate


def bucket_batches(src_len: np.ndarray, tgt_len: np.ndarray, batch_tokens: int,
                   tie_break: np.ndarray) -> list[np.ndarray]:
    """Index arrays of consecutive length-sorted batches of padded size <= ``batch_tokens``
    (see module docstring). Pure."""
    order = np.lexsort((tie_break, src_len, tgt_len))
    batches, current, longest = [], [], 0
    for i in order:
        width = max(longest, int(src_len[i]) + 1, int(tgt_len[i]) + 1)
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(np.array(current))
            current, width = [], max(int(src_len[i]), int(tgt_len[i])) + 1
        current.append(int(i))
        longest = width
    if current:
        batches.append(np.array(current))
    return batches


class BucketStream:
    """Step-indexed token batches of one rank's shard. Collective to construct."""

    def __init__(self, comm: Communicator, shard: Shard, batch_tokens: int, seed: int) -> None:
        self.shard, self.batch_tokens, self.seed, self.rank = shard, batch_tokens, seed, comm.rank
        self._src = np.array([len(s) for s in shard.src])
        self._tgt = np.array([len(t) for t in shard.tgt])
        self._epoch: tuple[int, list[np.ndarray]] | None = None
        self.steps_per_epoch = int(comm.allreduce(len(self.batches(0)), op="min"))
        if self.steps_per_epoch < 1:
            raise UsageError("train.batch_tokens: a rank has no training sentences (use fewer "
                             "ranks or more data)")

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch``, in visiting order."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            found = bucket_batches(self._src, self._tgt, self.batch_tokens,
                                   rng.permutation(len(self._src)))
            self._epoch = (epoch, [found[i] for i in rng.permutation(len(found))])
        return self._epoch[1]

    def batch(self, step: int) -> Batch:
        epoch, k = divmod(step, self.steps_per_epoch)
        idx = self.batches(epoch)[k]
        return collate([self.shard.src[i] for i in idx], [self.shard.tgt[i] for i in idx])
