"""AVGrad (Ozkara et al., arXiv 2401.08893): AMSGrad with the running maximum of the
second moment replaced by its running (uniform, time) average,

    m_t = β1 m + (1 - β1) g,   v_t = β2 v + (1 - β2) g²,   v̄_t = (1/t) Σ_{s<=t} v_s,
    x  ← x - η (m_t / (1 - β1^t)) / (√(v̄_t / (1 - β2^t)) + ε).

The average is differentiable in the coefficients, which is why MADA interpolates towards it
rather than towards AMSGrad's maximum. The uniform average and its bias correction by 1 - β2^t
follow the authors' code (``gdtuo.py``, ``v_mean``).
It is MADA at the point (β3, c, ρ, γ) = (0, 1, 0, 1) with ``vmax="avg"`` and nothing
learned, so both share one implementation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpcml.optim.mada import MADA, resolve_betas


class AVGrad(MADA):
    """AVGrad over ``params`` with ``torch.optim.Adam``'s argument names (``betas``; MADA's
    ``beta1``/``beta2`` are accepted too, not both); ``weight_decay`` is decoupled (AdamW-style).
    Invalid arguments raise ``ValueError``."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, beta1: float | None = None,
                 beta2: float | None = None) -> None:
        beta1, beta2 = resolve_betas("AVGrad", beta1, beta2, betas)
        super().__init__(params, lr=lr, beta1=beta1, beta2=beta2, beta3=0.0, c=1.0,
                         rho=0.0, gamma=1.0, eps=eps, weight_decay=weight_decay, hyper_lr=0.0,
                         vmax="avg")
