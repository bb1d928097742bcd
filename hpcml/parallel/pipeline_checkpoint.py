"""Checkpoints of a pipelined model: which stage saves each entry, and the pipeline-flavoured
names of :mod:`hpcml.parallel.layout_checkpoint`, the one mechanism that gathers a model and its
optimizer from any layout (data, pipeline, tensor, ZeRO-1) into the single-process shape.

Every ``module.state_dict()`` entry has an owner stage: for a parameter the first stage that
holds it (:meth:`~hpcml.parallel.pipeline_plan.Plan.owner`), for a buffer the stage of the first
call of the unit it belongs to (stage 0 for buffers outside units). :func:`save` writes the
model's full ``state_dict``; :func:`save_optimizer` writes the full checkpoint (model and
optimizer, keyed by parameter name); :func:`load_full_state` and
:func:`load_full_optimizer_state` read either with ``torch.load(weights_only=True)`` into a
pipelined model of any layout or the plain module in one process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from hpcml.parallel import layout_checkpoint as fc
from hpcml.parallel.layout_checkpoint import Pipelined
from hpcml.parallel.pipeline_plan import Plan
from hpcml.parallel.pipeline_trace import param_names


def state_owners(module: nn.Module, units: Sequence[str], plan: Plan,
                 ) -> dict[str, tuple[torch.Tensor, int, str | None]]:
    """Every ``module.state_dict()`` key: its tensor on this rank, its owner stage, and the
    canonical parameter name (None for a buffer). ``units[k]``: the unit of traced call k."""
    names = param_names(module)
    buffer_stage: dict[str, int] = {}
    for k, unit in enumerate(units):
        buffer_stage.setdefault(unit, plan.rank_of(plan.stage_of[k]))
    out = {}
    for key, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, nn.Parameter) and id(t) in names:
            name = names[id(t)]
            out[key] = (t, plan.owner(name), name)
        else:
            owners = [s for u, s in buffer_stage.items() if key.startswith(u + ".")]
            out[key] = (t, owners[0] if owners else 0, None)
    return out


def gather_full(pmodel: Pipelined, tensors: Mapping[str, torch.Tensor],
                ) -> dict[str, torch.Tensor] | None:
    """:func:`hpcml.parallel.layout_checkpoint.gather_full` over the model's mesh: the whole
    values of per-rank pieces (parameters, gradients, optimizer moments) keyed by state-dict
    key, on the mesh's first rank. Collective over the mesh."""
    return fc.gather_full(pmodel, tensors)


def full_state_dict(pmodel: Pipelined) -> dict[str, torch.Tensor] | None:
    """The unsharded ``module.state_dict()`` (tensor shards gathered too) on the mesh's rank 0,
    None elsewhere. Collective over the mesh."""
    full = fc.full_checkpoint(pmodel)
    return None if full is None else full["model"]


def load_full_state_dict(pmodel: Pipelined, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the entries this rank holds (cut to its tensor shard) from a full state dict saved
    by any layout. Not collective: each rank checks its own part."""
    fc.load_full_checkpoint(pmodel, {"format": fc.FORMAT, "model": state}, collective=False)


def save(pmodel: Pipelined, path: str | Path) -> None:
    """Write the full state dict (a plain ``state_dict``) with ``torch.save`` from the mesh's
    rank 0, atomically. Collective over the mesh: returns when the file is complete."""
    fc.write_file(path, full_state_dict(pmodel), pmodel.mesh.world)


def save_optimizer(pmodel: Pipelined, optimizer: torch.optim.Optimizer,
                   path: str | Path) -> None:
    """Write the full checkpoint of the model and ``optimizer``
    (:func:`hpcml.parallel.save_checkpoint`). Collective over the mesh."""
    fc.save_checkpoint(path, pmodel, optimizer)


def load_full_state(target: Pipelined | nn.Module, path: str | Path) -> None:
    """Load a file written by :func:`save` (or the model part of a full checkpoint) into a
    pipelined model of any layout, or into the plain module in one process. Reads with
    ``weights_only=True``; not collective."""
    state = fc.read_file(path)
    if state.get("format") != fc.FORMAT:
        state = {"format": fc.FORMAT, "model": state}
    fc.load_full_checkpoint(target, state, collective=False)


def load_full_optimizer_state(target: Pipelined | nn.Module,
                              optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load the optimizer part of a file written by :func:`save_optimizer` into ``optimizer``
    over ``target``'s parameters (a pipelined model of any layout, or the plain module in one
    process). Reads with ``weights_only=True``; not collective."""
    fc.load_full_checkpoint(target, fc.read_file(path), optimizer, collective=False,
                            weights=False)
