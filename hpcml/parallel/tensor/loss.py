"""Cross entropy over vocabulary-sharded logits, without ever forming the full logits on a rank
(Megatron-LM's vocab-parallel cross entropy, arXiv 1909.08053 §3).

For rows ``z`` of logits split over the group by vocabulary, three allreduces of one number per
row suffice: the row maximum ``m`` (no gradient: the loss does not depend on it), the sum of
``exp(z - m)`` and the target's logit (each rank contributes it only if it owns the target). With
label smoothing ``eps`` one more sum gives the mean logit, and the loss is
``(1 - eps) (lse - z_t) + eps (lse - mean z)``, exactly what ``F.cross_entropy`` computes.
"""

from __future__ import annotations

import torch

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel.tensor.mappings import max_over, reduce_from


def vocab_range(local_vocab: int, comm: Communicator) -> tuple[int, int]:
    """(start, total) of this rank's vocabulary slice when rank r holds ``local_vocab`` ids
    after those of ranks < r. Collective (one small allgather) unless ``comm.size == 1``."""
    sizes = comm.allgather(local_vocab) if comm.size > 1 else [local_vocab]
    return sum(sizes[: comm.rank]), sum(sizes)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 comm: Communicator, *, vocab_start: int | None = None,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0,
                                 reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(full_logits.reshape(-1, V), target.reshape(-1), ...)`` where this rank
    holds ``logits[..., v]`` for ``v`` in ``[vocab_start, vocab_start + logits.shape[-1])``.

    Collective over ``comm`` (forward and backward); the result is replicated. ``vocab_start``
    and ``vocab_size`` are found with :func:`vocab_range` when not given (one small pickled
    allgather per call: pass them, e.g. ``embed.vocab_start`` and ``embed.num_embeddings`` of a
    :class:`~hpcml.parallel.tensor.VocabParallelEmbedding`, in a training loop).
    ``reduction``: ``"mean"`` (over non-ignored targets), ``"sum"`` or ``"none"`` (shape of
    ``target``). Computed in float32 for bfloat16/float16 logits, as ``F.cross_entropy`` is
    under ``torch.autocast`` (mixed precision)."""
    if reduction not in ("mean", "sum", "none"):
        raise UsageError(f"reduction: {reduction!r} is not one of 'mean', 'sum', 'none'")
    local = logits.shape[-1]
    if vocab_start is None or vocab_size is None:
        vocab_start, vocab_size = vocab_range(local, comm)
    z = logits.reshape(-1, local)
    if z.dtype in (torch.bfloat16, torch.float16):
        z = z.float()
    t = target.reshape(-1)
    z = z - max_over(z.detach().max(dim=-1).values, comm).unsqueeze(-1)
    lse = reduce_from(z.exp().sum(dim=-1), comm).log()
    mine = t - vocab_start
    owned = (mine >= 0) & (mine < local)
    picked = z.gather(1, mine.clamp(0, local - 1).unsqueeze(1)).squeeze(1)
    loss = lse - reduce_from(picked * owned, comm)
    if label_smoothing > 0:
        mean_z = reduce_from(z.sum(dim=-1), comm) / vocab_size
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - mean_z)
    valid = t != ignore_index
    loss = loss * valid
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()
