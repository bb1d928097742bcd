"""``parallelize(model, tp_comm, plan)``: turn a single-process model into its tensor-parallel
version in place, slicing every weight from the model's own (so the result computes what the
model computed), and the full-state checkpoint of such a model.

A plan maps module names (as in ``model.named_modules()``) to a style:

- ``"column"`` / ``"row"``: an ``nn.Linear`` becomes :class:`ColumnParallelLinear` (output
  features sharded) / :class:`RowParallelLinear` (expects sharded input, sums the outputs);
- ``"vocab"``: an ``nn.Embedding`` becomes :class:`VocabParallelEmbedding`;
- ``"heads"``: an ``nn.MultiheadAttention`` becomes :class:`HeadParallelAttention`;
- ``"replicate"``: left as it is (every rank holds and computes all of it).

The **default plan** (``plan=None``, or names a user plan leaves out) is derived from the module
tree: every ``nn.MultiheadAttention`` is ``"heads"``, every ``nn.Embedding`` ``"vocab"``, and
within each parent the ``nn.Linear`` children, taken in registration order, pair up as
``"column"`` then ``"row"`` (an odd last one is ``"replicate"``). That matches the feed-forward
blocks of ``nn.Transformer*Layer`` (``linear1`` -> activation -> ``linear2``) and MLPs written
as ``nn.Sequential(Linear, act, Linear, ...)``; a model whose paired Linears are not applied one
after the other with only elementwise operations between them needs a user plan. A user plan's
``"replicate"`` keeps the module's whole subtree replicated, except the parts the plan names.

For the hpcml NMT :class:`~hpcml.nmt.model.Transformer`, whose embedding is also its output
projection, ``forward`` then returns this rank's *vocabulary slice* of the logits; compute the
loss with :func:`~hpcml.parallel.tensor.loss.vocab_parallel_cross_entropy` (the model's
``vocab_start``/``vocab_size`` are ``model.embed.vocab_start`` and ``model.embed.num_embeddings``).
Its gradients become dense (a shard's projection gradient covers every row of the shard).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel.tensor.layers import (
    ColumnParallelLinear,
    HeadParallelAttention,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from hpcml.parallel.tensor.mappings import copy_to

STYLES = {"column": (nn.Linear, ColumnParallelLinear), "row": (nn.Linear, RowParallelLinear),
          "vocab": (nn.Embedding, VocabParallelEmbedding),
          "heads": (nn.MultiheadAttention, HeadParallelAttention), "replicate": (nn.Module, None)}


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
    return plan


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
    for name, style in full.items():
        kind, parallel = STYLES[style]
        if parallel is None:
            continue
        module = modules[name]
        if not isinstance(module, kind):
            raise UsageError(f"plan[{name!r}]: style {style!r} needs an nn.{kind.__name__}, "
                             f"got {type(module).__name__}")
        _replace(model, name, parallel(module, tp_comm))
    _adapt_nmt_transformer(model, tp_comm)
    _keep_off_fused_inference(model)
    return model


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


def _keep_off_fused_inference(model: nn.Module) -> None:
    """``nn.TransformerEncoderLayer`` has a fused inference path that reads ``linear1``/
    ``linear2`` weights directly; any forward hook on the layer disables it, so a layer holding a
    parallel module gets an identity pre-hook."""
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and any(
                hasattr(m, "tp_shards") for m in layer.modules()):
            layer.register_forward_pre_hook(lambda _m, _args: None)


def sharded_parameters(model: nn.Module) -> dict[str, Any]:
    """Full parameter name -> Shard for every sharded parameter of ``model`` (every name of a
    parameter registered under several). Pure."""
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
    ``single_model.load_state_dict(sd)``, and into another tensor degree T' by loading it into
    a fresh single-process model and calling :func:`parallelize` with T' ranks."""
    shards = sharded_parameters(model)
    return {name: shards[name].full(value, tp_comm) if name in shards else value.detach().clone()
            for name, value in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor],
                         tp_comm: Communicator) -> None:
    """Load a full (single-process) state dict into a parallelized ``model``: each rank keeps
    its shard of every sharded entry. Not collective (slicing only)."""
    shards = sharded_parameters(model)
    local = {name: shards[name].local(value, tp_comm.size, tp_comm.rank) if name in shards
             else value for name, value in state.items()}
    model.load_state_dict(local)
