"""Tracing an arbitrary ``nn.Module`` once on a sample batch, for pipeline partitioning.

Eager forward passes on the sample, in one process, no MPI:

1. *Structure*: forward pre-hooks record which modules run; :func:`choose_units` then picks the
   units (the partition's atoms).
2. *Recording*: every unit's ``forward`` is wrapped to record each call in call order: its
   output structure (pytree spec, dtype and rank of each tensor), activation bytes (tensors
   autograd saves for backward, counted by ``saved_tensors_hooks``, plus the outputs;
   parameters excluded) -- and, through a ``TorchFunctionMode`` that tags every tensor
   produced outside the units with the unit outputs and parameters it was computed from,
   which earlier unit outputs and which parameters each call and the model's output depend
   on. Parameters a unit reads that belong to another module (tied weights) are recorded too.
3. *Timing*: ``repeats`` more forwards time each call without the tagging overhead; the
   fastest repeat counts, and alike calls (same module class, parameters, activation bytes)
   get their median, so that a preempted repeat on a shared machine does not skew balance.

Eager tracing (not ``torch.fx``) is what lets *any* Python forward through: masks built with
``torch.triu(torch.ones(t, t))``, ``if mask is not None``, data-dependent slicing, a module
called twice, ``torch.nn.Transformer*`` with their checks -- ``fx.symbolic_trace`` stops at
each of these. The price is that the call *sequence* must not depend on the data; the pipeline
checks it on every call and stops with a clear error when it does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import TreeSpec, tree_flatten

from hpcml.parallel.pipeline_partition import Node, choose_units

Dep = tuple[int, int]  # (call index, tensor leaf index) of a unit call's output


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor of a unit call's output: dtype, number of dimensions, needs grad."""

    dtype: torch.dtype
    ndim: int
    requires_grad: bool


@dataclasses.dataclass
class Call:
    """One call of a unit, in call order. ``leaves`` holds a :class:`Leaf` per output tensor
    and the value itself for non-tensor outputs (which must not vary between batches)."""

    unit: str
    spec: TreeSpec
    leaves: list[Any]
    deps: frozenset[Dep]
    params: frozenset[str]
    seconds: float
    activation_bytes: int
    param_count: int


@dataclasses.dataclass
class Trace:
    """What the pipeline needs to know about the model: units, calls in order, what the model
    output depends on, each unit's parameter names, and the parameters that code between
    units reads directly, with the number of unit calls before the first such read."""

    units: list[str]
    calls: list[Call]
    output_deps: frozenset[Dep]
    output_params: frozenset[str]
    unit_params: dict[str, list[str]]
    tree: dict[str, Node]
    glue_params: dict[str, int]

    def structure(self) -> str:
        """A digest of everything the partition and the plan use besides the measured costs:
        the units called in order, each call's output structure and dependencies, the
        parameters read where. Ranks that traced the same model alike get the same digest
        (tensor-parallel ranks too: shards differ in shape, not in structure)."""
        def leaf(x: Any) -> Any:
            if isinstance(x, Leaf):
                return str(x.dtype), x.ndim, x.requires_grad
            plain = x is None or isinstance(x, (bool, int, float, str))
            return repr(x) if plain else type(x).__name__  # no addresses in the digest

        calls = [(c.unit, str(c.spec), [leaf(x) for x in c.leaves], sorted(c.deps),
                  sorted(c.params)) for c in self.calls]
        text = repr((self.units, calls, sorted(self.output_deps), sorted(self.output_params),
                     sorted(self.glue_params.items())))
        return hashlib.sha256(text.encode()).hexdigest()


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of lists, tuples and dicts."""
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]


def param_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name``, the first name of a parameter reachable by several."""
    return {id(p): name for name, p in model.named_parameters()}


def module_tree(model: nn.Module, called: set[str]) -> dict[str, Node]:
    """The module tree as :class:`Node` s (parameters counted once, even when shared)."""
    tree = {}
    for name, mod in model.named_modules():
        children = tuple(f"{name}.{c}" if name else c for c, _ in mod.named_children())
        tree[name] = Node(name, children,
                          sum(p.numel() for p in mod.parameters(recurse=False)),
                          sum(p.numel() for p in mod.parameters()), name in called)
    names = set(tree)
    return {n: dataclasses.replace(v, children=tuple(c for c in v.children if c in names))
            for n, v in tree.items()}


def called_modules(model: nn.Module, args: tuple, kwargs: dict) -> set[str]:
    """Names of the modules whose forward runs on ``model(*args, **kwargs)``."""
    called: set[str] = set()
    handles = [mod.register_forward_pre_hook(lambda *_, n=name: called.add(n))
               for name, mod in model.named_modules()]
    try:
        with torch.enable_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return called


class ActivationCounter:
    """Context: bytes of the distinct storages autograd saves for backward inside it,
    parameters (``param_storages``: their storage addresses) excluded."""

    def __init__(self, param_storages: set[int]) -> None:
        self.param_storages = param_storages
        self.seen: set[int] = set()
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.count, lambda t: t)

    def count(self, t: torch.Tensor) -> torch.Tensor:
        """Count ``t``'s storage (once, unless it is a parameter's) and return ``t``; the
        saved-tensors hook, and usable for tensors kept alive otherwise."""
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t  # a parameter (or a view of one) whose storage moved: ZeRO-3 gathers anew
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.seen and ptr not in self.param_storages:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> ActivationCounter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def param_storages(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


class _Tagger(TorchFunctionMode):
    """Tags tensors made outside units with the unit outputs / parameters they come from;
    inside a unit, notes parameters of other modules that the unit reads."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.tags: dict[int, frozenset[tuple]] = {}
        self.keep: list[torch.Tensor] = []  # ids stay unique while tags refer to them
        self.inside: set[int] | None = None
        self.foreign: set[str] = set()
        self.calls = 0  # unit calls so far: where the code between units runs
        self.glue: dict[str, int] = {}

    def tag_of(self, t: torch.Tensor) -> frozenset[tuple]:
        if isinstance(t, nn.Parameter) and id(t) in self.names:
            return frozenset({("p", self.names[id(t)])})
        return self.tags.get(id(t), frozenset())

    def union(self, obj: Any) -> frozenset[tuple]:
        return frozenset().union(*(self.tag_of(t) for t in tensors(obj)))

    def set_tag(self, t: torch.Tensor, tag: frozenset[tuple]) -> None:
        self.tags[id(t)] = tag
        self.keep.append(t)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside is not None:
            for t in tensors((args, kwargs)):
                if isinstance(t, nn.Parameter) and id(t) in self.names and id(t) not in \
                        self.inside:
                    self.foreign.add(self.names[id(t)])
            return out
        for t in tensors((args, kwargs)):
            if isinstance(t, nn.Parameter) and id(t) in self.names:
                self.glue.setdefault(self.names[id(t)], self.calls)
        tag = self.union((args, kwargs))
        for t in tensors(out):
            self.set_tag(t, tag)
        return out


@contextmanager
def _patched(modules: dict[str, nn.Module],
             make: Callable[[str, Callable], Callable]) -> Iterator[None]:
    """Replace each module's ``forward`` by ``make(name, original)`` for the duration."""
    for name, mod in modules.items():
        mod.forward = make(name, type(mod).forward.__get__(mod))
    try:
        yield
    finally:
        for mod in modules.values():
            del mod.forward


def _smooth_times(calls: list[Call], modules: dict[str, nn.Module]) -> None:
    """Give calls of alike modules (same class, parameter count, output shapes and activation
    bytes) their median time: identical layers then cost the same even when another process
    preempted one of them during every repeat."""
    groups: dict[tuple, list[Call]] = {}
    for call in calls:
        mod = modules[call.unit]
        key = (type(mod).__name__, sum(p.numel() for p in mod.parameters()),
               call.activation_bytes, tuple(leaf.ndim for leaf in call.leaves
                                            if isinstance(leaf, Leaf)))
        groups.setdefault(key, []).append(call)
    for group in groups.values():
        seconds = statistics.median(c.seconds for c in group)
        for call in group:
            call.seconds = seconds


def trace(model: nn.Module, args: tuple, kwargs: dict, stages: int,
          units_per_stage: int = 2, units: list[str] | None = None, repeats: int = 3) -> Trace:
    """Trace ``model(*args, **kwargs)`` (see the module docstring): one forward to find the
    called modules, one to record calls and dependencies, ``repeats`` to time the units (the
    fastest of them counts). ``units`` overrides the automatic choice."""
    tree = module_tree(model, called_modules(model, args, kwargs))
    modules = dict(model.named_modules())
    if units is None:
        units = choose_units(tree, stages, units_per_stage)
    unknown = [u for u in units if u not in modules]
    if unknown:
        raise ValueError(f"units {unknown} are not modules of the model")
    names = param_names(model)
    unit_params = {u: [names[id(p)] for p in modules[u].parameters()] for u in units}
    unit_ids = {u: {id(p) for p in modules[u].parameters()} for u in units}
    unit_counts = {u: sum(p.numel() for p in modules[u].parameters()) for u in units}
    storages = param_storages(model)
    tagger = _Tagger(names)
    calls: list[Call] = []
    seen_units: set[str] = set()

    def record(name: str, original: Callable) -> Callable:
        def traced(*a: Any, **kw: Any) -> Any:
            if tagger.inside is not None:
                return original(*a, **kw)
            tags = tagger.union((a, kw))
            tagger.inside, tagger.foreign = unit_ids[name], set()
            try:
                with ActivationCounter(storages) as counter:
                    out = original(*a, **kw)
            finally:
                tagger.inside = None
            leaves, spec = tree_flatten(out)
            k, metas, out_bytes = len(calls), [], 0
            for j, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    tagger.set_tag(leaf, frozenset({("c", k, j)}))
                    metas.append(Leaf(leaf.dtype, leaf.dim(), leaf.requires_grad))
                    out_bytes += leaf.numel() * leaf.element_size()
                else:
                    metas.append(leaf)
            first = name not in seen_units
            seen_units.add(name)
            tagger.calls += 1
            calls.append(Call(
                name, spec, metas, frozenset((t[1], t[2]) for t in tags if t[0] == "c"),
                frozenset(t[1] for t in tags if t[0] == "p") | frozenset(tagger.foreign),
                math.inf, counter.bytes + out_bytes,
                unit_counts[name] if first else 0))
            return out
        return traced

    unit_modules = {u: modules[u] for u in units}
    with _patched(unit_modules, record), torch.enable_grad(), tagger:
        out = model(*args, **kwargs)
        final = tagger.union(out)
    del out
    position = [0]

    def timed(name: str, original: Callable) -> Callable:
        def run(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            out = original(*a, **kw)
            call = calls[position[0] % len(calls)]
            call.seconds = min(call.seconds, time.perf_counter() - start)
            position[0] += 1
            return out
        return run

    with _patched(unit_modules, timed), torch.enable_grad():
        for _ in range(repeats):
            model(*args, **kwargs)
    _smooth_times(calls, modules)
    return Trace(units, calls, frozenset((t[1], t[2]) for t in final if t[0] == "c"),
                 frozenset(t[1] for t in final if t[0] == "p"), unit_params, tree,
                 dict(tagger.glue))
