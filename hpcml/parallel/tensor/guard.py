"""Sharded parameters that refuse to stand in for the whole one.

A tensor-parallel layer holds a *shard* of each split weight. Code outside the layer that reads
the weight directly -- a tied output projection written ``F.linear(h, embed.weight)``, a penalty
``weight.square().sum()`` -- would silently compute with 1/T of it. :class:`ShardedParameter`
(the type of every split parameter) therefore refuses, with one line naming the parameter and
the fix, any operation that builds autograd history from it while none of its *readers* is
running: its readers are the module that owns it and the modules registered with
:func:`allow_reader` (code known to handle the shard, e.g. hpcml's NMT transformer, whose output
projection enters the parallel region). A module is *running* between its forward pre-hook and
its forward hook.

What is not refused: operations without autograd history (``torch.no_grad()``, optimizers,
``detach``, ``state_dict``, ``copy_``), and the recomputation of a checkpointed forward during
the backward pass (it was checked when it first ran). What cannot be detected: reads under
``torch.no_grad()`` (evaluation code that projects onto a sharded weight) -- those compute with
the shard too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel.tensor.mappings import Shard

_running: list[int] = []  # ids of the modules whose forward is under way (a stack)


class ShardedParameter(nn.Parameter):
    """An ``nn.Parameter`` holding this rank's ``shard`` of a weight split over ``comm``;
    ``tp_name`` is used in messages (``parallelize`` sets the qualified name). Operations return
    plain tensors, as for ``nn.Parameter``."""

    shard: Shard
    comm: Communicator
    tp_name: str
    readers: set[int]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() != -1:  # recomputation inside backward
            return out
        made_graph = any(isinstance(t, torch.Tensor) and t.grad_fn is not None
                         for t in tree_flatten(out)[0])
        if made_graph:
            for p in tree_flatten((args, kwargs))[0]:
                if isinstance(p, ShardedParameter) and getattr(p, "readers", None) \
                        and not p.readers.intersection(_running):
                    raise UsageError(
                        f"tensor parallelism: {p.tp_name} holds a shard {tuple(p.shape)} of the "
                        f"weight, but code outside its module read it "
                        f"({getattr(func, '__name__', func)}) as if it were whole; call the "
                        "module instead (VocabParallelEmbedding.project(h) for a tied output "
                        "projection) or plan that module 'replicate'")
        return out


def sharded_parameter(full: torch.Tensor, shard: Shard, comm: Communicator,
                      name: str) -> ShardedParameter:
    """This rank's ``shard`` of ``full`` as a new :class:`ShardedParameter` (no readers yet:
    :func:`guard` registers the owning module). Not collective."""
    p = ShardedParameter(shard.local(full.detach(), comm.size, comm.rank),
                         requires_grad=full.requires_grad)
    p.shard, p.comm, p.tp_name, p.readers = shard, comm, name, set()
    return p


def allow_reader(p: ShardedParameter, module: nn.Module) -> None:
    """Let ``module``'s forward (and what it calls) read ``p`` directly. Not collective."""
    p.readers.add(id(module))
    if getattr(module, "_hpcml_tracks_running", False):
        return
    module._hpcml_tracks_running = True
    module.register_forward_pre_hook(lambda m, _args: _running.append(id(m)))
    module.register_forward_hook(lambda m, _args, _out: _leave(id(m)), always_call=True)


def guard(module: nn.Module) -> None:
    """Make ``module`` the reader of each of its own :class:`ShardedParameter` s."""
    for p in module.parameters(recurse=False):
        if isinstance(p, ShardedParameter):
            allow_reader(p, module)


class reading:
    """Context manager: ``module`` counts as running (for a method other than ``forward``
    that reads its own shards, such as ``VocabParallelEmbedding.project``)."""

    def __init__(self, module: nn.Module) -> None:
        self.id = id(module)

    def __enter__(self) -> None:
        _running.append(self.id)

    def __exit__(self, *exc: Any) -> None:
        _leave(self.id)


def _leave(module_id: int) -> None:
    for i in range(len(_running) - 1, -1, -1):
        if _running[i] == module_id:
            del _running[i]
            return
