"""Every optimizer the benchmark and the trainers can build, by name: torch's Adam, AdamW and
AMSGrad, ``pytorch-optimizer``'s Lion, Adan and Yogi (maintained implementations, not copies),
and hpcml's MADA and AVGrad.

``lr=None`` takes the optimizer's own default (:data:`DEFAULT_LR`, the value its authors or its
library recommend). ``beta1``/``beta2`` override, where given, the first-moment coefficient and
the coefficient of the second moment: ``betas[1]`` for Adam-like optimizers, MADA's ``beta2``,
Adan's third beta (its squared-gradient average), and Lion's ``betas[1]`` (its momentum
average; Lion has no second moment). ``eps`` is passed where the optimizer has one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hpcml import extras
from hpcml.optim.avgrad import AVGrad
from hpcml.optim.mada import MADA

OPTIMIZERS = ("adam", "adamw", "amsgrad", "avgrad", "lion", "adan", "yogi", "mada")

DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "amsgrad": 1e-3, "avgrad": 1e-3, "lion": 1e-4,
              "adan": 1e-3, "yogi": 1e-2, "mada": 1e-3}


def _betas(default: tuple[float, ...], beta1: float | None, beta2: float | None,
           second: int) -> tuple[float, ...]:
    betas = list(default)
    if beta1 is not None:
        betas[0] = beta1
    if beta2 is not None:
        betas[second] = beta2
    return tuple(betas)


def build_optimizer(name: str, params: Iterable[Any], *, lr: float | None = None,
                    beta1: float | None = None, beta2: float | None = None,
                    eps: float | None = None, weight_decay: float = 0.0,
                    **extra: Any) -> torch.optim.Optimizer:
    """Optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``params``. ``extra`` goes to MADA
    only (``hyper_lr``, ``beta3``, ``c``, ``rho``, ``gamma``, ``vmax``, ...). Raises
    ``ValueError`` for an unknown name or invalid values; Lion, Adan and Yogi need the ``optim``
    extra (pytorch_optimizer), a one-line ``UsageError`` without it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if extra and name != "mada":
        raise ValueError(f"options {sorted(extra)} apply to mada only, not {name}")
    lr = DEFAULT_LR[name] if lr is None else lr
    opt_eps = {} if eps is None else {"eps": eps}
    if name in ("adam", "adamw", "amsgrad", "avgrad"):
        betas = _betas((0.9, 0.999), beta1, beta2, 1)
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "avgrad": AVGrad,
               "amsgrad": torch.optim.Adam}[name]
        kw = {"amsgrad": True} if name == "amsgrad" else {}
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, **opt_eps, **kw)
    if name == "mada":
        coeffs = {k: v for k, v in (("beta1", beta1), ("beta2", beta2)) if v is not None}
        return MADA(params, lr=lr, weight_decay=weight_decay, **coeffs, **opt_eps, **extra)
    extras.require("optim", what=f"optimizer {name!r}")
    import pytorch_optimizer as po

    if name == "lion":
        return po.Lion(params, lr=lr, betas=_betas((0.9, 0.99), beta1, beta2, 1),
                       weight_decay=weight_decay)
    if name == "adan":
        return po.Adan(params, lr=lr, betas=_betas((0.98, 0.92, 0.99), beta1, beta2, 2),
                       weight_decay=weight_decay, **opt_eps)
    return po.Yogi(params, lr=lr, betas=_betas((0.9, 0.999), beta1, beta2, 1),
                   weight_decay=weight_decay, **opt_eps)
