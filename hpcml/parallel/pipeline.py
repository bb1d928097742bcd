"""Pipeline parallelism of an arbitrary ``nn.Module`` over the pipeline dimension of a Mesh.

``PipelineModel(model, mesh, sample=(x,))`` traces the model once on the sample
(:mod:`~hpcml.parallel.pipeline_trace`), splits its unit calls into ``mesh.pipeline.size``
contiguous stages balancing their parameter counts -- deterministic, the same in every run and
layout -- or, when asked (``balance="measured"``), measured time and memory
(:mod:`~hpcml.parallel.pipeline_partition`; pins by module name), and frees, on each rank,
the parameters its stage does not hold.

The user's training step stays theirs (like SageMaker's ``smp.step``)::

    @hpcml.parallel.step
    def train_step(model, x, y):
        loss = F.mse_loss(model(x), y, reduction="sum")
        model.backward(loss)
        return loss

    out = train_step(pmodel, x, y)   # x, y: this data replica's batch, split into microbatches

How a stage runs a microbatch: *every* stage runs the step function; a call of a unit that
belongs to an earlier stage returns the tensors that stage sent (or zeros of the right shape
when nothing downstream needs them), a call of its own units runs them, and the first call of a
later stage's unit ends the stage's forward there (the rest of the step runs on later stages).
So any Python between and around modules (masks, skip connections, a module called twice) runs
where it is needed. Forward activations go to the next stage, gradients to the previous one, by
``Isend``/``Irecv`` on ``mesh.pipeline`` (every byte in the ledger); each message is preceded by
a header with the shapes of all earlier unit outputs, so shapes may change per microbatch.

Interleaving (``schedule="interleaved-1f1b", virtual_stages=v``): the calls are split into
v * S contiguous *virtual* stages and rank s runs stages s, s + S, ..., s + (v - 1) S (Megatron's
interleaved 1F1B, :mod:`~hpcml.parallel.pipeline_schedule`); each virtual stage sends to the next
one's rank, the last rank's last one to rank 0's next chunk. Microbatches must be a multiple of S.

Mixed precision (``precision=MixedPrecision(...)``, :mod:`~hpcml.parallel.precision`): the
trace and every forward run under its autocast, so activations travel in the compute dtype;
the step function scales the loss itself (``model.backward(mp.scale_loss(loss))``).

Every gradient is averaged over ``mesh.data`` by :class:`~hpcml.parallel.GradientReducer`
(its buckets launch during this rank's last backward action; the earlier ones accumulate
under ``no_sync``), unless ``data_reduction="optimizer"`` leaves that to a
:class:`~hpcml.parallel.ShardedOptimizer` over ``mesh.data``
(ZeRO-1 reduce-scatters the gradients itself); after the schedule, gradients of parameters
held by several stages (tied weights) are summed over the pipeline.

Gradients of one step are the *sum* over microbatches of ``model.backward(loss)``: to average,
divide the loss by ``model.microbatches``. One ``model(...)`` call per step. Under
``torch.no_grad()`` a step runs the forwards only (evaluation); the module calls must still
follow the traced sequence (``nn.TransformerEncoderLayer`` takes a fused path without grad, so
keep such layers whole units there).

Combining with the other parallelisms, in this order (every rank builds the same model, or
the same :func:`~hpcml.parallel.deferred.deferred_init` model without memory: it is traced on
the meta device and each rank then materializes only its stage's parameters, its tensor shard):

1. tensor parallelism: ``parallelize(model, mesh.tensor)`` on the whole model first; each
   stage's units then run their tensor-parallel collectives within ``mesh.tensor`` (all tensor
   ranks of a stage run the same schedule), activations travel between the stages of each
   tensor coordinate, and the last stage computes the loss (e.g.
   :func:`~hpcml.parallel.tensor.vocab_parallel_cross_entropy` over ``mesh.tensor``);
2. ``PipelineModel(model, mesh, ...)``, with ``data_reduction="optimizer"`` for ZeRO;
3. the optimizer over ``pmodel.parameters()`` (this stage's, this tensor rank's pieces):
   ``ShardedOptimizer(pmodel.parameters(), torch.optim.Adam, mesh.data, ...)`` for ZeRO-1
   (``stage=2`` or ``3, pipeline=pmodel`` for ZeRO-2/3). It rebinds the parameters' storage to
   its flat buffers; the pipeline reads the parameters' storages at every step (and skips
   parameters and their views), so they are still not counted as activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from hpcml.comm import Communicator, Request
from hpcml.errors import UsageError
from hpcml.parallel import pipeline_checkpoint
from hpcml.parallel.broadcast import broadcast_parameters
from hpcml.parallel.data_parallel import GradientReducer
from hpcml.parallel.deferred import is_deferred, materialize, meta_tracing
from hpcml.parallel.mesh import Mesh
from hpcml.parallel.pipeline_partition import call_costs, partition, stage_costs
from hpcml.parallel.pipeline_plan import Plan, make_plan
from hpcml.parallel.pipeline_schedule import (
    SCHEDULES,
    in_flight,
    paper_bubble,
    schedule,
    theoretical_bubble,
)
from hpcml.parallel.pipeline_trace import (
    ActivationCounter,
    Dep,
    Leaf,
    Trace,
    param_names,
    param_storages,
    tensors,
    trace,
)
from hpcml.parallel.precision import MixedPrecision
from hpcml.parallel.reductions import make_reduction

DATA_REDUCTIONS = ("allreduce", "optimizer")


class _StageDone(Exception):
    """Raised inside the user's step when the forward reaches a later stage's first unit."""


@dataclasses.dataclass
class _Micro:
    """One microbatch on this stage between its forward and its backward."""

    shapes: dict[Dep, torch.Size] = dataclasses.field(default_factory=dict)
    received: dict[Dep, torch.Tensor] = dataclasses.field(default_factory=dict)
    outputs: dict[Dep, torch.Tensor] = dataclasses.field(default_factory=dict)
    sent: list[tuple[Dep, torch.Tensor]] = dataclasses.field(default_factory=list)
    loss: torch.Tensor | None = None
    result: Any = None
    activation_bytes: int = 0
    counter: ActivationCounter | None = None
    next_call: int = 0
    vstage: int = 0  # the (virtual) stage this forward runs
    inside: bool = False
    training: bool = True


@dataclasses.dataclass
class StepOutput:
    """What a pipelined step returns. ``outputs`` holds the step function's return value per
    microbatch on the last stage and is empty elsewhere; the reductions are collective over
    the pipeline group (every stage gets the last stage's value)."""

    outputs: list[Any]
    comm: Communicator

    def reduce_sum(self) -> float:
        """Sum over microbatches of the (scalar) return values. Collective over the pipeline."""
        value = sum(float(o.detach() if isinstance(o, torch.Tensor) else o)
                    for o in self.outputs) if self.outputs else None
        return float(self.comm.bcast(value, root=self.comm.size - 1))

    def reduce_mean(self) -> float:
        """Mean over microbatches. Collective over the pipeline."""
        n = self.comm.bcast(len(self.outputs), root=self.comm.size - 1)
        return self.reduce_sum() / n


def _module_pins(trace: Trace, pins: Mapping[str, int], stages: int) -> dict[int, int]:
    """Call index -> stage, from module names (a unit, a module containing units, or a module
    inside a unit)."""
    out: dict[int, int] = {}
    for name, stage in pins.items():
        if not isinstance(stage, int) or not 0 <= stage < stages:
            raise UsageError(f"partition[{name!r}]: stage {stage!r} is not in 0..{stages - 1}")
        hit = [k for k, c in enumerate(trace.calls)
               if c.unit == name or c.unit.startswith(name + ".") or
               name.startswith(c.unit + ".")]
        if not hit:
            raise UsageError(f"partition[{name!r}]: no module of that name runs in the "
                             f"forward; units are {trace.units[:6]}...")
        out.update(dict.fromkeys(hit, stage))
    return out


def _compress(names: Sequence[str]) -> str:
    """``a.layers.0, a.layers.1, a.layers.2, b`` -> ``a.layers.0-2, b``."""
    groups: list[list[Any]] = []
    for n in names:
        head, _, tail = n.rpartition(".")
        if groups and tail.isdigit() and groups[-1][0] == head and groups[-1][2] + 1 == int(tail):
            groups[-1][2] = int(tail)
        elif tail.isdigit():
            groups.append([head, int(tail), int(tail)])
        else:
            groups.append([n, None, None])
    return ", ".join(g[0] if g[1] is None else
                     (f"{g[0] + '.' if g[0] else ''}{g[1]}" +
                      ("" if g[1] == g[2] else f"-{g[2]}"))
                     for g in groups)


class PipelineModel:
    """A model split into ``mesh.pipeline.size`` stages; collective constructor over the mesh.

    ``sample``/``sample_kwargs``: one microbatch of inputs to trace. ``partition``: pins,
    module name -> stage. ``balance``: ``"params"`` (default: parameter counts, the same
    partition in every run) or ``"measured"`` (time and memory of rank 0's trace, which vary
    from run to run).
    ``units``: the modules that are the partition's atoms (default: chosen automatically,
    about ``units_per_stage`` per stage).
    ``checkpoint_stages`` / ``checkpoint_modules``: recompute the activations of the units of
    these stages / of modules with these names (or names under them) in the backward pass.
    ``schedule``: one of ``"gpipe"``, ``"1f1b"``, ``"interleaved-1f1b"`` (with
    ``virtual_stages`` chunks per rank; partition pins then name virtual stages 0..v*S-1,
    ``checkpoint_stages`` ranks). ``precision``: a
    :class:`~hpcml.parallel.precision.MixedPrecision` whose autocast the trace and the forwards
    run under.
    ``data_reduction``: ``"allreduce"`` (the model averages every gradient over
    ``mesh.data``) or ``"optimizer"`` (it leaves them unreduced, for a
    :class:`~hpcml.parallel.ShardedOptimizer` over ``mesh.data`` that reduce-scatters them;
    with any other optimizer the replicas would drift apart).
    The parameters this rank holds (``parameters()``) are broadcast from data replica 0, and
    shared ones from their owner stage, so every replica starts equal; a
    :func:`~hpcml.parallel.deferred.deferred_init` model is traced on the meta device instead
    and each rank materializes the parameters it holds (equal everywhere by the init rule)."""

    def __init__(self, module: nn.Module, mesh: Mesh, *, sample: tuple,
                 sample_kwargs: Mapping[str, Any] | None = None, microbatches: int = 4,
                 schedule: str = "1f1b", partition: Mapping[str, int] | None = None,
                 balance: str = "params", units_per_stage: int = 2,
                 units: Sequence[str] | None = None,
                 checkpoint_stages: Sequence[int] = (),
                 checkpoint_modules: Sequence[str] = (),
                 data_reduction: str = "allreduce", virtual_stages: int = 1,
                 precision: MixedPrecision | None = None) -> None:
        if schedule not in SCHEDULES:
            raise UsageError(f"schedule: {schedule!r} is not one of {list(SCHEDULES)}")
        if virtual_stages < 1 or (virtual_stages > 1 and schedule != "interleaved-1f1b"):
            raise UsageError(f"virtual_stages: {virtual_stages} needs schedule="
                             "'interleaved-1f1b' (and must be >= 1)")
        if schedule == "interleaved-1f1b" and microbatches % mesh.pipeline.size:
            size = mesh.pipeline.size
            raise UsageError(f"microbatches: interleaved-1f1b needs a multiple of the pipeline "
                             f"size {size}, got {microbatches}; use microbatches="
                             f"{-(-microbatches // size) * size}")
        if balance not in ("measured", "params"):
            raise UsageError(f"balance: {balance!r} is not 'measured' or 'params'")
        if microbatches < 1:
            raise UsageError(f"microbatches: must be >= 1, got {microbatches}")
        if data_reduction not in DATA_REDUCTIONS:
            raise UsageError(f"data_reduction: {data_reduction!r} is not one of "
                             f"{list(DATA_REDUCTIONS)}")
        self.module, self.mesh, self.microbatches = module, mesh, microbatches
        self.schedule, self.precision = schedule, precision
        self.comm = mesh.pipeline
        self.stages, self.stage = self.comm.size, self.comm.rank
        self.chunks = virtual_stages
        self.vstages = self.stages * virtual_stages
        self._mine = [self.stage + c * self.stages for c in range(virtual_stages)]
        args, kwargs = tuple(sample), dict(sample_kwargs or {})
        deferred = is_deferred(module)  # built by deferred_init: traced on the meta device
        try:
            with meta_tracing() if deferred else contextlib.nullcontext(), self._autocast():
                self.trace = trace(module, args, kwargs, self.vstages, units_per_stage,
                                   list(units) if units is not None else None)
        except ValueError as exc:
            raise UsageError(f"units: {exc}") from None
        # the partition is computed from rank 0's measured costs and broadcast; the plan each
        # rank derives from it is the same only if every rank traced the same structure
        digests = mesh.world.allgather((len(self.trace.calls), self.trace.structure()))
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks traced different module calls (numbers of calls "
                               f"{[n for n, _ in digests]}, or their outputs or dependencies "
                               "differ): the model or the sample differs between ranks")
        self.costs, stage_of = self._partition(balance, partition or {})
        names = param_names(module)
        self.plan: Plan = make_plan(self.trace, stage_of, self.vstages, list(names.values()),
                                    self.stages)
        held = self.plan.held(self.stage)
        if deferred:  # only this stage's parameters get storage (hpcml.parallel.deferred)
            materialize(module, held)
            names = param_names(module)
        self._params = {names[id(p)]: p for p in module.parameters()}
        self._shapes = {n: p.shape for n, p in self._params.items()}
        for name, p in self._params.items():
            if name not in held:
                p.data = torch.empty(0, dtype=p.dtype)
        self._held = [n for n in self._params if n in held]
        self._held_set = set(self._held)
        self._checkpointed = {
            k for k, c in enumerate(self.trace.calls)
            if self.plan.rank_of(stage_of[k]) in set(checkpoint_stages)
            or any(c.unit == m or c.unit.startswith(m + ".") or m.startswith(c.unit + ".")
                   for m in checkpoint_modules)}
        # the largest traced activation of a checkpointed unit call of this stage: what a
        # backward pass holds again while it recomputes that call
        self._recomputed_bytes = max((self.trace.calls[k].activation_bytes
                                      for k in self._checkpointed
                                      if stage_of[k] in self._mine), default=0)
        self._micro: dict[tuple[int, int], _Micro] = {}
        self._current: _Micro | None = None
        self._sends: list[tuple[Request, torch.Tensor]] = []
        self._storages: set[int] = set()
        self.stats: dict[str, float] = {}
        if not deferred:  # deferred: the initialization rule gives every rank the same values
            self._broadcast_parameters()
        # data parallelism: hpcml's one gradient reducer, launched on this rank's last backward
        # action (overlapping it; the earlier ones accumulate under no_sync), over this
        # stage's parameters -- unless the optimizer reduces them (ZeRO-1)
        self.data_reduction = data_reduction
        self._reducer = GradientReducer(
            mesh.data, list(reversed(self.named_parameters())), make_reduction("dense_allreduce"),
            passes=1) if mesh.data.size > 1 and data_reduction == "allreduce" else None
        modules = dict(module.named_modules())
        for unit in self.trace.units:
            mod = modules[unit]
            mod.forward = self._dispatcher(unit, type(mod).forward.__get__(mod))

    # -- construction ----------------------------------------------------------------------
    def _partition(self, balance: str, pins: Mapping[str, int]) -> tuple[list[float], list[int]]:
        """Costs and stage of every call, computed on the mesh's rank 0 (its measurements)
        and broadcast, so that every rank uses the same partition."""
        calls, result = self.trace.calls, None
        if self.mesh.world.rank == 0:
            try:
                costs = call_costs([c.seconds if balance == "measured" else 0.0 for c in calls],
                                   [c.activation_bytes + 4 * c.param_count for c in calls],
                                   [c.param_count for c in calls])
                result = (costs, partition(costs, self.vstages,
                                           _module_pins(self.trace, pins, self.vstages)))
            except (ValueError, UsageError) as exc:
                result = str(exc)
        result = self.mesh.world.bcast(result)
        if isinstance(result, str):
            raise UsageError(f"pipeline: {result}")
        return result

    def _broadcast_parameters(self) -> None:
        """Held parameters from data replica 0; shared ones from their owner stage."""
        broadcast_parameters(self.parameters(), comm=self.mesh.data)
        for name in self.plan.shared:
            p = self._params[name]
            buf = p.data if name in self._held else torch.empty(self._shapes[name],
                                                                dtype=p.dtype)
            broadcast_parameters([buf], comm=self.comm, root=self.plan.owner(name))

    # -- what the user sees ----------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank holds (give these to the optimizer)."""
        return [self._params[n] for n in self._held]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, self._params[n]) for n in self._held]

    @property
    def exchange_bytes(self) -> int:
        """Peak bytes of the data-parallel reduction buffers on this rank (0 without data
        parallelism)."""
        return self._reducer.memory.peak if self._reducer is not None else 0

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._current is None:
            raise UsageError("call the pipelined model inside a function decorated with "
                             "@hpcml.parallel.step")
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Mark ``loss`` (this microbatch's) for the backward pass that the schedule runs."""
        micro = self._current
        if micro is None:
            raise UsageError("model.backward(loss) belongs inside the @hpcml.parallel.step "
                             "function")
        if micro.loss is not None:
            raise UsageError("model.backward was called twice in one step function")
        if not micro.training:
            raise UsageError("model.backward(loss) under torch.no_grad(): a forward-only step "
                             "must not call it")
        micro.loss = loss

    # -- one unit call -------------------------------------------------------------------------
    def _dispatcher(self, unit: str, original: Callable) -> Callable:
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            micro = self._current
            if micro is None or micro.inside:
                return original(*args, **kwargs)
            k = micro.next_call
            calls = self.trace.calls
            if k >= len(calls) or calls[k].unit != unit:
                expected = calls[k].unit if k < len(calls) else "no further call"
                raise RuntimeError(f"pipeline: module call {k} is {unit!r} but the trace had "
                                   f"{expected!r}; the sequence of module calls must not "
                                   "depend on the data")
            micro.next_call += 1
            stage = self.plan.stage_of[k]
            if stage > micro.vstage:
                raise _StageDone
            if stage < micro.vstage:
                return self._stub(micro, k)
            micro.inside = True
            try:
                if k in self._checkpointed:
                    # a closure keeps argument identity (MultiheadAttention takes another
                    # path when key is value) for the recomputation; it also keeps the
                    # arguments alive until the backward: they count as activations
                    for t in tensors((args, kwargs)):
                        micro.counter.count(t)
                    out = checkpoint(lambda: original(*args, **kwargs), use_reentrant=False)
                else:
                    out = original(*args, **kwargs)
            finally:
                micro.inside = False
            leaves, spec = tree_flatten(out)
            for j, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    micro.outputs[(k, j)] = leaf
                elif micro.vstage < self.vstages - 1:
                    self._check_replayed(k, j, leaf, spec)
            return out
        return dispatch

    def _check_replayed(self, k: int, j: int, value: Any, spec: Any) -> None:
        """Later stages replay call ``k``'s non-tensor outputs from the trace: refuse a value
        (or output structure) that differs from the traced one."""
        call = self.trace.calls[k]
        traced = call.leaves[j] if j < len(call.leaves) else None
        try:
            same = spec == call.spec and type(value) is type(traced) and bool(value == traced)
        except Exception:  # noqa: BLE001 -- a value without a plain ==: cannot be compared
            same = False
        if not same:
            raise UsageError(f"pipeline: unit {call.unit!r} (call {k}) returned the non-tensor "
                             f"output {value!r} where the trace recorded {traced!r}; later "
                             "stages replay the traced value, so return it as a tensor (or "
                             "keep it the same for every batch)")

    def _stub(self, micro: _Micro, k: int) -> Any:
        """Call ``k`` of an earlier stage: the received tensors, zeros for unneeded ones."""
        call = self.trace.calls[k]
        leaves = []
        for j, leaf in enumerate(call.leaves):
            if not isinstance(leaf, Leaf):
                leaves.append(leaf)
            elif (k, j) in micro.received:
                leaves.append(micro.received[(k, j)])
            else:
                absent = torch.zeros(micro.shapes[(k, j)], dtype=leaf.dtype).as_subclass(Absent)
                absent.origin = f"unit {call.unit!r} (call {k})"
                leaves.append(absent)
        return tree_unflatten(leaves, call.spec)

    # -- schedule actions ------------------------------------------------------------------
    def _leaf(self, dep: Dep) -> Leaf:
        return self.trace.calls[dep[0]].leaves[dep[1]]

    def _tensor_deps(self, upto: int) -> list[Dep]:
        """Every tensor output of calls before ``upto``, in order (the header's layout)."""
        return [(k, j) for k in range(upto) for j, leaf in enumerate(self.trace.calls[k].leaves)
                if isinstance(leaf, Leaf)]

    def _tag(self, m: int, vstage: int, kind: str) -> int:
        """The tag of the messages of microbatch ``m`` to virtual stage ``vstage``: forward
        activations (kind "F") or gradients (kind "B"), unique per pair of ranks."""
        return (m * self.vstages + vstage) * 2 + (kind == "B")

    def _receive_forward(self, m: int, micro: _Micro) -> None:
        vs = micro.vstage
        source, tag = self.plan.rank_of(vs - 1), self._tag(m, vs, "F")
        header = torch.empty(self.plan.header_len[vs], dtype=torch.int64)
        self.comm.Irecv(header, source=source, tag=tag).wait()
        values, pos = header.tolist(), 0
        for dep in self._tensor_deps(self.plan.first[vs]):
            n = self._leaf(dep).ndim
            micro.shapes[dep] = torch.Size(values[pos:pos + n])
            pos += n
        requests = []
        for dep in self.plan.live[vs]:
            buf = torch.empty(micro.shapes[dep], dtype=self._leaf(dep).dtype)
            requests.append(self.comm.Irecv(buf, source=source, tag=tag))
            micro.received[dep] = buf
        Request.waitall(requests)
        for dep, buf in micro.received.items():
            if self._leaf(dep).requires_grad and micro.training:
                buf.requires_grad_()
            micro.activation_bytes += buf.numel() * buf.element_size()

    def _send(self, tensor: torch.Tensor, dest: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        self._sends.append((self.comm.Isend(tensor, dest=dest, tag=tag), tensor))

    def _send_forward(self, m: int, micro: _Micro) -> None:
        nxt = micro.vstage + 1
        dest, tag = self.plan.rank_of(nxt), self._tag(m, nxt, "F")
        shapes = []
        for dep in self._tensor_deps(self.plan.first[nxt]):
            shapes += list(micro.shapes[dep] if dep in micro.shapes else
                           micro.outputs[dep].shape)
        self._send(torch.tensor(shapes, dtype=torch.int64), dest, tag)
        for dep in self.plan.live[nxt]:
            t = micro.received[dep] if dep in micro.received else micro.outputs[dep]
            self._send(t, dest, tag)
            micro.sent.append((dep, t))

    def _autocast(self) -> Any:
        return self.precision.autocast() if self.precision is not None \
            else contextlib.nullcontext()

    def _forward(self, m: int, chunk: int, fn: Callable, args: tuple, kwargs: dict) -> float:
        """Forward of microbatch ``m`` on this rank's ``chunk``; returns seconds spent waiting
        for messages."""
        micro = _Micro(training=torch.is_grad_enabled(), vstage=self._mine[chunk])
        self._micro[(m, chunk)] = micro
        start = time.perf_counter()
        if micro.vstage > 0:
            self._receive_forward(m, micro)
        waited = time.perf_counter() - start
        self._current = micro
        finished = False
        try:
            with ActivationCounter(self._storages) as counter, self._autocast():
                counter.seen.update(t.untyped_storage().data_ptr()  # counted on receipt
                                    for t in micro.received.values())
                micro.counter = counter
                micro.result = fn(*args, **kwargs)
                finished = True
        except _StageDone:
            pass
        finally:
            self._current = None
        micro.activation_bytes += counter.bytes
        micro.counter = None
        last = micro.vstage == self.vstages - 1
        if finished != last:
            where = "returned before the next stage's modules" if finished else "stopped early"
            raise RuntimeError(f"pipeline stage {micro.vstage}: the step function {where}; the "
                               "module calls must follow the traced sequence")
        if last and micro.next_call != len(self.trace.calls):
            raise RuntimeError(f"pipeline: the forward made {micro.next_call} of the "
                               f"{len(self.trace.calls)} traced module calls; the sequence of "
                               "module calls must not depend on the data")
        if last and micro.training and micro.loss is None:
            raise UsageError("the @hpcml.parallel.step function must call model.backward(loss) "
                             "once per microbatch")
        if not last:
            self._send_forward(m, micro)
        micro.outputs = {}
        return waited

    def _backward(self, m: int, chunk: int) -> float:
        """Backward of microbatch ``m`` on this rank's ``chunk``; returns seconds spent waiting
        for messages."""
        micro = self._micro.pop((m, chunk))
        vs = micro.vstage
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        waited = 0.0
        if vs == self.vstages - 1:
            tensors.append(micro.loss)
            grads.append(None)
        else:
            pending = []
            for dep, t in micro.sent:
                if self._leaf(dep).requires_grad:
                    g = torch.empty(t.shape, dtype=t.dtype)
                    pending.append((self.comm.Irecv(g, source=self.plan.rank_of(vs + 1),
                                                    tag=self._tag(m, vs, "B")), t, g))
            start = time.perf_counter()
            Request.waitall([p[0] for p in pending])
            waited = time.perf_counter() - start
            for _, t, g in pending:
                if t.requires_grad:
                    tensors.append(t)
                    grads.append(g)
        if tensors:
            torch.autograd.backward(tensors, grads)
        if vs > 0:
            for dep in self.plan.live[vs]:
                if self._leaf(dep).requires_grad:
                    buf = micro.received[dep]
                    self._send(buf.grad if buf.grad is not None else torch.zeros_like(buf),
                               self.plan.rank_of(vs - 1), self._tag(m, vs - 1, "B"))
        return waited

    # -- one step ------------------------------------------------------------------------------
    def run_step(self, fn: Callable, args: tuple, kwargs: dict,
                 names: Sequence[str] | None = None,
                 batch: Collection[str] | None = None) -> StepOutput:
        """Run ``fn`` over the microbatches of ``args``/``kwargs`` with the schedule, then
        average all gradients over the data group (unless ``data_reduction="optimizer"``) and
        sum shared ones over the pipeline.
        Under ``torch.no_grad()`` only the forwards run (evaluation; ``fn`` must not call
        ``model.backward``). ``names``/``batch``: see :func:`split_microbatches`. Collective
        over the mesh."""
        chunks = split_microbatches(args, kwargs, self.microbatches, names, batch)
        training = torch.is_grad_enabled()
        # read now: an optimizer built after the model (ZeRO-1) may have moved them
        self._storages = param_storages(self.module)
        actions = schedule(self.schedule)(self.stages, self.microbatches, self.stage,
                                          self.chunks) if training else \
            [("F", m, c) for m in range(self.microbatches) for c in range(self.chunks)]
        last_backward = max((i for i, a in enumerate(actions) if a[0] == "B"), default=-1)
        waited = {"F": 0.0, "B": 0.0}
        busy = {"F": 0.0, "B": 0.0}
        live_bytes, peak_bytes = 0, 0
        act: dict[tuple[int, int], int] = {}
        results: dict[int, Any] = {}
        start = time.perf_counter()
        for i, (kind, m, c) in enumerate(actions):
            t0 = time.perf_counter()
            if kind == "F":
                w = self._forward(m, c, fn, *chunks[m])
                micro = self._micro[(m, c)]
                act[(m, c)] = micro.activation_bytes
                if micro.vstage == self.vstages - 1:
                    results[m] = micro.result
                if not training:
                    del self._micro[(m, c)]
                live_bytes += act[(m, c)]
                peak_bytes = max(peak_bytes, live_bytes)
            else:
                # a checkpointed unit's activations exist again while its backward runs
                peak_bytes = max(peak_bytes, live_bytes + self._recomputed_bytes)
                with self._reducer.no_sync() if self._reducer is not None and \
                        i != last_backward else contextlib.nullcontext():
                    w = self._backward(m, c)
                live_bytes -= act[(m, c)]
            waited[kind] += w
            busy[kind] += time.perf_counter() - t0 - w
        start_wait = time.perf_counter()
        Request.waitall([r for r, _ in self._sends])
        self._sends = []
        wall = time.perf_counter() - start
        waited["B"] += time.perf_counter() - start_wait
        if training:
            self._reduce_gradients()
        self.stats = {"forward_ms": busy["F"] * 1e3, "backward_ms": busy["B"] * 1e3,
                      "wait_ms": (waited["F"] + waited["B"]) * 1e3, "wall_ms": wall * 1e3,
                      "bubble": max(0.0, 1.0 - (busy["F"] + busy["B"]) / wall),
                      "peak_activation_bytes": float(peak_bytes),
                      "in_flight": float(in_flight(actions)),
                      "parameters": float(sum(p.numel() for p in self.parameters()))}
        last = self.stage == self.stages - 1
        return StepOutput([results[m] for m in range(self.microbatches)] if last else [],
                          self.comm)

    def _reduce_gradients(self) -> None:
        """Average every held gradient over the data group (the reducer, if the model reduces
        them), then sum shared parameters' gradients over the pipeline (one flat Allreduce).
        The two commute, so a ZeRO-1 optimizer may average after the sum."""
        if self._reducer is not None:
            self._reducer.synchronize()
        if not self.plan.shared:
            return
        parts = []
        for name in self.plan.shared:
            p = self._params[name]
            if name in self._held and p.grad is not None:
                parts.append(p.grad.reshape(-1).float())
            else:
                parts.append(torch.zeros(self._shapes[name].numel()))
        flat = self.comm.Allreduce(torch.cat(parts))
        pos = 0
        for name in self.plan.shared:
            n = self._shapes[name].numel()
            if name in self._held:
                p = self._params[name]
                p.grad = flat[pos:pos + n].view(self._shapes[name]).to(p.dtype).clone()
            pos += n

    # -- reports -------------------------------------------------------------------------------
    def partition_table(self) -> str:
        """The partition: each (virtual) stage's units, parameter count, share of the cost and
        the pipeline rank that runs it. Local."""
        totals = stage_costs(self.costs, self.plan.stage_of, self.vstages)
        lines = ["| stage | units | parameters | cost share | rank |",
                 "|---:|---|---:|---:|---:|"]
        for s in range(self.vstages):
            units = list(dict.fromkeys(c.unit for k, c in enumerate(self.trace.calls)
                                       if self.plan.stage_of[k] == s))
            params = sum(self._shapes[n].numel() for n, v in self.plan.holders.items() if s in v)
            lines.append(f"| {s} | {_compress(units)} | {params} | {totals[s]:.3f} | "
                         f"{self.plan.rank_of(s)} |")
        shared = self.plan.shared
        if shared:
            lines.append(f"\nshared across stages (gradients summed): {', '.join(shared)}")
        if self.mesh.tensor.size > 1:
            lines.append(f"\nparameters: tensor rank {self.mesh.tensor.rank}'s pieces (tensor "
                         f"degree {self.mesh.tensor.size})")
        return "\n".join(lines)

    def stage_table(self) -> str:
        """Per-stage table of the last step and the bubble beside (S-1)/(M+S-1). Collective
        over the pipeline group; every stage gets the text."""
        rows = self.comm.allgather(self.stats)
        lines = ["| stage | parameters | peak activation bytes | forward ms | backward ms | "
                 "bubble |", "|---:|---:|---:|---:|---:|---:|"]
        for s, r in enumerate(rows):
            lines.append(f"| {s} | {r['parameters']:.0f} | {r['peak_activation_bytes']:.0f} | "
                         f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['bubble']:.3f} |")
        measured = sum(r["bubble"] for r in rows) / len(rows)
        s, m, v = self.stages, self.microbatches, self.chunks
        formula = "(S-1)/(M+S-1)" if v == 1 else "(S-1)/(v*M+S-1)"
        lines.append(f"\nbubble: measured {measured:.3f} (mean over stages) vs theoretical "
                     f"{formula} = {theoretical_bubble(s, m, v):.3f} (S={s}, M={m}, v={v}, "
                     f"{self.schedule}; both idle / wall time; arXiv 2104.04473 states idle / "
                     f"compute, (S-1)/(v*M) = {paper_bubble(s, m, v):.3f})")
        return "\n".join(lines)

    # -- checkpoints (hpcml.parallel.pipeline_checkpoint) -------------------------------------
    def holds(self, name: str) -> bool:
        """Whether this rank keeps parameter ``name`` (its canonical name)."""
        return name in self._held_set

    def full_shape(self, name: str) -> torch.Size:
        """Parameter ``name``'s shape in the unsplit pipeline (also where this rank freed it);
        under tensor parallelism, that of this tensor rank's piece."""
        return self._shapes[name]

    def state_owners(self) -> dict[str, tuple[torch.Tensor, int, str | None]]:
        """See :func:`~hpcml.parallel.pipeline_checkpoint.state_owners`. Not collective."""
        return pipeline_checkpoint.state_owners(self.module, [c.unit for c in self.trace.calls],
                                                self.plan)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """See :func:`~hpcml.parallel.pipeline_checkpoint.full_state_dict`. Collective."""
        return pipeline_checkpoint.full_state_dict(self)

    def gather_full(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """See :func:`~hpcml.parallel.pipeline_checkpoint.gather_full`. Collective."""
        return pipeline_checkpoint.gather_full(self, tensors)

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """See :func:`~hpcml.parallel.pipeline_checkpoint.load_full_state_dict`."""
        pipeline_checkpoint.load_full_state_dict(self, state)

    def save(self, path: str | Path) -> None:
        """See :func:`~hpcml.parallel.pipeline_checkpoint.save`. Collective over the mesh."""
        pipeline_checkpoint.save(self, path)

    def save_optimizer(self, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
        """See :func:`~hpcml.parallel.pipeline_checkpoint.save_optimizer`. Collective."""
        pipeline_checkpoint.save_optimizer(self, optimizer, path)


class Absent(torch.Tensor):
    """Stands in, on a later stage, for an earlier stage's unit output that this stage does
    not receive (the trace saw no later module depend on it): zeros of the right shape, so
    code between modules still runs, and what is computed from them is ``Absent`` too. Turning
    it into a Python value (``bool``, ``int``, ``item``, ``tolist``, ``torch.equal``: control
    flow on the activation) raises ``UsageError``, since the zeros are not the activation.
    Metadata (shape, dtype, ``size()``, ``dim()``) is free."""

    origin = "an earlier stage's unit"
    _METADATA = frozenset({"size", "dim", "numel", "stride", "__len__", "element_size",
                           "is_contiguous", "is_floating_point", "is_complex", "__get__",
                           "data_ptr", "untyped_storage", "__set__", "_is_view"})

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = super().__torch_function__(func, types, args, kwargs or {})
        name = getattr(func, "__name__", "")
        origin = next((a.origin for a in tree_flatten((args, kwargs))[0]
                       if isinstance(a, Absent)), cls.origin)
        if isinstance(out, (bool, int, float, complex, list)) and name not in cls._METADATA:
            raise UsageError(f"pipeline: the forward turned the output of {origin} into a "
                             f"Python value ({name}), but this stage does not receive that "
                             "output (no later module depends on it in the trace); make the "
                             "decision a tensor operation, or pin the modules that depend on "
                             "it to that unit's stage")
        for t in tree_flatten(out)[0]:
            if isinstance(t, Absent):
                t.origin = origin
        return out


def split_microbatches(args: tuple, kwargs: dict, micro: int,
                       names: Sequence[str] | None = None,
                       batch: Collection[str] | None = None) -> list[tuple[tuple, dict]]:
    """Split the batch arguments into ``micro`` equal chunks along their first dimension; the
    other arguments go whole to every chunk. ``names``: the names of ``args`` (for messages and
    ``batch``). ``batch``: the names of the batch arguments; ``None`` means every tensor
    argument of one or more dimensions. Every batch argument must have the same first
    dimension (the batch size) and it must be a multiple of ``micro``; otherwise
    ``UsageError``: a tensor that is not batch data must be left out by ``batch``, and
    unequal microbatches would weigh the documented ``loss / model.microbatches`` unequally."""
    names = list(names) if names is not None else [f"argument {i}" for i in range(len(args))]
    named = [*zip(names, args, strict=True), *kwargs.items()]
    if batch is not None:
        unknown = sorted(set(batch) - {n for n, _ in named})
        if unknown:
            raise UsageError(f"@hpcml.parallel.step(batch=...): {unknown} are not arguments "
                             f"of the step call; name arguments among {[n for n, _ in named]}")

    def is_batch(name: str, a: Any) -> bool:
        if batch is not None:
            return name in batch
        return isinstance(a, torch.Tensor) and a.dim() > 0

    split = [(n, a) for n, a in named if is_batch(n, a)]
    if not split:
        raise UsageError("@hpcml.parallel.step: no tensor argument to split into microbatches")
    first, size = split[0][0], None
    for name, a in split:
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            raise UsageError(f"@hpcml.parallel.step: batch argument {name!r} is not a tensor "
                             "with a batch dimension; leave it out of batch=(...)")
        size = a.shape[0] if size is None else size
        if a.shape[0] != size:
            raise UsageError(f"@hpcml.parallel.step: argument {name!r} has first dimension "
                             f"{a.shape[0]}, the batch {first!r} has {size}; every tensor "
                             "argument is split into microbatches unless the step names its "
                             "batch arguments: @hpcml.parallel.step(batch=('x', 'y'))")
    if size < micro or size % micro:
        raise UsageError(f"microbatches: a batch of {size} does not split into {micro} equal "
                         f"microbatches; use a batch size that is a multiple of {micro}")
    parts = {n: list(torch.tensor_split(a, micro)) for n, a in split}
    return [(tuple(parts[n][i] if n in parts else a for n, a in zip(names, args, strict=True)),
             {k: parts[k][i] if k in parts else v for k, v in kwargs.items()})
            for i in range(micro)]


def step(fn: Callable | None = None, *,
         batch: Sequence[str] | None = None) -> Callable[..., Any]:
    """Decorator: ``fn(model, *batch)`` becomes a pipelined step over microbatches of the
    batch (see the module docstring). Exactly one argument must be a :class:`PipelineModel`.
    Every tensor argument is batch data, split into ``model.microbatches`` equal chunks along
    its first dimension, unless ``@step(batch=("x", "y"))`` names the batch arguments (then the
    others go whole to every microbatch). Collective over that model's mesh."""
    if fn is None:
        return functools.partial(step, batch=batch)
    if batch is not None:
        batch = tuple(batch)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> StepOutput:
        models = [a for a in (*args, *kwargs.values()) if isinstance(a, PipelineModel)]
        if len(models) != 1:
            raise UsageError(f"@hpcml.parallel.step: {fn.__name__} needs exactly one "
                             f"PipelineModel argument, got {len(models)}")
        return models[0].run_step(fn, args, kwargs, _positional_names(signature, len(args)),
                                  batch)

    return wrapper


def _positional_names(signature: inspect.Signature, n: int) -> list[str]:
    """Names of the first ``n`` positional arguments of a call (``name[i]`` under ``*name``)."""
    names: list[str] = []
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            names += [f"{p.name}[{i}]" for i in range(n - len(names))]
    return (names + [f"argument {i}" for i in range(len(names), n)])[:n]
