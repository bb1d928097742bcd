"""``parallelize(model, tp_comm, plan)``: turn a single-process model into its tensor-parallel
version in place, slicing every weight from the model's own (so the result computes what the
model computed), and the full-state checkpoint of such a model.

A plan maps module names (as in ``model.named_modules()``) to a style:

- ``"column"`` / ``"row"``: an ``nn.Linear`` becomes :class:`ColumnParallelLinear` (output
  features sharded) / :class:`RowParallelLinear` (expects sharded input, sums the outputs);
- ``"vocab"``: an ``nn.Embedding`` becomes :class:`VocabParallelEmbedding`;
- ``"heads"``: an ``nn.MultiheadAttention`` becomes :class:`HeadParallelAttention`;
- ``"sharded_dropout"``: an ``nn.Dropout`` applied to a sharded activation becomes
  :class:`ShardedDropout` (masks independent across ranks; other dropouts stay as they are and
  draw identical masks on every rank);
- ``"replicate"``: left as it is (every rank holds and computes all of it).

The **default plan** (``plan=None``, or names a user plan leaves out) is derived from the module
tree: every ``nn.MultiheadAttention`` is ``"heads"``, every ``nn.Embedding`` ``"vocab"``, and
within each parent the ``nn.Linear`` children, taken in registration order, pair up as
``"column"`` then ``"row"`` (an odd last one is ``"replicate"``). That matches the feed-forward
blocks of ``nn.Transformer*Layer`` (``linear1`` -> activation -> ``linear2``) and MLPs written
as ``nn.Sequential(Linear, act, Linear, ...)``; an ``nn.Dropout`` child registered between a
``"column"`` Linear and its ``"row"`` partner acts on the sharded hidden layer and is
``"sharded_dropout"`` (``nn.Transformer*Layer.dropout``). A model whose paired Linears are not
applied one after the other with only elementwise operations between them needs a user plan.
A user plan's ``"replicate"`` keeps the module's whole subtree replicated, except the parts the
plan names.

For the hpcml NMT :class:`~hpcml.nmt.model.Transformer`, whose embedding is also its output
projection, ``forward`` then returns this rank's *vocabulary slice* of the logits; compute the
loss with :func:`~hpcml.parallel.tensor.loss.vocab_parallel_cross_entropy` (the model's
``vocab_start``/``vocab_size`` are ``model.embed.vocab_start`` and ``model.embed.num_embeddings``).
Its gradients become dense (a shard's projection gradient covers every row of the shard).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel.tensor.guard import ShardedParameter, allow_reader
from hpcml.parallel.tensor.layers import (
    ColumnParallelLinear,
    HeadParallelAttention,
    RowParallelLinear,
    ShardedDropout,
    VocabParallelEmbedding,
)
from hpcml.parallel.tensor.mappings import Shard, copy_to, full_tensors

STYLES = {"column": (nn.Linear, ColumnParallelLinear), "row": (nn.Linear, RowParallelLinear),
          "vocab": (nn.Embedding, VocabParallelEmbedding),
          "heads": (nn.MultiheadAttention, HeadParallelAttention),
          "sharded_dropout": (nn.Dropout, ShardedDropout), "replicate": (nn.Module, None)}


def default_plan(model: nn.Module) -> dict[str, str]:
    """The plan ``parallelize`` uses when none is given (module docstring). Pure."""
    plan: dict[str, str] = {}
    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, nn.MultiheadAttention):
            plan[name] = "heads"
            skip.add(name)
        elif isinstance(module, nn.Embedding):
            plan[name] = "vocab"
        linears = [n for n, c in module.named_children() if type(c) is nn.Linear]
        prefix = f"{name}." if name else ""
        for i, child in enumerate(linears):
            last_odd = i == len(linears) - 1 and len(linears) % 2
            plan[prefix + child] = "replicate" if last_odd else ("column", "row")[i % 2]
    return _with_sharded_dropouts(model, plan)


def _with_sharded_dropouts(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """``plan`` with every ``nn.Dropout`` child registered between a ``"column"`` Linear and
    the next ``"row"`` Linear of the same parent marked ``"sharded_dropout"`` (unless the plan
    names it). Pure."""
    out = dict(plan)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        inside = False  # between a column Linear and its row partner
        for child, c in module.named_children():
            style = plan.get(prefix + child)
            if type(c) is nn.Linear:
                inside = style == "column" or (inside and style not in ("row", "replicate"))
            elif inside and type(c) is nn.Dropout and style is None:
                out[prefix + child] = "sharded_dropout"
    return out


def parallelize(model: nn.Module, tp_comm: Communicator,
                plan: Mapping[str, str] | None = None) -> nn.Module:
    """Replace the planned modules of ``model`` by their tensor-parallel versions over
    ``tp_comm``, in place, and return ``model``.

    Collective in the sense that every rank of ``tp_comm`` must call it on an identical model
    (same weights: build it with the same seed, or load the same checkpoint first) with the same
    plan; it does not communicate. ``plan`` entries override the default plan's. Unknown names,
    unknown styles and styles that do not fit the module's type raise ``UsageError``."""
    full = default_plan(model)
    modules = dict(model.named_modules())
    plan = dict(plan or {})
    for name, style in plan.items():
        if name not in modules:
            raise UsageError(f"plan: model has no module {name!r}; names are those of "
                             "model.named_modules()")
        if style not in STYLES:
            raise UsageError(f"plan[{name!r}]: style {style!r} is not one of {sorted(STYLES)}")
        if style == "replicate":  # the whole subtree, unless the plan names parts of it
            full = {n: s for n, s in full.items() if not n.startswith(f"{name}.") or n in plan}
        full[name] = style
    defaults = {n for n, s in full.items() if s == "sharded_dropout" and n not in plan}
    full = _with_sharded_dropouts(model, {n: s for n, s in full.items() if n not in defaults})
    planned = {}
    for name, style in full.items():
        kind, parallel = STYLES[style]
        if parallel is None:
            continue
        if not isinstance(modules[name], kind):
            raise UsageError(f"plan[{name!r}]: style {style!r} needs an nn.{kind.__name__}, "
                             f"got {type(modules[name]).__name__}")
        planned[name] = parallel
    ties = _ties(model, planned)
    for name, parallel in planned.items():
        _replace(model, name, parallel(modules[name], tp_comm))
    _retie(model, ties)
    _adapt_nmt_transformer(model, tp_comm)
    _keep_off_fused_inference(model)
    return model


def _ties(model: nn.Module, planned: Mapping[str, type[nn.Module]]) -> list[list[str]]:
    """Groups of names (``module.param``) under which one Parameter object that a planned
    layer splits is reachable -- ties such as ``head.weight = embed.weight``. A tie survives
    ``parallelize`` only if every name in it is split alike; otherwise ``UsageError``. Pure."""
    names: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{prefix}.{pname}" if prefix else pname)
    split: dict[str, Shard | None] = {}  # qualified name -> how its planned layer splits it
    for name, parallel in planned.items():
        module = model.get_submodule(name)
        for pname, _ in module.named_parameters():
            split[f"{name}.{pname}" if name else pname] = parallel.tp_shards.get(pname)
    groups = []
    for group in names.values():
        if len(group) < 2 or all(split.get(n) is None for n in group):
            continue  # not tied, or replicated everywhere (the Parameter object is kept)
        how = {n: split.get(n, "whole") for n in group}
        if len(set(how.values())) > 1 or any(n not in split for n in group):
            cut = next(n for n in group if how[n] not in ("whole", None))
            other = next(n for n in group if how[n] != how[cut])
            raise UsageError(f"plan: parameter {other!r} is tied to {cut!r} (the same "
                             f"Parameter), which the plan splits while {other!r} would keep it "
                             f"{'whole' if how[other] in ('whole', None) else 'split otherwise'}"
                             "; plan both modules alike (or 'replicate' both), or untie them")
        groups.append(group)
    return groups


def _retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Make every name of each tie point at one sharded Parameter again (the first name's),
    readable by each of the modules holding it, and give every shard its qualified name."""
    for group in ties:
        first = model.get_parameter(group[0])
        for name in group[1:]:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, attr, first)
            allow_reader(first, module)
    for name, p in model.named_parameters():
        if isinstance(p, ShardedParameter):
            p.tp_name = repr(name)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _adapt_nmt_transformer(model: nn.Module, comm: Communicator) -> None:
    """The hpcml NMT transformer projects onto its (now vocabulary-parallel) embedding with
    ``F.linear(h, embed.weight)``: make the decoder's output enter the parallel region, so that
    projection yields this rank's logit slice and the gradient of ``h`` is summed."""
    from hpcml.nmt.model import Transformer

    if isinstance(model, Transformer) and isinstance(model.embed, VocabParallelEmbedding):
        model.sparse = model.embed.sparse = False
        model.decoder.register_forward_hook(lambda _m, _i, out: copy_to(out, comm))
        allow_reader(model.embed.weight, model)


def _keep_off_fused_inference(model: nn.Module) -> None:
    """``nn.TransformerEncoderLayer`` has a fused inference path that reads ``linear1``/
    ``linear2`` weights directly; any forward hook on the layer disables it, so a layer holding a
    parallel module gets an identity pre-hook."""
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and any(
                hasattr(m, "tp_shards") for m in layer.modules()):
            layer.register_forward_pre_hook(lambda _m, _args: None)


def sharded_parameters(model: nn.Module) -> dict[str, Shard]:
    """Parameter name (as in ``model.state_dict()``) -> :class:`Shard` for every parameter a
    tensor-parallel layer of ``model`` splits; the others are replicated. Pure."""
    out = {}
    for prefix, module in model.named_modules():
        for pname, shard in getattr(module, "tp_shards", {}).items():
            name = f"{prefix}.{pname}" if prefix else pname
            try:
                model.get_parameter(name)
            except AttributeError:  # e.g. a bias=False layer
                continue
            out[name] = shard
    return out


def full_state_dict(model: nn.Module, tp_comm: Communicator) -> dict[str, torch.Tensor]:
    """The state dict the single-process model would have: every sharded parameter gathered
    over ``tp_comm``, replicated entries as they are, same names. Collective over ``tp_comm``;
    every rank gets the whole dict (save it from one rank). It loads with
    ``single_model.load_state_dict(sd)``, and into another tensor degree T' with
    :func:`load_full_state_dict`. For the optimizer state and for pipeline stages (which hold
    some parameters only) use :func:`hpcml.parallel.save_checkpoint`."""
    shards = sharded_parameters(model)
    state = model.state_dict()
    whole = full_tensors([(v, shards.get(k)) for k, v in state.items()], tp_comm)
    return dict(zip(state, whole, strict=True))


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor],
                         tp_comm: Communicator) -> None:
    """Load a full (single-process) state dict into a parallelized ``model``: each rank keeps
    its shard of every sharded entry. Not collective (slicing only)."""
    shards = sharded_parameters(model)
    local = {name: shards[name].local(value, tp_comm.size, tp_comm.rank) if name in shards
             else value for name, value in state.items()}
    model.load_state_dict(local)
