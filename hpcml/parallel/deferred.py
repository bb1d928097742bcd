"""Deferred initialization: build a model without memory, split it, and let every rank
materialize only what it holds.

``model = deferred_init(lambda: Transformer(...), seed=0)`` runs the constructor with every
``nn.Parameter`` on the ``meta`` device (no storage; buffers are computed as usual, so they must
be small) and *records* how the constructor initializes each parameter: every in-place operation
on it or on a view of it (``torch.nn.init.*``, ``reset_parameters``, ``weight[pad].fill_(0)``,
in the order they ran). The model is then split as usual -- ``parallelize(model, mesh.tensor)``
and ``PipelineModel(model, mesh, ...)`` work on it unchanged (the pipeline traces it on the meta
device) -- and :func:`materialize` (called by ``PipelineModel``) gives each rank real storage for
the parameters its stage holds only, cut to its tensor shard.

**Initialization rule** (the same in every layout and in one process): parameter ``name`` (its
first qualified name in the constructed model) is a fresh tensor of its full shape on which the
recorded operations are replayed, every random one (``uniform_``, ``normal_``, ...) drawing from
its own ``torch.Generator`` seeded by ``(seed, name)`` (:func:`param_seed`); a tensor-parallel
rank then keeps its slice. So the materialized shards of any layout are, bit for bit, the slices
of the one-process model ``materialize(deferred_init(f, seed))``. The values differ from an
eager ``f()`` (which draws from the global generator in construction order), and layers that
``nn.TransformerEncoder`` deep-copies get independent draws. A rank holds at most one whole
parameter at a time beside its own parameters.

Refused, with one line naming the module or parameter and the fix (``UsageError``): a
constructor that reads parameter values (``.item()``, ``bool()`` on them); a parameter the
constructor gives no recorded in-place initialization (e.g. ``nn.Parameter(torch.zeros(n))``
followed by nothing, or initialized before it was assigned to the module); one written from a
computed tensor (``copy_`` of a QR factor, ``torch.eye(out=...)``) or from another parameter;
one tied by sharing storage (``.data = other.data``) rather than by being the same Parameter;
a buffer computed from a parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import sys
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from hpcml.errors import UsageError

RANDOM = frozenset({"uniform_", "normal_", "bernoulli_", "random_", "exponential_",
                    "geometric_", "log_normal_", "cauchy_"})
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                              "__set__"})
ATTRIBUTE = "_hpcml_deferred"


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s generator: the first 63 bits of
    SHA-256(``f"{seed}:{name}"``). Pure."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


@functools.cache
def _draws(func: Callable) -> bool:
    """Whether ``func`` is a random in-place operation taking ``generator=`` (a tensor method
    of :data:`RANDOM` or a ``torch.nn.init`` function with that argument)."""
    if getattr(func, "__name__", "") in RANDOM:
        return True
    try:
        return "generator" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A recorded tensor argument: the root parameter (0) or one of its recorded views."""

    index: int


@dataclasses.dataclass
class Program:
    """How one parameter was initialized: its shape and dtype, and the in-place operations and
    views the constructor applied to it, in order (``ops``: (kind, func, args, kwargs) with
    recorded tensors as :class:`_Ref`). ``problem``: why it cannot be replayed, if so."""

    shape: torch.Size
    dtype: torch.dtype
    ops: list[tuple[str, Callable, Any, Any, int | None]] = dataclasses.field(
        default_factory=list)
    views: int = 1
    problem: str | None = None

    def replay(self, generator: torch.Generator) -> torch.Tensor:
        """The parameter's full value: the operations run on a new tensor, random ones drawing
        from ``generator``. Pure apart from ``generator``."""
        root = torch.empty(self.shape, dtype=self.dtype)
        views = [root]
        with torch.no_grad():
            for kind, func, args, kwargs, item in self.ops:
                a, kw = tree_map(lambda x: views[x.index] if isinstance(x, _Ref) else x,
                                 (args, kwargs))
                if _draws(func):
                    kw = {**kw, "generator": generator}
                out = func(*a, **kw)
                if kind == "view":
                    views.append(out if item is None else out[item])
        return root


class _Recorder(TorchFunctionMode):
    """Records in-place operations and views on the parameters being constructed."""

    def __init__(self) -> None:
        super().__init__()
        self.programs: dict[int, Program] = {}     # id(root parameter) -> its program
        self.where: dict[int, tuple[int, int]] = {}  # id(tensor) -> (root id, view index)
        self.keep: list[torch.Tensor] = []         # ids stay unique while recorded

    def track(self, p: torch.Tensor, program: Program) -> None:
        self.programs[id(p)] = program
        self.where[id(p)] = (id(p), 0)
        self.keep.append(p)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        roots = {self.where[id(t)][0] for t in leaves if id(t) in self.where}
        if not roots:
            return out
        target = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        target = target if isinstance(target, torch.Tensor) else None
        inplace = (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS
        if "out" in kwargs:
            target, inplace = kwargs["out"], True
        if inplace and target is not None and id(target) in self.where:
            root = self.where[id(target)][0]
            program = self.programs[root]
            if name == "__set__":
                program.problem = "is tied to another tensor by sharing storage (.data = ...)"
            elif len(roots) > 1:
                program.problem = f"is written from another parameter ({name})"
            elif "out" in kwargs or any(t.is_meta and id(t) not in self.where for t in leaves):
                program.problem = f"is written from a tensor computed in the constructor ({name})"
            else:
                program.ops.append(("op", func, *self._refs(args, kwargs), None))
            return out
        if len(roots) == 1 and target is not None and id(target) in self.where:
            root = self.where[id(target)][0]
            if name == "__get__" and isinstance(out, torch.Tensor) and not out._is_view() \
                    and out.is_meta and out.shape == target.shape:  # .data: an alias
                self.where[id(out)] = self.where[id(target)]
                self.keep.append(out)
                return out
            outs = out if isinstance(out, (tuple, list)) else [out]
            for i, o in enumerate(outs):
                if isinstance(o, torch.Tensor) and o.is_meta and o._is_view():
                    program = self.programs[root]
                    program.ops.append(("view", func, *self._refs(args, kwargs),
                                        i if isinstance(out, (tuple, list)) else None))
                    self.where[id(o)] = (root, program.views)
                    program.views += 1
                    self.keep.append(o)
        return out

    def _refs(self, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        return tree_map(lambda x: _Ref(self.where[id(x)][1])
                        if isinstance(x, torch.Tensor) and id(x) in self.where else x,
                        (args, kwargs))


@contextlib.contextmanager
def _recording() -> Iterator[_Recorder]:
    """Parameters assigned to modules become meta (recorded); deep copies of them (layer
    clones) get a copy of the original's program."""
    recorder = _Recorder()
    register, deepcopy = nn.Module.register_parameter, nn.Parameter.__deepcopy__

    def register_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and type(param) is nn.Parameter and not param.is_meta:
            meta = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
            recorder.track(meta, Program(param.shape, param.dtype))
            param = meta
        register(module, name, param)

    def deepcopy_meta(param: nn.Parameter, memo: dict) -> nn.Parameter:
        out = deepcopy(param, memo)
        if id(param) in recorder.programs:
            program = recorder.programs[id(param)]
            recorder.track(out, dataclasses.replace(program, ops=list(program.ops)))
        return out

    nn.Module.register_parameter = register_meta
    nn.Parameter.__deepcopy__ = deepcopy_meta
    try:
        with recorder:
            yield recorder
    finally:
        nn.Module.register_parameter = register
        nn.Parameter.__deepcopy__ = deepcopy


@dataclasses.dataclass
class Deferred:
    """What :func:`materialize` needs, kept on the model: the seed and each parameter name's
    program (every name of a tied parameter maps to the program of its first name)."""

    seed: int
    programs: dict[str, tuple[str, Program]]


def _constructing_module() -> str:
    """The class of the innermost module whose ``__init__`` raised (from the traceback)."""
    tb, found = sys.exc_info()[2], "the model"
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"),
                                                             nn.Module):
            found = type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return found


def deferred_init(constructor: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Run ``constructor()`` with every parameter on the meta device (see the module
    docstring) and return the model, ready to be split and :func:`materialize` d with the
    initialization rule for ``seed``. Not collective; every rank calls it alike.
    ``UsageError`` (one line naming the module or parameter and the fix) for a constructor
    whose initialization cannot be replayed."""
    try:
        with _recording() as recorder:
            model = constructor()
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" not in str(exc):
            raise
        raise UsageError(f"deferred_init: {_constructing_module()}.__init__ reads parameter "
                         "values, which do not exist on the meta device; compute them after "
                         "materialize() (or in a reset_parameters() without reads), or build "
                         "that module outside deferred_init") from None
    programs: dict[str, tuple[str, Program]] = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0] or "<root>"
        kind = type(model.get_submodule(name.rpartition(".")[0])).__name__
        program = recorder.programs.get(id(p))
        if program is None or not program.ops:
            raise UsageError(f"deferred_init: parameter {name!r} of {owner} ({kind}) gets no "
                             "in-place initialization after it is assigned to the module, so "
                             "its value cannot be recomputed; initialize it with torch.nn.init "
                             "after assigning it (e.g. in reset_parameters())")
        if program.problem is not None:
            raise UsageError(f"deferred_init: parameter {name!r} of {owner} ({kind}) "
                             f"{program.problem}, which cannot be replayed on one slice; tie "
                             "parameters by assignment (head.weight = embed.weight) and "
                             "initialize with in-place torch.nn.init calls")
        first.setdefault(id(p), name)
        programs[name] = (first[id(p)], program)
    for name, b in model.named_buffers():
        if b.is_meta:
            raise UsageError(f"deferred_init: buffer {name!r} is computed from a parameter in "
                             "the constructor, which has no value on the meta device; compute "
                             "it in forward or after materialize()")
    setattr(model, ATTRIBUTE, Deferred(seed, programs))
    return model


def is_deferred(module: nn.Module) -> bool:
    """Whether ``module`` came from :func:`deferred_init` and still has meta parameters."""
    return hasattr(module, ATTRIBUTE) and any(p.is_meta for p in module.parameters())


def full_value(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name``'s whole initial value by the rule (module docstring). Pure."""
    deferred: Deferred = getattr(module, ATTRIBUTE)
    if name not in deferred.programs:
        raise UsageError(f"materialize: parameter {name!r} was not made by the deferred "
                         "constructor; add it inside the constructor function")
    canonical, program = deferred.programs[name]
    return program.replay(torch.Generator().manual_seed(param_seed(deferred.seed, canonical)))


def materialize(module: nn.Module, keep: Collection[str] | None = None) -> None:
    """Give every parameter of ``module`` still on the meta device real storage: its initial
    value by the rule (the whole value, or a ``ShardedParameter``'s ``shard.local`` of it) if
    its name is in ``keep`` (default: every parameter), else an empty tensor (a pipeline
    stage's parameters that other stages hold). Each meta Parameter object is replaced, under
    every name that reaches it (ties stay ties), by a new one of the same type and attributes,
    so build optimizers afterwards. Values are CPU tensors. Not collective: every rank
    computes its own part, equal to the one-process model's."""
    from hpcml.parallel.tensor.guard import ShardedParameter

    new: dict[int, nn.Parameter] = {}
    for name, p in module.named_parameters():
        if not p.is_meta:
            continue
        if keep is None or name in keep:
            value = full_value(module, name)
            if isinstance(p, ShardedParameter):
                value = p.shard.local(value, p.comm.size, p.comm.rank)
            if value.shape != p.shape:
                raise UsageError(f"materialize: parameter {name!r} has shape {list(p.shape)} "
                                 f"here but {list(value.shape)} by the rule; split it with "
                                 "hpcml's parallelize only")
        else:
            value = torch.empty(0, dtype=p.dtype)
        new[id(p)] = type(p)(value, requires_grad=p.requires_grad)
        new[id(p)].__dict__.update(p.__dict__)
    for owner in module.modules():
        for attr, p in owner._parameters.items():
            if p is not None and id(p) in new:
                owner._parameters[attr] = new[id(p)]


class meta_tracing(TorchFunctionMode):
    """Context for running a forward whose parameters are on the meta device with real inputs:
    every operation that has a meta tensor argument gets its other tensors moved to meta
    (metadata only; no values are computed)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in leaves) and not all(t.is_meta for t in leaves):
            args, kwargs = tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor)
                                    and not x.is_meta and x.dim() > 0 else x, (args, kwargs))
        return func(*args, **kwargs)
