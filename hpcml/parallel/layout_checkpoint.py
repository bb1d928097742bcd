"""Checkpoints that move between layouts: the model *and* its optimizer, gathered from any
layout into the shape one process would have saved, and loaded into any layout or one process.

A layout is what :mod:`hpcml.parallel` makes of a model on a ``Mesh(data=D, pipeline=S,
tensor=T)``: stages (:class:`~hpcml.parallel.PipelineModel`), tensor-parallel shards
(:func:`~hpcml.parallel.tensor.parallelize`), optimizer state sharded over the data group
(:class:`~hpcml.parallel.ShardedOptimizer`, ZeRO-1), or any combination of them. The checkpoint
is the single-process one, whatever saved it::

    {"format": "hpcml.parallel.full/1",
     "model": model.state_dict(),                       # single-process names and shapes
     "optimizer": {"state": {param_name: {"step": ..., "exp_avg": ..., ...}},
                   "param_groups": [{"lr": ..., ..., "params": [param_name, ...]}]}}

Saving composes three gathers, innermost first, the same code for every layout:

1. data: ZeRO-1 state is gathered over the data group (``ShardedOptimizer.full_state_dict``);
   data replicas are otherwise equal, so only data replica 0 goes on;
2. tensor: within each stage, every sharded tensor -- a parameter and each of its element-wise
   optimizer states (those of the parameter's shape), which are split along the same dim -- is
   gathered over ``mesh.tensor``;
3. pipeline: each entry's owner stage sends it to stage 0 (one gather of small metadata, then
   ``Send``/``Recv`` per tensor); mesh rank 0 (coordinates all 0, world rank 0) has it all.

:func:`gather_full` runs the tensor and pipeline gathers on any per-rank pieces keyed like the
state dict (gradients, say). Loading runs the chain backwards without communication: each rank
takes the entries its stage holds, cuts its tensor shard of parameters and element-wise state
alike (a state tensor with as many dimensions as its parameter must have its full shape), and a
ZeRO-1 optimizer keeps the slices of its data shard. Before anything changes, every rank checks
what it will load (keys, shapes, parameter names and groups) and the ranks agree (one small
allgather): a refused checkpoint raises the same one-line ``UsageError``, naming the key, on
every rank, and nothing is modified. Files are written atomically
(:func:`hpcml.rundir.atomic_write`) and read with ``torch.load(weights_only=True, mmap=True)``:
tensors and plain values only, no code; the file is memory-mapped, so each rank reads only the
pages of the entries and slices it keeps (a stage's parameters, a tensor shard), never the rest.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel.deferred import is_deferred, materialize
from hpcml.parallel.mesh import Mesh
from hpcml.parallel.pipeline_trace import param_names
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.tensor.mappings import Shard, full_tensors
from hpcml.parallel.tensor.plan import sharded_parameters
from hpcml.rundir import atomic_write

FORMAT = "hpcml.parallel.full/1"


@runtime_checkable
class Pipelined(Protocol):
    """What these functions need of a pipelined model (:class:`~hpcml.parallel.PipelineModel`
    is one): its mesh and module, its pipeline group, which parameters its stage holds, and
    who owns each state-dict entry."""

    mesh: Mesh
    module: nn.Module
    comm: Communicator

    def holds(self, name: str) -> bool: ...

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_owners(self) -> dict[str, tuple[torch.Tensor, int, str | None]]: ...


Model = Pipelined | nn.Module  # an nn.Module may be tensor-parallel


@dataclasses.dataclass
class _View:
    """This rank's part of the single-process model, and where the rank sits."""

    world: Communicator | None         # every rank that calls; None: this rank alone
    data_rank: int                     # 0: this rank's replica saves
    tensor: Communicator | None        # the tensor-parallel group, None without one
    pipe: Communicator | None          # the pipeline group, None without one
    module: nn.Module
    tensors: dict[str, torch.Tensor]   # state_dict key -> this rank's tensor (all keys)
    owner: dict[str, int]              # state_dict key -> the stage that saves it
    held: set[str]                     # state_dict keys whose tensor this rank keeps
    params: dict[str, nn.Parameter]    # canonical name -> parameter, those this rank keeps
    shards: dict[str, Shard]           # state_dict key / parameter name -> its tensor split

    @property
    def stage(self) -> int:
        return 0 if self.pipe is None else self.pipe.rank

    @property
    def tensor_rank(self) -> int:
        return 0 if self.tensor is None else self.tensor.rank

    def local(self, value: torch.Tensor, shard: Shard | None) -> torch.Tensor:
        if shard is None or self.tensor is None:
            return value
        return shard.local(value, self.tensor.size, self.tensor.rank)


def _view(model: Model, mesh: Mesh | None) -> _View:
    """Without a mesh, a PipelineModel uses its own and a plain module is a whole model that
    this rank handles alone, without communication."""
    if isinstance(model, Pipelined):
        mesh = model.mesh if mesh is None else mesh
        owners, module, pipe = model.state_owners(), model.module, model.comm
        held = {k for k, (_, _, name) in owners.items() if name is None or model.holds(name)}
        params = dict(model.named_parameters())
    elif isinstance(model, nn.Module):
        if mesh is not None and mesh.pipeline.size > 1:
            raise UsageError(f"model: the mesh has {mesh.pipeline.size} pipeline stages; pass "
                             "the PipelineModel, not its module")
        module, pipe = model, None
        names = param_names(module)
        owners = {k: (t, 0, names.get(id(t)) if isinstance(t, nn.Parameter) else None)
                  for k, t in module.state_dict(keep_vars=True).items()}
        held = set(owners)
        params = dict(module.named_parameters())
    else:
        raise UsageError(f"model: expected a PipelineModel or an nn.Module, got "
                         f"{type(model).__name__}")
    where = (None, 0, None) if mesh is None else (mesh.world, mesh.coords["data"], mesh.tensor)
    shards = sharded_parameters(module)
    if mesh is None and shards:
        raise UsageError("mesh: the model is tensor-parallel; pass mesh=... (the Mesh whose "
                         "tensor group it was parallelized over)")
    return _View(*where, pipe, module, {k: v[0] for k, v in owners.items()},
                 {k: v[1] for k, v in owners.items()}, held, params, shards)


def _elementwise(value: Any, param: torch.Tensor) -> bool:
    """Optimizer state with one number per parameter element (split like the parameter)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


# -- saving ------------------------------------------------------------------------------------
def _optimizer_part(view: _View, optimizer: torch.optim.Optimizer,
                    ) -> tuple[dict[str, dict[str, Any]], list[tuple[dict[str, Any], list[str]]]]:
    """This rank's optimizer state by parameter name (whole over the data group under ZeRO-1:
    collective over it then) and its groups as (hyper-parameters, parameter names)."""
    names = {id(p): n for n, p in view.params.items()}
    groups = []
    for g in optimizer.param_groups:
        if any(id(p) not in names for p in g["params"]):
            raise UsageError("optimizer: it updates a parameter this rank's model does not hold; "
                             "build it over model.parameters() (of the PipelineModel: its stage's)")
        groups.append(({k: v for k, v in g.items() if k != "params"},
                       [names[id(p)] for p in g["params"]]))
    if isinstance(optimizer, ShardedOptimizer):
        if view.world is None:
            raise UsageError("mesh: a ShardedOptimizer's state is split over its data group; "
                             "pass mesh=... (the Mesh whose data group it shards over)")
        full = optimizer.full_state_dict()
        return {names[id(optimizer.offsets[i][0])]: s for i, s in full["state"].items()}, groups
    return {names[id(p)]: dict(s) for p, s in optimizer.state.items() if s}, groups


def _owned(view: _View, opt_state: dict[str, dict[str, Any]] | None,
           ) -> list[tuple[tuple[str, ...], Any, Shard | None]]:
    """(leaf key, value, tensor split) of every entry this stage saves, in an order that every
    tensor rank of the stage shares."""
    leaves: list[tuple[tuple[str, ...], Any, Shard | None]] = [
        (("model", k), t.detach(), view.shards.get(k)) for k, t in view.tensors.items()
        if view.owner[k] == view.stage and k in view.held]
    for name in sorted(opt_state or {}):
        if view.owner[name] != view.stage:
            continue
        for key in sorted(opt_state[name]):
            value = opt_state[name][key]
            split = _elementwise(value, view.params[name])
            leaves.append((("optimizer", name, key),
                           value.detach() if isinstance(value, torch.Tensor) else value,
                           view.shards.get(name) if split else None))
    return leaves


def _gather_leaves(view: _View, leaves: list[tuple[tuple[str, ...], Any, Shard | None]],
                   extra: Any) -> tuple[dict[tuple[str, ...], Any], list[Any]] | None:
    """This stage's leaves made whole over the tensor group, then every stage's (and its
    ``extra``) at stage 0 of the calling data replica; None elsewhere. Collective over the
    replica's tensor and pipeline groups, with the same leaves on every tensor rank of a
    stage."""
    tp = view.tensor
    if tp is not None and tp.size > 1:
        layout = [(leaf, s) for leaf, _, s in leaves]
        if any(other != layout for other in tp.allgather(layout)):
            raise RuntimeError("layout checkpoint: the tensor ranks of a stage hold different "
                               "entries (an optimizer stepped on some ranks only?)")
        whole = iter(full_tensors([(v, s) for _, v, s in leaves
                                   if isinstance(v, torch.Tensor)], tp))
        leaves = [(leaf, next(whole) if isinstance(v, torch.Tensor) else v, None)
                  for leaf, v, _ in leaves]
    if view.tensor_rank != 0:
        return None
    items = [(leaf, v) for leaf, v, _ in leaves]
    if view.pipe is None or view.pipe.size == 1:
        return dict(items), [extra]
    return _to_stage0(view.pipe, items, extra)


def gather_full(model: Model, tensors: Mapping[str, torch.Tensor],
                mesh: Mesh | None = None) -> dict[str, torch.Tensor] | None:
    """The whole, single-process values of per-rank pieces, in ``module.state_dict()`` order,
    on mesh rank 0; None elsewhere. ``tensors`` maps state-dict keys (parameter names among
    them) to this rank's piece: for a parameter a tensor of its local shape (the parameter,
    its gradient, an optimizer moment), for a buffer the buffer. Only the keys this rank's
    stage saves are used, so a rank may pass everything it holds. Collective over the mesh like
    :func:`full_checkpoint`, every rank passing the keys the other ranks of its stage pass."""
    view = _view(model, mesh)
    unknown = sorted(k for k in tensors if k not in view.tensors)
    if unknown:
        raise UsageError(f"gather_full: {unknown[:3]} are not keys of the module's state_dict; "
                         "pass parameter names as in module.named_parameters()")
    if view.data_rank != 0:
        return None
    leaves = [(("model", k), tensors[k].detach(), view.shards.get(k)) for k in sorted(tensors)
              if view.owner[k] == view.stage]
    gathered = _gather_leaves(view, leaves, None)
    if gathered is None:
        return None
    got = gathered[0]
    return {k: got[("model", k)] for k in view.tensors if ("model", k) in got}


def _to_stage0(comm: Communicator, items: list[tuple[tuple[str, ...], Any]], extra: Any,
               ) -> tuple[dict[tuple[str, ...], Any], list[Any]] | None:
    """Every stage's items and ``extra`` at stage 0 (None elsewhere). Collective over
    ``comm``: one gather of metadata (keys, shapes, dtypes, plain values), then one
    ``Send``/``Recv`` per tensor, in the sender's order."""
    meta = [(leaf, ("tensor", tuple(v.shape), str(v.dtype).removeprefix("torch."))
             if isinstance(v, torch.Tensor) else ("value", v)) for leaf, v in items]
    metas = comm.gather((meta, extra), root=0) if comm.size > 1 else [(meta, extra)]
    if comm.rank != 0:
        for _, v in items:
            if isinstance(v, torch.Tensor):
                comm.Send(v.contiguous(), dest=0, tag=7)
        return None
    out: dict[tuple[str, ...], Any] = {leaf: v for leaf, v in items}
    for source, (table, _) in enumerate(metas[1:], start=1):
        for leaf, (kind, *spec) in table:
            if kind == "value":
                out[leaf] = spec[0]
            else:
                out[leaf] = torch.empty(spec[0], dtype=getattr(torch, spec[1]))
                comm.Recv(out[leaf], source=source, tag=7)
    return out, [e for _, e in metas]


def _merge_groups(view: _View, per_stage: list[list[tuple[dict[str, Any], list[str]]]],
                  ) -> list[dict[str, Any]]:
    counts = {len(g) for g in per_stage}
    if len(counts) != 1:
        raise UsageError(f"optimizer: the stages' optimizers have {sorted(counts)} parameter "
                         "groups; give every stage's optimizer the same groups")
    order = {n: i for i, n in enumerate(param_names(view.module).values())}
    groups = []
    for i in range(counts.pop()):
        names = {n for stage in per_stage for n in stage[i][1]}
        groups.append({**per_stage[0][i][0], "params": sorted(names, key=order.__getitem__)})
    return groups


def full_checkpoint(model: Model, optimizer: torch.optim.Optimizer | None = None,
                    mesh: Mesh | None = None) -> dict[str, Any] | None:
    """The single-process checkpoint (module docstring) of ``model`` -- a
    :class:`~hpcml.parallel.PipelineModel`, or an ``nn.Module``, tensor-parallel over
    ``mesh.tensor`` or not -- and of ``optimizer`` (a torch optimizer over the parameters this
    rank holds, or a :class:`~hpcml.parallel.ShardedOptimizer`), on mesh rank 0 (world rank 0);
    None elsewhere.

    Collective over ``mesh`` (default: the PipelineModel's): every rank of it calls it. Data
    replica 0 gathers over the tensor and pipeline groups; the other replicas take part only in
    the ZeRO-1 gather over the data group. A plain module without a mesh is a whole model on
    this rank: no communication, the result is returned here. Tensors are copies."""
    view = _view(model, mesh)
    opt_state, groups = _optimizer_part(view, optimizer) if optimizer is not None else (None, [])
    if view.data_rank != 0:
        return None
    gathered = _gather_leaves(view, _owned(view, opt_state), groups)
    if gathered is None:
        return None
    got, per_stage = gathered
    out: dict[str, Any] = {"format": FORMAT,
                           "model": {k: got[("model", k)] for k in view.tensors}}
    if optimizer is not None:
        by_name: dict[str, dict[str, Any]] = {}
        for leaf, value in got.items():
            if leaf[0] == "optimizer":
                by_name.setdefault(leaf[1], {})[leaf[2]] = value
        state = {n: dict(sorted(by_name[n].items()))
                 for n in param_names(view.module).values() if n in by_name}
        out["optimizer"] = {"state": state, "param_groups": _merge_groups(view, per_stage)}
    return out


def save_checkpoint(path: str | Path, model: Model,
                    optimizer: torch.optim.Optimizer | None = None,
                    mesh: Mesh | None = None) -> None:
    """Write :func:`full_checkpoint` to ``path`` (atomically, from mesh rank 0). Collective
    over the mesh like :func:`full_checkpoint`; returns on every rank once the file is
    complete, or raises the writer's error on every rank."""
    write_file(path, full_checkpoint(model, optimizer, mesh), _view(model, mesh).world)


def write_file(path: str | Path, payload: Any, comm: Communicator | None) -> None:
    """``torch.save(payload)`` to ``path`` atomically on the rank where ``payload`` is not
    None. Collective over ``comm`` (whose rank 0 must be that rank), so that a write error
    raises on every rank; ``comm=None``: this rank alone."""
    error = None
    if payload is not None:
        try:
            buf = io.BytesIO()
            torch.save(payload, buf)
            atomic_write(Path(path), buf.getvalue())
        except OSError as exc:
            error = f"{path}: cannot write the checkpoint ({exc.strerror or exc})"
    error = comm.bcast(error) if comm is not None and comm.size > 1 else error
    if error is not None:
        raise UsageError(error)


# -- loading -----------------------------------------------------------------------------------
def read_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's dict, read with ``torch.load(weights_only=True)``; ``UsageError``
    naming the file when it is missing, not a dict, or holds anything but tensors and plain
    values. Not collective."""
    try:
        # mmap: a rank reads the pages of the slices it keeps, never the whole file
        payload = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path}: refused to load (only tensors and plain values may be in a "
                         f"checkpoint): {first}") from None
    if not isinstance(payload, dict):
        raise UsageError(f"{path}: holds a {type(payload).__name__}, not a checkpoint dict")
    return payload


def _model_loads(view: _View, saved: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, this rank's value) for every entry this rank holds; UsageError naming the
    first key that does not fit."""
    if not isinstance(saved, Mapping):
        raise UsageError("checkpoint['model']: not a state dict; save with "
                         "hpcml.parallel.save_checkpoint")
    for key in view.tensors:
        if key not in saved:
            raise UsageError(f"checkpoint lacks {key!r}; it was saved from another model")
    for key in saved:
        if key not in view.tensors:
            raise UsageError(f"checkpoint has {key!r}, which this model lacks; it was saved "
                             "from another model")
    loads = []
    for key, dst in view.tensors.items():
        if key not in view.held:
            continue
        value = saved[key]
        local = _fit(view, value, view.shards.get(key), dst, f"checkpoint[{key!r}]")
        loads.append((dst, local))
    return loads


def _fit(view: _View, value: Any, shard: Shard | None, dst: torch.Tensor, what: str,
         ) -> torch.Tensor:
    """``value`` cut to this rank's shard, checked against ``dst``'s shape."""
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{what}: a {type(value).__name__}, not a tensor")
    try:
        local = view.local(value, shard)
    except RuntimeError:
        local = None
    if local is None or local.shape != dst.shape:
        where = "" if shard is None else f" (its tensor rank {view.tensor_rank} shard)"
        raise UsageError(f"{what}: shape {list(value.shape)} does not fit this model's "
                         f"{list(dst.shape)}{where}; it was saved from another model")
    return local


def _optimizer_loads(view: _View, saved: Any, model_state: Mapping[str, Any],
                     optimizer: torch.optim.Optimizer,
                     ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """This rank's optimizer state by parameter name and each group's hyper-parameters."""
    if not isinstance(saved, Mapping) or "state" not in saved or "param_groups" not in saved:
        raise UsageError("checkpoint has no optimizer state; save it with "
                         "hpcml.parallel.save_checkpoint(path, model, optimizer, mesh)")
    everything = set(param_names(view.module).values())
    for name in saved["state"]:
        if name not in everything:
            raise UsageError(f"checkpoint has optimizer state for {name!r}, which this model "
                             "lacks; it was saved from another model")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise UsageError(f"checkpoint has {len(groups)} optimizer parameter groups, this "
                         f"optimizer {len(optimizer.param_groups)}; build it with the same groups")
    names = {id(p): n for n, p in view.params.items()}
    hyper = []
    for i, (mine, theirs) in enumerate(zip(optimizer.param_groups, groups, strict=True)):
        for p in mine["params"]:
            if names.get(id(p)) not in theirs["params"]:
                raise UsageError(f"optimizer group {i}: parameter {names.get(id(p))!r} is not in "
                                 f"the checkpoint's group {i}; build it with the same groups")
        hyper.append({k: v for k, v in theirs.items() if k != "params"})
    state = {}
    for name, p in view.params.items():
        entry = {}
        for key, value in saved["state"].get(name, {}).items():
            full = model_state[name]
            if isinstance(value, torch.Tensor) and value.dim() == full.dim() > 0:
                value = _fit(view, value, view.shards.get(name), p,
                             f"checkpoint optimizer state [{name!r}][{key!r}]")
                value = value.to(dtype=p.dtype, device=p.device)
            entry[key] = value.clone() if isinstance(value, torch.Tensor) else value
        state[name] = entry
    return state, hyper


def _apply_optimizer(view: _View, optimizer: torch.optim.Optimizer,
                     state: dict[str, dict[str, Any]], hyper: list[dict[str, Any]]) -> None:
    names = {id(p): n for n, p in view.params.items()}
    if isinstance(optimizer, ShardedOptimizer):
        groups, index = [], 0
        for h, g in zip(hyper, optimizer.param_groups, strict=True):
            groups.append({**h, "params": list(range(index, index + len(g["params"])))})
            index += len(g["params"])
        optimizer.load_full_state_dict(
            {"state": {i: state[names[id(p)]] for i, (p, _) in enumerate(optimizer.offsets)},
             "param_groups": groups})
        return
    for h, g in zip(hyper, optimizer.param_groups, strict=True):
        g.update(h)
        for p in g["params"]:
            if state[names[id(p)]]:
                optimizer.state[p] = state[names[id(p)]]
            else:
                optimizer.state.pop(p, None)


def load_full_checkpoint(model: Model, checkpoint: Mapping[str, Any],
                         optimizer: torch.optim.Optimizer | None = None,
                         mesh: Mesh | None = None, *, collective: bool = True,
                         weights: bool = True) -> None:
    """Load a :func:`full_checkpoint` (saved by any layout, or built in one process) into
    ``model`` and ``optimizer`` in this layout: each rank copies the entries its stage holds,
    cut to its tensor shard; a :class:`~hpcml.parallel.ShardedOptimizer` keeps its data shard.

    Collective over the mesh (``collective=True``): the ranks agree before anything changes, so
    a checkpoint that does not fit raises the same ``UsageError`` on every rank and modifies
    nothing. With ``collective=False``, or for a plain module without a mesh (a whole model on
    this rank), it does not communicate, and each rank checks its own part. ``weights=False``
    loads the optimizer only (the checkpoint's model part still gives the parameters' shapes).
    A :func:`~hpcml.parallel.deferred.deferred_init` module not yet materialized is materialized
    first (its shards only), then overwritten."""
    if isinstance(model, nn.Module) and is_deferred(model):
        materialize(model)
    view = _view(model, mesh)
    error, apply = None, None
    try:
        apply = _prepare(view, checkpoint, optimizer, weights)
    except UsageError as exc:
        error = str(exc)
    if collective:
        error = _agree(view.world, error)
    if error is not None:
        raise UsageError(error)
    apply()


def _agree(comm: Communicator | None, error: str | None) -> str | None:
    """The first rank's error, on every rank of ``comm``. Collective (one small allgather)."""
    if comm is None or comm.size == 1:
        return error
    return next((e for e in comm.allgather(error) if e is not None), None)


def _prepare(view: _View, checkpoint: Any, optimizer: torch.optim.Optimizer | None,
             weights: bool) -> Callable[[], None]:
    """Check everything this rank will load; return the function that loads it."""
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != FORMAT:
        raise UsageError(f"checkpoint: not a {FORMAT} checkpoint; save it with "
                         "hpcml.parallel.save_checkpoint")
    loads = _model_loads(view, checkpoint.get("model"))  # checked even if only the optimizer
    if not weights:                                     # loads: it gives the shapes
        loads = []
    opt = None if optimizer is None else \
        _optimizer_loads(view, checkpoint.get("optimizer"), checkpoint["model"], optimizer)

    def apply() -> None:
        with torch.no_grad():
            for dst, value in loads:
                dst.copy_(value)
        if opt is not None:
            _apply_optimizer(view, optimizer, *opt)

    return apply


def load_checkpoint(path: str | Path, model: Model,
                    optimizer: torch.optim.Optimizer | None = None,
                    mesh: Mesh | None = None) -> None:
    """Read a file written by :func:`save_checkpoint` (``weights_only=True``; every rank reads
    it, so it must be on a file system they share) and :func:`load_full_checkpoint` it.
    Collective like :func:`load_full_checkpoint`."""
    error, payload = None, None
    try:
        payload = read_file(path)
    except UsageError as exc:
        error = str(exc)
    error = _agree(_view(model, mesh).world, error)
    if error is not None:
        raise UsageError(error)
    load_full_checkpoint(model, payload, optimizer, mesh)
