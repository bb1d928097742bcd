"""Mixed precision for every layout: low-precision compute, float32 master weights and optimizer
state, and (for float16) dynamic loss scaling whose skip decision is the same on every rank.

One mechanism, parameterized by the compute dtype (:class:`MixedPrecision`):

- **casts**: the model's parameters stay float32 (they *are* the master weights, and the
  optimizer's state is float32 with them); :meth:`MixedPrecision.autocast` runs the forward
  under ``torch.autocast`` with the compute dtype, so matrix products run in bfloat16/float16
  and autograd hands back float32 parameter gradients. Data-parallel reductions, ZeRO-1
  reduce-scatters, pipeline sums and clipping therefore see float32 gradients, as in fp32
  training; pipeline activations and tensor-parallel partial sums travel in the compute dtype.
- **loss scaling**: the backward pass runs on ``loss * scale`` (:meth:`scale_loss`); at
  :meth:`step` the gradients the update reads (after the layout's reduction) are divided by
  the scale -- exact, as the scale is always a power of two -- and checked for inf/nan. One
  ``allreduce`` of the found-inf flag over ``comm`` (every rank of the job) makes the decision
  common: either every rank steps or every rank skips and multiplies the scale by ``backoff``
  (0.5). After ``growth_interval`` steps in a row without overflow the scale is multiplied by
  ``growth`` (2). float16 defaults to dynamic scaling from 2**16; bfloat16 (float32's range)
  to a fixed scale of 1.

A run on R ranks equals the one-process run of the same recipe (same dtype, same scale
sequence) up to the rounding of low-precision sums whose order differs; it is not bitwise
equal. Refused, in one line: a parameter that is not float32 in the optimizer (the master
weights would be low precision), and a scale or factor that is not a power of two.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from hpcml.comm import Communicator, world
from hpcml.errors import UsageError
from hpcml.parallel.optimizer import DistributedOptimizer
from hpcml.parallel.sharding import ShardedOptimizer

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _power_of_two(name: str, value: float) -> float:
    if not (value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5):
        raise UsageError(f"MixedPrecision: {name}={value} is not a power of two; unscaling is "
                         f"exact only by powers of two: use {2.0 ** round(math.log2(value))}"
                         if value > 0 and math.isfinite(value) else
                         f"MixedPrecision: {name}={value} must be a positive power of two")
    return float(value)


class MixedPrecision:
    """Low-precision compute with float32 master weights (module docstring).

    ``dtype``: ``"bf16"``/``"fp16"`` or the torch dtype. ``comm``: every rank of the job (the
    mesh's world; default :func:`hpcml.comm.world`): the skip decision is agreed over it.
    ``loss_scale``: the first scale (default 2**16 for float16, 1 for bfloat16); ``dynamic``:
    adapt it (default: float16 only). Constructing it is not collective; :meth:`step` is."""

    def __init__(self, dtype: str | torch.dtype, comm: Communicator | None = None, *,
                 loss_scale: float | None = None, dynamic: bool | None = None,
                 growth_interval: int = 2000, growth: float = 2.0,
                 backoff: float = 0.5) -> None:
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise UsageError(f"MixedPrecision: dtype {dtype!r} is not one of "
                                 f"{sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        if dtype not in (torch.bfloat16, torch.float16):
            raise UsageError(f"MixedPrecision: dtype {dtype} is not bfloat16 or float16")
        if growth_interval < 1:
            raise UsageError(f"MixedPrecision: growth_interval={growth_interval} must be >= 1")
        fp16 = dtype == torch.float16
        self.dtype, self.comm = dtype, comm if comm is not None else world()
        self.dynamic = fp16 if dynamic is None else dynamic
        self.scale = _power_of_two("loss_scale", 2.0 ** 16 if fp16 and loss_scale is None
                                   else (loss_scale or 1.0))
        self.growth = _power_of_two("growth", growth)
        self.backoff = _power_of_two("backoff", backoff)
        self.growth_interval = growth_interval
        self.good_steps = 0  # steps in a row without overflow
        self.skipped = 0  # steps skipped so far
        self._unscaled: bool | None = None  # this step's agreed found-inf, once unscaled

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context manager for the forward pass: ``torch.autocast`` on the CPU with the
        compute dtype. The backward pass needs none."""
        return torch.autocast("cpu", dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``: call backward on this (or ``model.backward`` of a pipeline)."""
        return loss * self.scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Finish the layout's gradient reduction (a ``DistributedOptimizer`` synchronizes, a
        ``ShardedOptimizer`` reduce-scatters), divide the gradients its update reads by the
        scale and return whether any rank of ``comm`` found inf/nan (the same on every rank).
        Collective over ``comm``; once per step, before :meth:`step` (which calls it itself
        if needed), e.g. to clip the unscaled gradients in between."""
        found = 0.0
        for g in self._gradients(optimizer):
            g.mul_(1.0 / self.scale)
            if not bool(torch.isfinite(g).all()):
                found = 1.0
        self._unscaled = bool(self.comm.allreduce(found, op="max"))
        return self._unscaled

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale (unless :meth:`unscale_` did), then step ``optimizer`` unless some rank found
        inf/nan, and update the scale. Returns whether the step was taken (the same on every
        rank). Collective over ``comm``: every rank calls it every step."""
        found = self._unscaled if self._unscaled is not None else self.unscale_(optimizer)
        self._unscaled = None
        if found:
            self.skipped += 1
            self.good_steps = 0
            if self.dynamic:
                self.scale *= self.backoff
            if isinstance(optimizer, ShardedOptimizer):
                optimizer.zero_grad()  # the reduced shard must not survive into the next step
            return False
        optimizer.step()
        self.good_steps += 1
        if self.dynamic and self.good_steps % self.growth_interval == 0:
            self.scale *= self.growth
        return True

    def state_dict(self) -> dict[str, Any]:
        """The scale and the counters (save them with the optimizer to resume exactly)."""
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = _power_of_two("scale", state["scale"])
        self.good_steps, self.skipped = int(state["good_steps"]), int(state["skipped"])

    @staticmethod
    def _gradients(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
        """The gradients ``optimizer.step`` will read, reduced; refuses low-precision masters."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise UsageError(f"MixedPrecision: the optimizer holds a {p.dtype} parameter "
                                     f"of shape {tuple(p.shape)}; keep the model in float32 "
                                     "(the master weights) and run the forward under "
                                     "MixedPrecision.autocast() instead of casting the model")
        if isinstance(optimizer, ShardedOptimizer):
            optimizer.reduce_gradients()
            groups = optimizer.inner.param_groups
        else:
            if isinstance(optimizer, DistributedOptimizer) and not optimizer.reducer.synchronized:
                optimizer.synchronize()
            groups = optimizer.param_groups
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p.grad
