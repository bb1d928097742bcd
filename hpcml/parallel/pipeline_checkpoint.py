"""Checkpoints of a pipelined model: one full, unsharded ``state_dict`` under the module's own
names, whatever the layout that saved it, loadable in any layout or in one process.

Every ``module.state_dict()`` entry has an owner stage: for a parameter the first stage that
holds it (:meth:`~hpcml.parallel.pipeline_plan.Plan.owner`), for a buffer the stage of the first
call of the unit it belongs to (stage 0 for buffers outside units). :func:`full_state_dict`
gathers the owners' entries to stage 0 of data replica 0 (:func:`gather_full`: tensor-parallel
shards over the tensor group within the owner stage, then ``Send``/``Recv`` on the pipeline
communicator, in key order); :func:`save` writes them with ``torch.save``; :func:`load_full_state`
reads with ``torch.load(weights_only=True)`` and every rank copies the entries it holds.
The optimizer's state travels the same way, keyed by parameter name
(:func:`full_optimizer_state`, :func:`save_optimizer`, :func:`load_full_optimizer_state`).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hpcml.errors import UsageError
from hpcml.parallel.pipeline_trace import param_names
from hpcml.parallel.tensor.plan import sharded_parameters
from hpcml.rundir import atomic_write

if TYPE_CHECKING:
    from hpcml.parallel.pipeline import PipelineModel


def state_owners(pmodel: PipelineModel) -> dict[str, tuple[torch.Tensor, int, str | None]]:
    """Every ``module.state_dict()`` key: its tensor on this rank, its owner stage, and the
    canonical parameter name (None for a buffer)."""
    names = param_names(pmodel.module)
    buffer_stage: dict[str, int] = {}
    for k, call in enumerate(pmodel.trace.calls):
        buffer_stage.setdefault(call.unit, pmodel.plan.stage_of[k])
    out = {}
    for key, t in pmodel.module.state_dict(keep_vars=True).items():
        if isinstance(t, nn.Parameter) and id(t) in names:
            name = names[id(t)]
            out[key] = (t, pmodel.plan.owner(name), name)
        else:
            owners = [s for u, s in buffer_stage.items() if key.startswith(u + ".")]
            out[key] = (t, owners[0] if owners else 0, None)
    return out


def gather_full(pmodel: PipelineModel, tensors: Mapping[str, torch.Tensor],
                ) -> dict[str, torch.Tensor] | None:
    """The whole, single-process value of per-rank pieces, on the mesh's first rank (stage 0,
    data replica 0, tensor rank 0), in ``module.state_dict()`` order; None on other ranks.

    ``tensors`` maps ``module.state_dict()`` keys (parameter names among them) to this rank's
    piece: for a parameter a tensor of its local shape (the parameter, its gradient, an
    optimizer moment), for a buffer the buffer. Only the keys this rank's stage owns
    (:func:`state_owners`) are used, so a rank may pass everything it holds. Within the owner
    stage, tensor-parallel shards are gathered over ``mesh.tensor``
    (:func:`~hpcml.parallel.tensor.plan.sharded_parameters`); that stage's tensor rank 0 then
    sends the whole tensors to stage 0 over the pipeline (shapes first, as one small object).
    Collective over the mesh: every rank calls it, passing the keys the other ranks of its
    stage pass; ranks of data replicas other than 0 return None without communicating."""
    owners = state_owners(pmodel)
    unknown = sorted(k for k in tensors if k not in owners)
    if unknown:
        raise UsageError(f"gather_full: {unknown[:3]} are not keys of the module's state_dict; "
                         "pass parameter names as in module.named_parameters()")
    coords = pmodel.mesh.coords
    if coords["data"] != 0:
        return None
    shards = sharded_parameters(pmodel.module)
    tp = pmodel.mesh.tensor
    first = coords["tensor"] == 0
    mine: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in tensors if owners[k][1] == pmodel.stage):
        piece = tensors[key].detach()
        if key in shards and tp.size > 1:
            mine[key] = shards[key].full(piece, tp)  # collective over the stage's tensor group
        elif first:  # stage 0 returns it: a copy, not the rank's own tensor
            mine[key] = piece.clone() if pmodel.stage == 0 else piece
    if not first:
        return None
    comm = pmodel.comm
    metas = comm.gather({k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                         for k, v in mine.items()}, root=0)
    if pmodel.stage != 0:  # sorted key order; the root receives in the same order
        for key in sorted(mine):
            comm.Send(mine[key].contiguous(), dest=0, tag=2)
        return None
    for source, meta in enumerate(metas[1:], start=1):
        for key in sorted(meta):
            shape, dtype = meta[key]
            mine[key] = torch.empty(shape, dtype=getattr(torch, dtype))
            comm.Recv(mine[key], source=source, tag=2)
    return {key: mine[key] for key in owners if key in mine}


def full_state_dict(pmodel: PipelineModel) -> dict[str, torch.Tensor] | None:
    """The unsharded ``module.state_dict()`` (tensor-parallel shards gathered too) on stage 0
    of data replica 0, tensor rank 0; None elsewhere. Collective over the mesh
    (:func:`gather_full`)."""
    return gather_full(pmodel, {key: t for key, (t, _, _) in state_owners(pmodel).items()})


def load_full_state_dict(pmodel: PipelineModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the entries this rank holds from a full state dict (saved by any layout). Not
    collective."""
    with torch.no_grad():
        for key, (t, _, name) in state_owners(pmodel).items():
            if key not in state:
                raise UsageError(f"checkpoint lacks {key!r}; it was saved from another model")
            if name is None or pmodel.holds(name):
                t.copy_(state[key])


def save(pmodel: PipelineModel, path: str | Path) -> None:
    """Write the full state dict with ``torch.save`` from the mesh's rank 0 (atomically).
    Collective over the mesh: returns when the file is complete."""
    _write(pmodel, full_state_dict(pmodel), path)


def save_optimizer(pmodel: PipelineModel, optimizer: torch.optim.Optimizer,
                   path: str | Path) -> None:
    """Write :func:`full_optimizer_state` like :func:`save`. Collective over the mesh."""
    _write(pmodel, full_optimizer_state(pmodel, optimizer), path)


def _write(pmodel: PipelineModel, payload: Any, path: str | Path) -> None:
    if pmodel.mesh.world.rank == 0:
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write(Path(path), buf.getvalue())
    pmodel.mesh.world.barrier()


def load_full_state(target: PipelineModel | nn.Module, path: str | Path) -> None:
    """Load a checkpoint written by :func:`save` into a pipelined model of any layout, or into
    the plain module in one process. Reads with ``weights_only=True``."""
    state = torch.load(Path(path), weights_only=True)
    if isinstance(target, nn.Module):
        target.load_state_dict(state)
    else:
        load_full_state_dict(target, state)


def full_optimizer_state(pmodel: PipelineModel, optimizer: torch.optim.Optimizer,
                         ) -> dict[str, Any] | None:
    """The optimizer's state unsharded and keyed by parameter name, ``{"state": {name: {key:
    value}}, "param_groups": [hyper-parameters]}``, on stage 0 of data replica 0 (None
    elsewhere). Every rank calls it; the owner stage of each parameter sends its state (shapes
    and numbers as small objects, tensors by ``Send``)."""
    coords = pmodel.mesh.coords
    if coords["data"] != 0 or coords["tensor"] != 0:
        return None
    comm, stage = pmodel.comm, pmodel.stage
    mine = {name: optimizer.state[p] for name, p in pmodel.named_parameters()
            if p in optimizer.state and pmodel.plan.owner(name) == stage}
    meta = {name: {k: ("tensor", tuple(v.shape), str(v.dtype).removeprefix("torch."))
                   if isinstance(v, torch.Tensor) else ("value", v) for k, v in st.items()}
            for name, st in mine.items()}
    metas = comm.gather(meta, root=0)
    if stage != 0:  # tensors in (name, key) order; the root receives them in the same order
        for name in sorted(meta):
            for key in sorted(meta[name]):
                if meta[name][key][0] == "tensor":
                    comm.Send(mine[name][key].detach().contiguous(), dest=0, tag=1)
        return None
    state: dict[str, dict[str, Any]] = {}
    for source, table in enumerate(metas):
        for name in sorted(table):
            entry: dict[str, Any] = {}
            for key in sorted(table[name]):
                kind, *spec = table[name][key]
                if kind == "value":
                    entry[key] = spec[0]
                elif source == 0:
                    entry[key] = mine[name][key].detach().clone()
                else:
                    entry[key] = torch.empty(spec[0], dtype=getattr(torch, spec[1]))
                    comm.Recv(entry[key], source=source, tag=1)
            state[name] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(target: PipelineModel | nn.Module,
                              optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load a file written by :func:`save_optimizer` into ``optimizer`` over ``target``'s
    parameters (a pipelined model of any layout, or the plain module in one process). Reads
    with ``weights_only=True``; not collective."""
    load_optimizer_state(target.named_parameters(), optimizer,
                         torch.load(Path(path), weights_only=True))


def load_optimizer_state(named_parameters: Iterable[tuple[str, torch.Tensor]],
                         optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Give each parameter (by name: ``pmodel.named_parameters()`` of any layout, or
    ``module.named_parameters()`` in one process) its saved optimizer state, and the groups
    their saved hyper-parameters. Not collective."""
    for name, p in named_parameters:
        if name in state["state"]:
            optimizer.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                  for k, v in state["state"][name].items()}
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=False):
        group.update(saved)
