"""Evaluation: validation loss and greedy-decoded corpus BLEU (sacrebleu) on a split, with the
split sharded over the ranks and the hypotheses gathered in rank order (= file order)."""

from __future__ import annotations

import numpy as np
import sacrebleu
import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.nmt.data import Shard, eval_batches
from hpcml.nmt.model import smoothed_loss_sum
from hpcml.nmt.vocab import decode, detokenize


@torch.no_grad()
def validation_loss(comm: Communicator, model: nn.Module, shard: Shard, batch: int,
                    smoothing: float) -> float:
    """Label-smoothed loss per target token over the whole split. Collective."""
    model.eval()
    acc = np.zeros(2)
    for b in eval_batches(shard, batch):
        acc += [float(smoothed_loss_sum(model(b.src, b.tgt_in), b.tgt_out, smoothing)),
                b.tokens]
    model.train()
    comm.Allreduce(acc)
    return float(acc[0] / acc[1])


@torch.no_grad()
def translate(model: nn.Module, shard: Shard, batch: int, vocab: list[str],
              extra_len: int = 10) -> tuple[list[str], list[str]]:
    """(hypotheses, references) of this rank's shard, detokenized. Not collective."""
    model.eval()
    hyps, refs = [], []
    for b in eval_batches(shard, batch):
        out = model.greedy(b.src, max_len=2 * b.src.shape[1] + extra_len)
        hyps += [detokenize(decode(row.tolist(), vocab)) for row in out]
        refs += [detokenize(decode(row.tolist(), vocab)) for row in b.tgt_out]
    model.train()
    return hyps, refs


def corpus_bleu(comm: Communicator, model: nn.Module, shard: Shard, batch: int,
                vocab: list[str]) -> tuple[float, list[str]]:
    """Corpus BLEU of greedy translations of the split (same value on every rank) and the
    hypotheses in split order. Collective."""
    hyps, refs = translate(model, shard, batch, vocab)
    all_hyps = [h for part in comm.allgather(hyps) for h in part]
    all_refs = [r for part in comm.allgather(refs) for r in part]
    return float(sacrebleu.corpus_bleu(all_hyps, [all_refs]).score), all_hyps
