"""Optimizer-state, gradient and parameter sharding: ZeRO stages 1, 2 and 3 (Rajbhandari et al.,
arXiv 1910.02054; the "optimizer state sharding" of the SageMaker model-parallelism library,
arXiv 2111.05972 §3.4), one mechanism with a ``stage`` parameter.

The parameters are grouped into *units*, each laid out in one flat buffer padded to a multiple
of D and cut into D equal chunks: rank r owns chunk r of every unit. This rank's *shard* is the
concatenation of its chunks (``param_shard``, ``grad_shard``); the inner optimizer (built from
the user's optimizer class or factory over views of the shard, one view per parameter piece,
in the user's parameter groups) holds state for the shard only. A step is:

1. the gradient of every unit is ``Reduce_scatter``-ed (summed, then divided by D unless
   ``average=False``): rank r receives the averaged gradient of its chunks only;
2. the inner optimizer steps the shard;
3. the updated chunks are ``Allgather``-ed into every rank's unit buffers (stages 1 and 2), or
   left sharded until the next use (stage 3).

Stages:

- ``stage=1`` (ZeRO-1): one unit holding every parameter. Backward accumulates the gradients
  straight into a flat buffer (each ``param.grad`` is a view of it, as torch DDP's
  ``gradient_as_bucket_view``); ``step`` reduce-scatters it.
- ``stage=2`` (ZeRO-2): units are buckets of about ``bucket_bytes`` in backward order. The
  gradients are reduce-scattered *during* backward, by the one data-parallel gradient reducer
  (:class:`~hpcml.parallel.zero.ShardReducer`, a :class:`~hpcml.parallel.GradientReducer`
  posting a non-blocking ``Ireduce_scatter`` per bucket as soon as its gradients are all
  there); each gradient is copied into its bucket and ``param.grad`` is freed (``None``), the
  bucket freed once reduced: a rank keeps the gradient of its shard only.
- ``stage=3`` (ZeRO-3): as stage 2, and the parameters are sharded too: units are modules
  (``units``: qualified names in ``module``; default its top-level children, or with
  ``pipeline`` the pipeline's units), each gathered by a non-blocking ``Iallgather`` just before
  its forward (the next unit prefetched), freed after it, gathered again for its backward and
  freed once its gradients are accumulated (:mod:`hpcml.parallel.zero`). Parameters of no unit
  (``rest``) stay gathered. Each unit's gradients are its reduction bucket.

Gradients (stage 1): ``zero_grad()`` zeroes the flat buffer and points every ``param.grad`` at
its slot again (so ``param.grad`` is a zero tensor, not None, between steps). A parameter counts
as having a gradient in a step if backward accumulated into it, or its ``.grad`` holds
non-zeros, or ``.grad`` was replaced by another tensor (copied in at ``step``; a sparse one
densified); one whose ``.grad`` is None or untouched zeros on every rank is skipped, as the
unsharded optimizer skips a None gradient. Stages 2 and 3: a parameter counts if backward
produced a gradient for it on some rank (``passes`` backward passes per step, as
:class:`~hpcml.parallel.GradientReducer`); ``param.grad`` is ``None`` outside backward.

Clipping: ``torch.nn.utils.clip_grad_norm_`` on ``param.grad`` clips the wrong norm (stage 1:
each rank's unreduced gradient; stages 2, 3: nothing). Use :func:`hpcml.parallel.clip_grad_norm_`
(optimizer, max_norm): it finishes the reduction now (:meth:`ShardedOptimizer.reduce_gradients`),
computes the global norm of the averaged gradient over the shards and scales the shard that
``step`` then applies.

Pipeline parallelism (``pipeline``: the :class:`~hpcml.parallel.PipelineModel`, built with
``data_reduction="optimizer"``): ``passes`` is its number of microbatches, and the parameters it
shares between stages (whose gradients it sums over the pipeline after the schedule) are
reduced at ``step``, not during backward.

For element-wise optimizers (SGD, Adam, AdamW, RMSprop, Adagrad, ...) the result equals the
unsharded optimizer on the averaged gradient, up to float rounding. An optimizer that uses
per-tensor statistics (a norm over the whole parameter, as LAMB or LARS do) sees the piece of a
parameter that lies in its shard, not the whole parameter, and so computes something else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.parallel.buckets import plan_buckets
from hpcml.parallel.zero import (
    ParameterGather,
    ShardReducer,
    Unit,
    module_units,
    pipeline_units,
)

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
STAGES = (1, 2, 3)


class ShardedOptimizer(torch.optim.Optimizer):
    """``optimizer(params, **kwargs)`` with its state (stage 1), gradients (2) and parameters
    (3) sharded over ``dp_comm`` (ZeRO; see the module docstring).

    ``optimizer`` is a ``torch.optim.Optimizer`` subclass (called as ``optimizer(groups,
    **kwargs)``) or a factory ``groups -> Optimizer``. ``params``: parameters or parameter
    groups as for any torch optimizer; all dense, of one dtype and device, and identical on
    every rank of ``dp_comm`` at construction (broadcast them first). Stage 3 needs ``module``
    (the model, or with ``pipeline`` its ``module``) and takes ``units`` (qualified module
    names); ``bucket_bytes`` sizes stage 2's buckets; ``passes``: backward passes per step
    (stages 2 and 3; the pipeline's microbatches when ``pipeline`` is given).

    It *is* a ``torch.optim.Optimizer``: ``zero_grad``, learning-rate schedulers (which edit
    ``param_groups``; the values reach the inner optimizer at every step) and hooks work.
    ``step`` is collective over ``dp_comm``. ``state_dict()`` is this rank's shard (save one file
    per rank); ``load_state_dict`` accepts only a shard of the same rank, D and layout.
    ``full_state_dict()`` / ``load_full_state_dict()`` convert to and from the unsharded
    optimizer's state dict, which moves between data-parallel degrees and to one process.
    """

    def __init__(self, params: Iterable[Any], optimizer: type[torch.optim.Optimizer]
                 | OptimizerFactory, dp_comm: Communicator, *, average: bool = True,
                 stage: int = 1, module: nn.Module | None = None,
                 units: Iterable[str] | None = None, bucket_bytes: int = 2**20,
                 passes: int = 1, pipeline: Any = None, **kwargs: Any) -> None:
        groups = list(params)
        if not groups:
            raise UsageError("ShardedOptimizer got no parameters; pass model.parameters()")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        flat_params = [p for g in groups for p in g["params"]]
        _check_params(flat_params)
        if stage not in STAGES:
            raise UsageError(f"ShardedOptimizer: stage={stage!r} is not one of {list(STAGES)}")
        if stage == 3 and module is None and pipeline is None:
            raise UsageError("ShardedOptimizer: stage=3 gathers parameters around module calls; "
                             "pass module=model")
        if stage < 3 and units is not None:
            raise UsageError("ShardedOptimizer: units= names stage 3's modules; pass stage=3 "
                             "or leave units out")
        self.comm, self.average, self.stage = dp_comm, average, stage
        d = dp_comm.size
        self.numel = sum(p.numel() for p in flat_params)
        first = flat_params[0]
        self.dtype, self.device = first.dtype, first.device
        if pipeline is not None:
            passes, module = pipeline.microbatches, pipeline.module
        deferred = {id(pipeline._params[n]) for n in pipeline.plan.shared
                    if pipeline.holds(n)} if pipeline is not None else set()
        members, names = self._plan_units(flat_params, module, units, bucket_bytes, pipeline)
        self.units: list[Unit] = [Unit.lay_out(ps, name, d, self.dtype, self.device,
                                               deferred=any(id(p) in deferred for p in ps))
                                  for ps, name in zip(members, names, strict=True)]
        # deferred units (pipeline-shared parameters) last: the reducer launches in order
        self.units.sort(key=lambda u: u.deferred)
        lo = 0
        for u in self.units:
            u.lo, lo = lo, lo + u.chunk
        self.shard_numel = lo
        # stage 3 keeps this rank's chunks of the parameters in param_shard (the unit buffers
        # are freed); stages 1, 2 in the unit buffers themselves
        self.param_shard = torch.zeros(lo, dtype=self.dtype, device=self.device) \
            if stage == 3 else None
        self.grad_shard = torch.zeros(lo, dtype=self.dtype, device=self.device)
        unit_of = {id(p): (u, off) for u in self.units for p, off in zip(u.params, u.offsets,
                                                                         strict=True)}
        self.offsets: list[tuple[nn.Parameter, int]] = [(p, unit_of[id(p)][1])
                                                        for p in flat_params]
        self.pieces: list[tuple[int, nn.Parameter, slice]] = []  # (param index, view, shard rows)
        self.piece_start: list[int] = []  # where each piece starts in its parameter (elements)
        inner_groups = []
        index = 0
        with torch.no_grad():
            for u in self.units:
                u.bind(dp_comm.rank, self.param_shard)
            for g in groups:
                views = []
                for p in g["params"]:
                    u, off = unit_of[id(p)]
                    a, b = u.owned(off, p.numel(), dp_comm.rank)
                    if a < b:
                        a0, b0 = a - u.chunk * dp_comm.rank, b - u.chunk * dp_comm.rank
                        rows = slice(u.lo + a0, u.lo + b0)
                        piece = nn.Parameter(u.shard[a0:b0])
                        views.append(piece)
                        self.pieces.append((index, piece, rows))
                        self.piece_start.append(a - off)
                    index += 1
                inner_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                     "params": views})
        self._reduced = False
        self.reducer: ShardReducer | None = None
        self.gather: ParameterGather | None = None
        if stage == 1:
            for u in self.units:
                u.buffer = torch.zeros(u.chunk * d, dtype=self.dtype, device=self.device)
            self._slots = [u.view(j) for u in self.units for j in range(len(u.params))]
            self._slot_params = [p for u in self.units for p in u.params]
            self._touched = torch.zeros(len(self._slots), dtype=torch.float32)
            for i, p in enumerate(self._slot_params):
                p.register_post_accumulate_grad_hook(
                    lambda _p, i=i: self._touched.__setitem__(i, 1))
                if p.grad is None:
                    p.grad = self._slots[i]
        else:
            names = {id(p): n for n, p in module.named_parameters()} if module is not None \
                else {}
            self.reducer = ShardReducer(self, passes, deferred, names)
        if stage == 3:
            self.gather = ParameterGather(self, module)
        self.inner = optimizer(inner_groups) if not isinstance(optimizer, type) \
            else optimizer(inner_groups, **kwargs)
        outer = [{**{k: v for k, v in ig.items() if k != "params"}, "params": g["params"]}
                 for ig, g in zip(self.inner.param_groups, groups, strict=True)]
        super().__init__(outer, self.inner.defaults)

    def _plan_units(self, params: list[nn.Parameter], module: nn.Module | None,
                    units: Iterable[str] | None, bucket_bytes: int, pipeline: Any,
                    ) -> tuple[list[list[nn.Parameter]], list[str | None]]:
        """The parameters of each unit (in the order the reducer launches them) and the unit's
        module name (None: no module)."""
        if self.stage == 1:
            return [params], [None]
        if self.stage == 2:
            order = params[::-1]  # backward produces gradients in about reverse order
            chunks = plan_buckets([p.numel() for p in order], bucket_bytes,
                                  order[0].element_size())
            return [[order[i] for i in c] for c in chunks], [None] * len(chunks)
        if pipeline is not None:
            units = pipeline_units(pipeline, units)
        return module_units(module, params, units)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Reduce-scatter the gradients (unless :meth:`reduce_gradients` already did), step
        this rank's shard, allgather the parameters (stage 3: free them until their next use).
        Collective over ``dp_comm``: every rank calls it, every step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        self.inner.step()
        self._reduced = False
        if self.gather is not None:
            self.gather.after_step()
        else:
            for u in self.units:
                u.start_gather(self.comm)
            for u in self.units:
                u.wait_gather()
        return loss

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Finish this step's gradient reduction now (``step`` then does not repeat it): the
        averaged gradient of this rank's shard is in ``grad_shard`` (and in the inner
        optimizer's ``.grad`` s), for :func:`hpcml.parallel.clip_grad_norm_`. Collective over
        ``dp_comm``; once per step."""
        if self._reduced:
            return
        if self.reducer is not None:
            self.reducer.synchronize()
            has_grad = [self.reducer.has_grad[id(p)] for p, _ in self.offsets]
        else:
            has_grad = self._stage1_reduce()
        for i, piece, rows in self.pieces:
            piece.grad = self.grad_shard[rows] if has_grad[i] else None
        self._reduced = True

    def _stage1_reduce(self) -> list[bool]:
        """Reduce-scatter the flat gradient buffer; which parameters have a gradient."""
        has_grad = self._touched.clone()
        for i, (p, slot) in enumerate(zip(self._slot_params, self._slots, strict=True)):
            if p.grad is None:
                slot.zero_()
                has_grad[i] = 0.0
            elif p.grad.is_sparse or p.grad.data_ptr() != slot.data_ptr():
                slot.copy_(p.grad.to_dense())  # replaced, e.g. set to None and made anew
                has_grad[i] = 1.0
            elif not has_grad[i] and bool(slot.any()):
                has_grad[i] = 1.0
        for u in self.units:
            shard = self.grad_shard[u.lo:u.lo + u.chunk]
            if self.comm.size > 1:
                self.comm.Reduce_scatter(u.buffer, shard)
            else:
                shard.copy_(u.buffer)
        if self.comm.size > 1:
            self.comm.Allreduce(has_grad, op="max")
        if self.average and self.comm.size > 1:
            self.grad_shard.div_(self.comm.size)
        flags = dict(zip(map(id, self._slot_params), has_grad.tolist(), strict=True))
        return [bool(flags[id(p)]) for p, _ in self.offsets]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Stage 1: zero the flat gradient buffer and make every ``param.grad`` its slot again
        (whatever ``set_to_none`` says: backward then accumulates in place, and ``step`` copies
        nothing). Stages 2, 3: every ``param.grad`` becomes None. Not collective."""
        self._reduced = False
        if self.stage == 1:
            self._touched.zero_()
            for u in self.units:
                u.buffer.zero_()
            for p, slot in zip(self._slot_params, self._slots, strict=True):
                p.grad = slot
        else:
            for p, _ in self.offsets:
                p.grad = None

    @property
    def grad_flat(self) -> torch.Tensor:
        """Stage 1: the flat gradient buffer backward accumulates into (its one unit's)."""
        if self.stage != 1:
            raise AttributeError("grad_flat exists at stage 1 only (stages 2, 3 free .grad)")
        return self.units[0].buffer

    def unshard(self, shard: torch.Tensor) -> list[torch.Tensor]:
        """Whole tensors, one per parameter (``params`` order, each shaped like it), from a
        vector laid out like this rank's shard (``param_shard``, ``grad_shard``, an
        element-wise state): one ``Allgather`` per unit. Collective over ``dp_comm``."""
        out: list[torch.Tensor | None] = [None] * len(self.offsets)
        index = {id(p): i for i, (p, _) in enumerate(self.offsets)}
        for u in self.units:
            full = torch.empty(u.chunk * self.comm.size, dtype=shard.dtype, device=shard.device)
            mine = shard[u.lo:u.lo + u.chunk].contiguous()
            if self.comm.size > 1:
                self.comm.Allgather(mine, full)
            else:
                full.copy_(mine)
            for p, off in zip(u.params, u.offsets, strict=True):
                out[index[id(p)]] = full[off:off + p.numel()].view(p.shape).clone()
        return out  # type: ignore[return-value]

    def param_bytes(self) -> int:
        """Peak bytes of parameters on this rank: all of them (stages 1, 2); this rank's chunks
        and the most gathered at once (stage 3). Not collective."""
        if self.gather is None:
            return sum(u.flat.numel() * u.flat.element_size() for u in self.units)
        return self.param_shard.numel() * self.param_shard.element_size() + \
            self.gather.peak_bytes

    def buffer_bytes(self) -> int:
        """Peak bytes this rank holds for the sharding beside the parameters and the
        ``.grad`` s: the gradient shard, the send buffer of a parameter Allgather, and the
        reduction buckets (stages 2, 3). Not collective."""
        total = 2 * self.grad_shard.numel() * self.grad_shard.element_size()
        if self.reducer is not None:
            total += self.reducer.memory.peak
        return total

    def state_bytes(self) -> int:
        """Bytes of optimizer state (tensors) held by this rank."""
        return sum(v.numel() * v.element_size() for s in self.inner.state.values()
                   for v in s.values() if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: the inner optimizer's state dict and the layout it belongs to."""
        return {"inner": self.inner.state_dict(),
                "layout": {"rank": self.comm.rank, "ranks": self.comm.size,
                           "numel": self.numel, "units": self._layout()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a shard saved by :meth:`state_dict` on the same rank of the same layout."""
        want = {"rank": self.comm.rank, "ranks": self.comm.size, "numel": self.numel,
                "units": self._layout()}
        if state_dict.get("layout") != want:
            raise UsageError(f"optimizer state shard has layout {state_dict.get('layout')}, "
                             f"this rank needs {want}; load the file this rank saved")
        self.inner.load_state_dict(state_dict["inner"])
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            outer.update({k: v for k, v in inner.items() if k != "params"})

    def _layout(self) -> list[int]:
        return [u.numel for u in self.units]

    def full_state_dict(self) -> dict[str, Any]:
        """The state dict the *unsharded* optimizer would have (torch's format, parameters
        numbered in ``params`` order): element-wise state gathered with one ``Allgather`` per
        state name, other state (Adam's step) taken from the rank owning the parameter's first
        piece. Collective over ``dp_comm``; every rank gets it. It loads into a plain
        ``optimizer(model.parameters())`` or, with :meth:`load_full_state_dict`, into a
        ``ShardedOptimizer`` of any D."""
        names: set[str] = set()
        scalars: dict[int, dict[str, Any]] = {}  # parameter index -> its non-element-wise state
        for i, piece, _ in self.pieces:
            if piece not in self.inner.state:
                continue
            own = scalars.setdefault(i, {})
            for k, v in self.inner.state[piece].items():
                if _elementwise(v, piece):
                    names.add(k)
                else:
                    own.setdefault(k, v)
        if self.comm.size > 1:
            names = set().union(*self.comm.allgather(names))
            merged: dict[int, dict[str, Any]] = {}
            for part in self.comm.allgather(scalars):
                for i, kv in part.items():
                    merged.setdefault(i, {}).update(kv)
            scalars = merged
        state: dict[int, dict[str, Any]] = {i: dict(kv) for i, kv in scalars.items()}
        for k in sorted(names):
            shard = torch.zeros_like(self.grad_shard)
            for _, piece, rows in self.pieces:
                v = self.inner.state.get(piece, {}).get(k)
                if v is not None:
                    shard[rows].copy_(v)
            for i, whole in enumerate(self.unshard(shard)):
                if i in state:
                    state[i][k] = whole
        groups, index = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(index, index + n))})
            index += n
        return {"state": state, "param_groups": groups}

    def load_full_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an unsharded optimizer's state dict (from :meth:`full_state_dict` at any D, or
        from the plain optimizer): each rank keeps the slices of its shard. Not collective."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise UsageError("optimizer state: its parameter groups do not match this "
                             "optimizer's; load the state of the same model and groups")
        for outer, saved in zip(self.param_groups, groups, strict=True):
            outer.update({k: v for k, v in saved.items() if k != "params"})
        saved_state = {int(i): v for i, v in state_dict["state"].items()}
        for (i, piece, rows), a in zip(self.pieces, self.piece_start, strict=True):
            p, _ = self.offsets[i]
            b = a + rows.stop - rows.start
            self.inner.state[piece] = {
                k: v.reshape(-1)[a:b].clone() if isinstance(v, torch.Tensor)
                and v.shape == p.shape else (v.clone() if isinstance(v, torch.Tensor) else v)
                for k, v in saved_state.get(i, {}).items()}


def _elementwise(value: Any, piece: torch.Tensor) -> bool:
    """State that holds one number per parameter element (not a scalar such as a step)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == piece.shape


def _check_params(params: list[Any]) -> None:
    if not params:
        raise UsageError("ShardedOptimizer got no parameters; pass model.parameters()")
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) > 1:
        raise UsageError(f"ShardedOptimizer needs parameters of one dtype and device, got "
                         f"{sorted(map(str, kinds))}; build one optimizer per dtype")
    if len({id(p) for p in params}) != len(params):
        raise UsageError("ShardedOptimizer: a parameter appears twice in params")
