"""The moving parts of ZeRO stages 2 and 3 (:class:`~hpcml.parallel.ShardedOptimizer`):

- :class:`Unit`: a group of parameters laid out in one flat buffer padded to a multiple of D,
  rank r owning chunk r. It is a :class:`~hpcml.parallel.buckets.Bucket` (its gradient buffer,
  allocated while the unit's gradients are reduced), with the parameter buffer beside it.
- :class:`ShardReducer`: the data-parallel :class:`~hpcml.parallel.GradientReducer` with the
  units as its buckets, each reduced by a non-blocking ``Ireduce_scatter`` into this rank's
  gradient shard as soon as backward has produced all its gradients; every ``param.grad`` is
  freed once copied into its bucket, every bucket once reduced.
- :class:`ParameterGather` (stage 3): forward pre-hooks gather a unit's parameters
  (``Iallgather`` of the chunks into the unit's buffer, whose storage is otherwise freed) and
  start gathering the unit that ran next in the previous forward (prefetch); forward hooks free
  them and hook the unit's outputs so that their gradient gathers the unit again (and prefetches
  the unit before it) for the backward; once backward has accumulated the gradient of every
  parameter of the unit, it is freed again. Freeing resizes the buffer's storage to zero bytes
  and gathering resizes it back, so views saved by autograd in the forward see the gathered
  values again in the backward. A unit called several times per forward is gathered on each
  call. Every rank runs the same hooks in the same order, so the collectives match.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from hpcml.comm import Communicator, Request
from hpcml.errors import UsageError
from hpcml.parallel.buckets import Bucket
from hpcml.parallel.data_parallel import GradientReducer
from hpcml.parallel.reductions import make_reduction

if TYPE_CHECKING:
    from hpcml.parallel.sharding import ShardedOptimizer


@dataclasses.dataclass(eq=False)
class Unit(Bucket):
    """Parameters in one flat buffer of ``chunk x D`` elements (``numel`` used, the rest
    zero padding); ``lo``: where this rank's chunk sits in the shard vectors."""

    __eq__ = object.__eq__  # units are compared (and hashed) by identity
    __hash__ = object.__hash__

    name: str | None = None
    numel: int = 0
    chunk: int = 0
    lo: int = 0
    deferred: bool = False
    flat: torch.Tensor | None = None
    shard: torch.Tensor | None = None  # this rank's chunk of the parameters
    gathered: bool = True
    gather_request: Request | None = None
    pending: set[int] = dataclasses.field(default_factory=set)

    @classmethod
    def lay_out(cls, params: list[nn.Parameter], name: str | None, d: int,
                dtype: torch.dtype, device: torch.device, deferred: bool = False) -> Unit:
        """The unit of ``params``: their values copied into a new flat buffer, each
        ``param.data`` a view of it. Not collective."""
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        chunk = max(1, math.ceil(n / d))
        flat = torch.zeros(chunk * d, dtype=dtype, device=device)
        with torch.no_grad():
            for p, off in zip(params, offsets, strict=True):
                flat[off:off + p.numel()].copy_(p.reshape(-1))
                p.data = flat[off:off + p.numel()].view_as(p)
        return cls(list(params), offsets, torch.zeros(0, dtype=dtype, device=device), name=name,
                   numel=n, chunk=chunk, deferred=deferred, flat=flat)

    def owned(self, off: int, n: int, rank: int) -> tuple[int, int]:
        """The part ``[a, b)`` of unit positions ``[off, off + n)`` in ``rank``'s chunk."""
        lo = rank * self.chunk
        return max(off, lo), min(off + n, lo + self.chunk)

    def bind(self, rank: int, param_shard: torch.Tensor | None) -> None:
        """Make ``shard`` this rank's chunk: a view of the flat buffer, or (stage 3) of
        ``param_shard``, filled from it."""
        mine = self.flat[rank * self.chunk:(rank + 1) * self.chunk]
        if param_shard is None:
            self.shard = mine
        else:
            self.shard = param_shard[self.lo:self.lo + self.chunk]
            self.shard.copy_(mine)

    def start_gather(self, comm: Communicator) -> Request | None:
        """Start gathering every rank's chunk into the flat buffer (allocating it); None when
        done at once (one rank). Collective over ``comm``."""
        storage = self.flat.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.flat.numel() * self.flat.element_size())
        self.gathered = True
        if comm.size == 1:
            if self.flat.data_ptr() != self.shard.data_ptr():
                self.flat.copy_(self.shard)
            return None
        self.gather_request = comm.Iallgather(self.shard.clone(), self.flat)
        return self.gather_request

    def wait_gather(self) -> None:
        if self.gather_request is not None:
            self.gather_request.wait()
            self.gather_request = None

    def release(self) -> None:
        """Free the parameter buffer (its storage shrinks to zero bytes). Not collective."""
        self.wait_gather()
        self.flat.untyped_storage().resize_(0)
        self.gathered = False


def module_units(module: nn.Module, params: list[nn.Parameter], units: Iterable[str] | None,
                 ) -> tuple[list[list[nn.Parameter]], list[str | None]]:
    """Stage 3's units: for each module named in ``units`` (default: the top-level children of
    ``module`` holding any of ``params``), its parameters among ``params``; then the others, in
    a unit without module (name None), which stays gathered. Returned in backward order
    (reverse of ``units``), the rest last. ``UsageError`` for an unknown name, nested units or
    a parameter in two units."""
    held = {id(p) for p in params}
    if units is None:
        units = [n for n, c in module.named_children()
                 if any(id(p) in held for p in c.parameters())]
    units = list(dict.fromkeys(units))
    modules = dict(module.named_modules())
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    for u in units:
        if u not in modules:
            raise UsageError(f"ZeRO-3 units: {module.__class__.__name__} has no module {u!r}; "
                             f"name submodules such as {list(modules)[1:6]}")
        inner = next((v for v in units if v != u and u.startswith(v + ".")), None)
        if inner is not None:
            raise UsageError(f"ZeRO-3 units: {u!r} lies inside the unit {inner!r}; name one "
                             "of them")
    owner: dict[int, str] = {}
    members: list[list[nn.Parameter]] = []
    unit_names: list[str | None] = []
    for u in units:
        mine = []
        for name, p in modules[u].named_parameters(remove_duplicate=False):
            if id(p) not in held:
                continue
            if id(p) in owner and owner[id(p)] != u:
                raise UsageError(f"ZeRO-3: parameter {names.get(id(p), name)!r} is used by the "
                                 f"units {owner[id(p)]!r} and {u!r}, and each unit frees its "
                                 "parameters after use; make them one unit (name their common "
                                 "parent in units=) or leave one of them out of units")
            if id(p) not in owner:
                owner[id(p)] = u
                mine.append(p)
        if mine:
            members.append(mine)
            unit_names.append(u)
    members.reverse()
    unit_names.reverse()
    rest = [p for p in params if id(p) not in owner]
    if rest:
        members.append(rest)
        unit_names.append(None)
    return members, unit_names


def pipeline_units(pipeline: Any, units: Iterable[str] | None) -> list[str]:
    """Stage 3's units under pipeline parallelism: ``units``, or the pipeline's own units
    except those holding a parameter shared between stages (read on several stages, it stays
    gathered). ``UsageError`` for a unit whose calls run on more than one stage (its forward
    would stop at the stage boundary, before the hook that prepares its backward)."""
    calls = pipeline.trace.calls
    if units is None:
        shared = set(pipeline.plan.shared)
        units = [u for u in pipeline.trace.units
                 if not any(n == u or n.startswith(u + ".") for n in shared)]
    units = list(units)
    for u in units:
        stages = sorted({pipeline.plan.stage_of[k] for k, c in enumerate(calls)
                         if c.unit == u or c.unit.startswith(u + ".")
                         or u.startswith(c.unit + ".")})
        if len(stages) > 1:
            raise UsageError(f"ZeRO-3 unit {u!r} runs on pipeline stages {stages}; name units "
                             "that lie within one stage (e.g. the pipeline's units, the default)")
    return units


IN_FLIGHT = 2  # reduce-scatters of ZeRO-2/3 buckets outstanding at once (bounds the buffers)


class ShardReducer(GradientReducer):
    """The gradient reducer with the optimizer's units as buckets, reduce-scattered into its
    ``grad_shard`` (see module docstring). ``memory``: bytes of the buckets and of the full
    ``.grad`` s held until their last backward pass (with ``passes`` > 1, e.g. pipeline
    microbatches, they accumulate there until the last one). ``deferred``: ids of parameters
    reduced only at :meth:`synchronize` (a pipeline sums them over the stages first).
    ``has_grad`` after :meth:`synchronize`: parameter id -> whether some rank had a gradient
    for it."""

    def __init__(self, opt: ShardedOptimizer, passes: int, deferred: set[int],
                 names: dict[int, str]) -> None:
        params = [(names.get(id(p), f"params[{i}]"), p)
                  for i, p in enumerate(p for u in opt.units for p in u.params)]
        self.opt = opt
        self._seen: set[int] = set()
        self._held: set[int] = set()  # parameters whose full .grad is counted in memory
        self.has_grad: dict[int, bool] = {}
        super().__init__(opt.comm, params, make_reduction("dense_allreduce"), passes=passes,
                         average=opt.average, buckets=list(opt.units))
        for i in deferred:
            self._slot.pop(i, None)  # filled from .grad at synchronize, not by the hook

    def _fill(self, bucket: Bucket, j: int, grad: torch.Tensor | None) -> None:
        unit: Unit = bucket  # type: ignore[assignment]
        if unit.buffer.numel() == 0:
            unit.buffer = torch.zeros(unit.chunk * self.comm.size, dtype=unit.flat.dtype,
                                      device=unit.flat.device)
            self.memory.alloc(unit.buffer.nbytes)
        super()._fill(bucket, j, grad)
        p = bucket.params[j]
        if grad is not None:
            self._seen.add(id(p))
            p.grad = None
            if id(p) in self._held:
                self._held.discard(id(p))
                self.memory.free(grad.nbytes)

    def _on_grad(self, p: torch.Tensor) -> None:
        """Count the ``.grad`` backward made (until it is copied into its bucket, after the
        last of the ``passes``) in :attr:`memory`, then as :class:`GradientReducer`."""
        if not self._skip and id(p) not in self._held and p.grad is not None:
            self._held.add(id(p))
            self.memory.alloc(p.grad.nbytes)
        super()._on_grad(p)

    def _fill_scale(self, bucket: Bucket) -> float:
        """1: a shard is divided after its reduce-scatter (:meth:`_deliver`, 1/P of the
        bucket), so the full bucket is written as is."""
        return 1.0

    def _post(self, bucket: Bucket) -> Request:
        """Start the bucket's reduce-scatter, after finishing (and freeing) the buckets
        posted more than ``IN_FLIGHT`` before it."""
        k = self.buckets.index(bucket)
        for old in self.buckets[:max(0, k - IN_FLIGHT + 1)]:
            if old.request is not None:
                old.request.wait()
                self._deliver(old)
        unit: Unit = bucket  # type: ignore[assignment]
        return self.comm.Ireduce_scatter(unit.buffer,
                                         self.opt.grad_shard[unit.lo:unit.lo + unit.chunk])

    def _deliver(self, bucket: Bucket) -> None:
        unit: Unit = bucket  # type: ignore[assignment]
        if unit.buffer.numel() == 0:
            return  # delivered early by _post
        if self.average and not self._predivide(bucket) and self.comm.size > 1:
            self.opt.grad_shard[unit.lo:unit.lo + unit.chunk].div_(self.comm.size)
        self.memory.free(unit.buffer.nbytes)
        unit.buffer = unit.buffer[:0].clone()

    def _used(self, p: torch.Tensor) -> bool:
        return id(p) in self._seen or p.grad is not None

    def _unused(self, p: torch.Tensor) -> None:
        self.has_grad[id(p)] = False
        p.grad = None

    def synchronize(self) -> None:
        """Finish every unit's reduce-scatter (see :meth:`GradientReducer.synchronize`); the
        averaged gradient of this rank's chunks is in ``grad_shard``. Collective."""
        self.has_grad = {id(p): True for _, p in self.params}
        super().synchronize()
        self._seen.clear()


class ParameterGather:
    """Stage 3's hooks on the modules of ``opt``'s units (see module docstring). Not
    collective itself; the hooks are, over ``opt.comm``."""

    def __init__(self, opt: ShardedOptimizer, module: nn.Module) -> None:
        self.comm = opt.comm
        self.units_all = opt.units
        self.units = [u for u in opt.units if u.name is not None]
        self.order: list[Unit] = []  # units in the order the forward called them
        self.current = self.peak_bytes = 0
        modules = dict(module.named_modules())
        for u in opt.units:
            u.pending = {id(p) for p in u.params if p.requires_grad}
        for u in self.units:
            self._account(u, -1)
            u.flat.untyped_storage().resize_(0)
            u.gathered = False
            mod = modules[u.name]
            mod.register_forward_pre_hook(lambda _m, _a, u=u: self._before_forward(u))
            mod.register_forward_hook(lambda _m, _a, out, u=u: self._after_forward(u, out))
            for p in u.params:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(
                        lambda p, u=u: self._accumulated(u, p))
        self.current = sum(u.flat.numel() * u.flat.element_size() for u in opt.units
                           if u.name is None)
        self.peak_bytes = self.current

    def _account(self, u: Unit, sign: int) -> None:
        self.current += sign * u.flat.numel() * u.flat.element_size()
        self.peak_bytes = max(self.peak_bytes, self.current)

    def _gather(self, u: Unit) -> None:
        if not u.gathered:
            self._account(u, 1)
            u.start_gather(self.comm)

    def _free(self, u: Unit) -> None:
        if u.gathered:
            u.release()
            self._account(u, -1)

    def _use(self, u: Unit, step: int) -> None:
        """Gather ``u`` (wait for it) and start gathering its neighbour ``step`` away in the
        forward order."""
        self._gather(u)
        if u in self.order:
            k = self.order.index(u) + step
            if 0 <= k < len(self.order):
                self._gather(self.order[k])
        u.wait_gather()

    def _before_forward(self, u: Unit) -> None:
        if u not in self.order:
            self.order.append(u)
        self._use(u, 1)

    def _after_forward(self, u: Unit, out: Any) -> None:
        if torch.is_grad_enabled():
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda _g, u=u: self._use(u, -1))
        self._free(u)

    def _accumulated(self, u: Unit, p: torch.Tensor) -> None:
        u.pending.discard(id(p))
        if not u.pending:
            self._free(u)
            u.pending = {id(q) for q in u.params if q.requires_grad}

    def after_step(self) -> None:
        """After the optimizer step: free every unit (the next forward gathers the new values)
        and gather the parameters of no unit. Collective."""
        for u in self.units:
            self._free(u)
            u.pending = {id(q) for q in u.params if q.requires_grad}
        rest = [u for u in self.units_all if u.name is None]
        for u in rest:
            u.start_gather(self.comm)
        for u in rest:
            u.wait_gather()
