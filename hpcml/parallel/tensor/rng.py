"""Dropout random numbers under tensor parallelism (what Megatron-LM's RNG tracker is for,
arXiv 1909.08053 §3).

Two kinds of activation, two rules:

- *Replicated* activations (the residual stream, embeddings: every tensor rank holds all of
  them) must get the same mask on every rank, or the replicas drift apart. They use torch's
  default generator, seeded alike on every rank (``torch.manual_seed(seed)`` before building the
  model); every rank draws the same numbers from it in the same order.
- *Sharded* activations (this rank's heads' attention probabilities, its slice of a
  column-parallel hidden layer) must get masks that are independent across ranks, as the
  single-process model's mask is independent per element. They use :func:`sharded_generator`.

:func:`sharded_generator` draws one number from the default generator -- the same number on every
tensor rank, so the default streams stay in step however much the sharded regions draw (uneven
splits included) -- and seeds a fresh generator from that number and the tensor rank. Megatron
instead keeps a separate generator that advances, and its activation checkpointing must save and
restore that generator too; here the sharded stream is a function of the default generator's
state, which ``torch.utils.checkpoint`` restores before recomputing (``preserve_rng_state=True``,
its default) and :func:`hpcml.checkpoint.rng_state` saves for a resumed run, so recomputed masks
equal the original ones (tested) and nothing else needs saving. torch's CPU generator keeps 32
bits of a seed: two sharded dropout calls share a mask stream with probability 2^-32 per pair.

With one tensor rank the functions are exactly ``F.dropout`` on the default generator, so a
model parallelized over one rank computes what the original computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcml.comm import Communicator

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix(value: int, rank: int) -> int:
    """splitmix64 of ``value + rank * golden``: nearby inputs, unrelated seeds. Pure."""
    z = (value + (rank + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sharded_generator(comm: Communicator) -> torch.Generator:
    """A generator for this rank's masks on a sharded activation. Draws one number from the
    default generator (every rank of ``comm`` must call it at the same point); no
    communication."""
    draw = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
    generator = torch.Generator()
    generator.manual_seed(_mix(draw, comm.rank))
    return generator


def sharded_dropout(x: torch.Tensor, p: float, training: bool,
                    comm: Communicator) -> torch.Tensor:
    """``F.dropout(x, p, training)`` for an activation sharded over ``comm``: the mask comes from
    :func:`sharded_generator`, independent across ranks."""
    if not training or p == 0.0 or comm.size == 1:
        return F.dropout(x, p, training)
    if p == 1.0:
        return x * 0.0
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=sharded_generator(comm))
    return x * keep / (1.0 - p)
