"""Error compensation and the paper's learning-rate schedule (arXiv 1906.02367, Algorithm 1).

At a synchronization index a worker with local model ``x_r``, last synchronized model ``x_sync``
and memory ``m_r`` forms the net progress plus memory, compresses it and keeps the residual::

    p_r = m_r + x_sync - x_r          (Algorithm 1, line 7)
    g_r = QComp_k(p_r)                (line 8; the compressor is a contraction, Definition 3)
    m_r <- p_r - g_r                  (line 9)

Pure functions on 1-D tensors, no MPI.
"""

from __future__ import annotations

import torch

from hpcml.qsparse.compressors import Compressor, Payload


def compensate(compressor: Compressor, memory: torch.Tensor, x_sync: torch.Tensor,
               x_local: torch.Tensor, gen: torch.Generator | None = None
               ) -> tuple[Payload, torch.Tensor, torch.Tensor]:
    """One error-compensated compression: returns ``(payload, g_r, new memory)``, where ``g_r``
    is the decoded update (what every receiver sees) and ``new memory = p_r - g_r``.
    Invariant: ``g_r + new memory == m_r + x_sync - x_local`` (up to float rounding)."""
    progress = memory + (x_sync - x_local)
    payload = compressor.encode(progress, gen)
    update = compressor.decode(payload.data, progress.numel(), progress.dtype)
    return payload, update, progress - update


def learning_rate(step: int, lr: float, schedule: str = "constant", a: float = 1.0) -> float:
    """Learning rate at local iteration ``step`` (0-based).

    ``constant``: ``lr`` (the paper's non-convex setting, Theorems 1-2: a fixed ``eta``).
    ``decay``: ``eta_t = xi / (a + t)`` with ``xi = lr * a`` so that ``eta_0 = lr`` (the paper's
    strongly convex setting, Theorems 3-4, which need ``a >= H / gamma`` up to constants)."""
    if schedule == "constant":
        return lr
    if schedule == "decay":
        return lr * a / (a + step)
    raise ValueError(f"learning_rate: unknown schedule {schedule!r}; use 'constant' or 'decay'")
