"""The one way hpcml makes model and optimizer state identical on every rank.

- :func:`broadcast_parameters`: the root's tensors (a module's ``state_dict``: parameters *and*
  buffers; or any tensors) are copied into every rank's, bit for bit, by one ``Bcast`` per
  fused chunk of equal dtype and device (16-bit words travel unchanged).
- :func:`broadcast_optimizer_state`: the root's optimizer ``state_dict`` — hyperparameters and
  per-parameter state, whether or not the other ranks have state yet — is loaded on every rank.
  Its structure (small: keys, numbers, tensor shapes) travels pickled from the root within the
  job; its tensors travel through :func:`broadcast_parameters`.

Both are collective over ``comm`` (default :func:`hpcml.comm.world`) and free at one rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hpcml.comm import Communicator, world
from hpcml.parallel.buckets import plan_buckets

CHUNK_BYTES = 64 * 2**20


def _tensors(obj: nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor]
             ) -> list[torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict(keep_vars=True)
    if isinstance(obj, Mapping):
        obj = obj.values()
    tensors = list(obj)
    bad = [type(t).__name__ for t in tensors if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"broadcast_parameters: expected a module, a state dict or tensors, "
                        f"got {bad[0]}")
    return tensors


@torch.no_grad()
def broadcast_parameters(params: nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
                         comm: Communicator | None = None, root: int = 0) -> None:
    """Copy ``root``'s tensors into every rank's (in place; shapes, dtypes and order must agree
    on all ranks). Collective over ``comm``."""
    comm = comm if comm is not None else world()
    if comm.size == 1:
        return
    groups: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for t in _tensors(params):
        groups.setdefault((t.device.type, t.dtype), []).append(t.detach())
    for members in groups.values():
        itemsize = members[0].element_size()
        for chunk in plan_buckets([t.numel() for t in members], CHUNK_BYTES, itemsize):
            tensors = [members[i] for i in chunk]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            comm.Bcast(flat, root=root)
            if comm.rank != root:
                offset = 0
                for t in tensors:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()


_TENSOR = "__hpcml_tensor__"


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by a placeholder naming its index, shape and dtype."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return (_TENSOR, len(tensors) - 1, tuple(obj.shape), str(obj.dtype).removeprefix("torch."))
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _specs(obj: Any) -> list[tuple[int, tuple[int, ...], str]]:
    if isinstance(obj, tuple) and obj and obj[0] == _TENSOR:
        return [obj[1:]]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _specs(v)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in _specs(v)]
    return []


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, tuple) and obj and obj[0] == _TENSOR:
        return tensors[obj[1]]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer,
                              comm: Communicator | None = None, root: int = 0) -> None:
    """Load ``root``'s optimizer state dict on every rank (same parameter groups required).
    Collective over ``comm``."""
    comm = comm if comm is not None else world()
    if comm.size == 1:
        return
    tensors: list[torch.Tensor] = []
    skeleton = _strip(optimizer.state_dict(), tensors) if comm.rank == root else None
    skeleton = comm.bcast(skeleton, root=root)
    tensors = [t.cpu() for t in tensors]  # the other ranks receive on the host
    if comm.rank != root:
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype))
                   for _, shape, dtype in sorted(_specs(skeleton))]
    broadcast_parameters(tensors, comm, root)
    if comm.rank != root:
        optimizer.load_state_dict(_fill(skeleton, tensors))
