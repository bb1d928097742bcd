"""MADA under data parallelism: keeping the learned coefficients identical on every rank.

Inside :class:`hpcml.parallel.DistributedOptimizer` (per-step gradient averaging) nothing is needed:
every rank holds the same averaged gradients and the same optimizer state, so the hyper-gradient
<g_{t+1}, ∂x_{t+1}/∂z> and the coefficients come out bitwise equal (tested at 2 and 4 ranks).
Where ranks step on their own gradients (Qsparse-local-SGD's local steps), pass
``hypergrad_reduce=average_hypergradient(comm)`` to :class:`~hpcml.optim.MADA`: the hyper-gradient
is then averaged over the ranks before each hyper-step, like any gradient, and the coefficients
stay equal while the local models differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hpcml.comm import Communicator


def average_hypergradient(comm: Communicator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``hypergrad_reduce`` for MADA: the mean over ``comm``'s ranks of the hyper-gradient
    vector (one ``Allreduce`` of at most six float64 numbers per param group and step).
    Collective: every rank must step its MADA the same number of times."""

    def reduce(vec: torch.Tensor) -> torch.Tensor:
        out = vec.clone()
        comm.Allreduce(out)
        return out / comm.size

    return reduce
