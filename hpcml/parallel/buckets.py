"""Fused gradient buckets (Horovod tensor fusion, DDP buckets): pure layout, no MPI.

Parameters are grouped by (device, dtype) — one bucket set per dtype, so a bfloat16 or float16
gradient is reduced in its own dtype (hpcml.comm stages 16-bit sums through float32) and the
result keeps the parameter's dtype — and within a group laid out, in the order given (the
reverse registration order, which is the order backward produces gradients), in consecutive
buckets of at most ``bucket_bytes``. The buckets of all groups are then ordered by their first
parameter's position, which is the order every rank launches them in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from hpcml.comm import Request


def plan_buckets(numels: Sequence[int], bucket_bytes: int, itemsize: int = 4) -> list[list[int]]:
    """Group tensor indices, keeping their order, into consecutive buckets of at most
    ``bucket_bytes`` (a tensor larger than that gets a bucket of its own). Pure."""
    buckets: list[list[int]] = []
    used = 0
    for i, n in enumerate(numels):
        nbytes = n * itemsize
        if not buckets or used + nbytes > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(i)
        used += nbytes
    return buckets


@dataclasses.dataclass
class Bucket:
    """One fused buffer: ``params[j]``'s gradient lives at ``buffer[offsets[j]:...]``."""

    params: list[torch.Tensor]
    offsets: list[int]
    buffer: torch.Tensor
    filled: set[int] = dataclasses.field(default_factory=set)
    request: Request | None = None

    def view(self, j: int) -> torch.Tensor:
        """Slot ``j`` shaped like its parameter (shares the buffer's memory)."""
        p = self.params[j]
        return self.buffer[self.offsets[j]:self.offsets[j] + p.numel()].view(p.shape)


def build_buckets(params: Sequence[torch.Tensor], bucket_bytes: int,
                  wire_dtype: torch.dtype | None = None) -> list[Bucket]:
    """Zero-filled buckets for ``params`` (see module docstring), in launch order. With
    ``wire_dtype``, floating-point parameters' buckets hold that dtype instead of theirs."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        dtype = wire_dtype if wire_dtype is not None and p.dtype.is_floating_point else p.dtype
        groups.setdefault((p.device, dtype), []).append(i)
    planned: list[tuple[int, Bucket]] = []
    for (device, dtype), members in groups.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        for chunk in plan_buckets([params[i].numel() for i in members], bucket_bytes, itemsize):
            owned = [params[members[k]] for k in chunk]
            offsets = [0]
            for p in owned:
                offsets.append(offsets[-1] + p.numel())
            buffer = torch.zeros(offsets[-1], dtype=dtype, device=device)
            planned.append((members[chunk[0]], Bucket(owned, offsets[:-1], buffer)))
    return [bucket for _, bucket in sorted(planned, key=lambda item: item[0])]
