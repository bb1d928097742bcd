"""Evaluation: validation loss and corpus BLEU (sacrebleu, detokenized text, its signature
reported) of greedy or beam-search translations (:mod:`hpcml.nmt.beam`) of a split, with the
split sharded over the ranks and the hypotheses gathered in rank order (= file order).
References are the corpus's original target sentences when it stores them (text corpora,
:mod:`hpcml.nmt.subword`), else the detokenized target ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from sacrebleu.metrics import BLEU
from torch import nn

from hpcml.comm import Communicator
from hpcml.nmt.beam import beam_search
from hpcml.nmt.data import Shard, eval_batches
from hpcml.nmt.model import smoothed_loss_sum


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
def translate(model: nn.Module, shard: Shard, batch: int,
              detok: Callable[[Sequence[int]], str], beam: int = 1, alpha: float = 0.0,
              extra_len: int = 10) -> tuple[list[str], list[str]]:
    """(hypotheses, detokenized target ids) of this rank's shard; greedy when ``beam`` is 1.
    Not collective."""
    model.eval()
    hyps, refs = [], []
    for b in eval_batches(shard, batch):
        max_len = 2 * b.src.shape[1] + extra_len
        out = (model.greedy(b.src, max_len=max_len) if beam == 1
               else beam_search(model, b.src, beam, max_len, alpha))
        hyps += [detok(row.tolist()) for row in out]
        refs += [detok(row.tolist()) for row in b.tgt_out]
    model.train()
    return hyps, refs


def corpus_bleu(comm: Communicator, model: nn.Module, shard: Shard, batch: int,
                detok: Callable[[Sequence[int]], str], references: list[str] | None = None,
                beam: int = 1, alpha: float = 0.0) -> tuple[float, str, list[str]]:
    """(corpus BLEU, sacreBLEU signature, hypotheses in split order) of the split, the same on
    every rank; ``references``: this rank's original target sentences (None: detokenized
    target ids). Collective."""
    hyps, refs = translate(model, shard, batch, detok, beam, alpha)
    refs = references if references is not None else refs
    all_hyps = [h for part in comm.allgather(hyps) for h in part]
    all_refs = [r for part in comm.allgather(refs) for r in part]
    bleu = BLEU()
    score = bleu.corpus_score(all_hyps, [all_refs])
    return float(score.score), str(bleu.get_signature()), all_hyps
