"""Optimizer-state sharding, ZeRO stage 1 (Rajbhandari et al., arXiv 1910.02054; the "optimizer
state sharding" of the SageMaker model-parallelism library, arXiv 2111.05972 §3.4).

Every data-parallel rank keeps the whole model but only 1/D of the optimizer state. The
parameters are laid out in one flat buffer (padded to a multiple of D; each ``param.data``
becomes a view of it), cut into D equal shards. A step is:

1. the gradients, which backward accumulates straight into a flat buffer (each ``param.grad``
   is a view of it, as with torch DDP's ``gradient_as_bucket_view``), are ``Reduce_scatter``-ed
   (summed, then divided by D unless ``average=False``): rank r receives the averaged gradient
   of shard r only;
2. an *inner* optimizer, built from the user's optimizer class or factory over views of shard r
   (one view per parameter piece in the shard, in the user's parameter groups), steps it;
3. ``Allgather`` of the shards writes every rank's updated parameters into every rank's buffer.

Bytes per rank and step: gradients in = P (one Reduce_scatter of the padded buffer), parameters
out = P (one Allgather), the same volume as one ring Allreduce, while the optimizer state falls
from k P to k P / D (k = 2 tensors per parameter for Adam, 1 for SGD with momentum). Memory
beyond the parameters and their gradients: the reduced shard and an Allgather send buffer,
2 P / D (none at D = 1; a dense allreduce keeps a bucket copy of P).

Gradients: ``zero_grad()`` zeroes the flat buffer and points every ``param.grad`` at its slot
again (so ``param.grad`` is a zero tensor, not None, between steps). A parameter counts as
having a gradient in a step if backward accumulated into it, or its ``.grad`` holds non-zeros,
or ``.grad`` was replaced by another tensor (copied in at ``step``; a sparse one densified); one
whose ``.grad`` is None or untouched zeros on every rank is skipped, as the unsharded optimizer
skips a None gradient.

Clipping: backward leaves each rank's *unreduced* gradient in ``param.grad``, so
``torch.nn.utils.clip_grad_norm_`` before ``step`` clips the wrong norm (and each rank a
different one). Use :func:`hpcml.parallel.clip_grad_norm_` (optimizer, max_norm): it
reduce-scatters now (:meth:`ShardedOptimizer.reduce_gradients`), computes the global norm of
the averaged gradient over the shards and scales the shard that ``step`` then applies.

For element-wise optimizers (SGD, Adam, AdamW, RMSprop, Adagrad, ...) the result equals the
unsharded optimizer on the averaged gradient, up to float rounding. An optimizer that uses
per-tensor statistics (a norm over the whole parameter, as LAMB or LARS do) sees the piece of a
parameter that lies in its shard, not the whole parameter, and so computes something else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hpcml.comm import Communicator
from hpcml.errors import UsageError

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class ShardedOptimizer(torch.optim.Optimizer):
    """``optimizer(params, **kwargs)`` with its state sharded over ``dp_comm`` (ZeRO-1).

    ``optimizer`` is a ``torch.optim.Optimizer`` subclass (called as ``optimizer(groups,
    **kwargs)``) or a factory ``groups -> Optimizer``. ``params``: parameters or parameter
    groups as for any torch optimizer; all dense, of one dtype and device, and identical on
    every rank of ``dp_comm`` at construction (broadcast them first).

    It *is* a ``torch.optim.Optimizer``: ``zero_grad``, learning-rate schedulers (which edit
    ``param_groups``; the values reach the inner optimizer at every step) and hooks work.
    ``step`` is collective over ``dp_comm``. ``state_dict()`` is this rank's shard (save one file
    per rank); ``load_state_dict`` accepts only a shard of the same rank, D and layout.
    ``full_state_dict()`` / ``load_full_state_dict()`` convert to and from the unsharded
    optimizer's state dict, which moves between data-parallel degrees and to one process.
    """

    def __init__(self, params: Iterable[Any], optimizer: type[torch.optim.Optimizer]
                 | OptimizerFactory, dp_comm: Communicator, *, average: bool = True,
                 **kwargs: Any) -> None:
        groups = list(params)
        if not groups:
            raise UsageError("ShardedOptimizer got no parameters; pass model.parameters()")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        flat_params = [p for g in groups for p in g["params"]]
        _check_params(flat_params)
        self.comm, self.average = dp_comm, average
        d = dp_comm.size
        self.numel = sum(p.numel() for p in flat_params)
        self.shard_numel = math.ceil(self.numel / d)
        first = flat_params[0]
        self.flat = torch.zeros(self.shard_numel * d, dtype=first.dtype, device=first.device)
        self.grad_flat = torch.zeros_like(self.flat)
        # the reduced shard and the Allgather send buffer; with one rank the shard is the
        # whole flat gradient and nothing is sent
        self.grad_shard = torch.zeros(self.shard_numel, dtype=first.dtype, device=first.device) \
            if d > 1 else self.grad_flat
        self.send = torch.zeros_like(self.grad_shard) if d > 1 else self.grad_shard[:0]
        lo = dp_comm.rank * self.shard_numel
        hi = lo + self.shard_numel
        self.offsets: list[tuple[nn.Parameter, int]] = []
        self.pieces: list[tuple[int, nn.Parameter, slice]] = []  # (param index, view, grad rows)
        inner_groups = []
        offset = 0
        with torch.no_grad():
            for g in groups:
                views = []
                for p in g["params"]:
                    n = p.numel()
                    self.flat[offset:offset + n].copy_(p.reshape(-1))
                    p.data = self.flat[offset:offset + n].view_as(p)
                    a, b = max(offset, lo), min(offset + n, hi)
                    if a < b:
                        piece = nn.Parameter(self.flat[a:b])
                        views.append(piece)
                        self.pieces.append((len(self.offsets), piece, slice(a - lo, b - lo)))
                    self.offsets.append((p, offset))
                    offset += n
                inner_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                     "params": views})
        self._slots = [self.grad_flat[off:off + p.numel()].view_as(p) for p, off in self.offsets]
        self._touched = torch.zeros(len(self.offsets), dtype=torch.float32)
        self._reduced = False
        for i, (p, _) in enumerate(self.offsets):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._touched.__setitem__(i, 1))
            if p.grad is None:
                p.grad = self._slots[i]
        self.inner = optimizer(inner_groups) if not isinstance(optimizer, type) \
            else optimizer(inner_groups, **kwargs)
        outer = [{**{k: v for k, v in ig.items() if k != "params"}, "params": g["params"]}
                 for ig, g in zip(self.inner.param_groups, groups, strict=True)]
        super().__init__(outer, self.inner.defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Reduce-scatter the gradients (unless :meth:`reduce_gradients` already did), step
        this rank's shard, allgather the parameters. Collective over ``dp_comm``: every rank
        calls it, every step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        self.inner.step()
        self._reduced = False
        if self.comm.size > 1:
            lo = self.comm.rank * self.shard_numel
            self.send.copy_(self.flat[lo:lo + self.shard_numel])
            self.comm.Allgather(self.send, self.flat)
        return loss

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter this step's gradients now (``step`` then does not repeat it): the
        averaged gradient of this rank's shard is in ``grad_shard`` (and in the inner
        optimizer's ``.grad`` s), for :func:`hpcml.parallel.clip_grad_norm_`. Collective over
        ``dp_comm``; once per step."""
        if self._reduced:
            return
        has_grad = self._touched.clone()
        for i, ((p, _), slot) in enumerate(zip(self.offsets, self._slots, strict=True)):
            if p.grad is None:
                slot.zero_()
                has_grad[i] = 0.0
            elif p.grad.is_sparse or p.grad.data_ptr() != slot.data_ptr():
                slot.copy_(p.grad.to_dense())  # replaced, e.g. set to None and made anew
                has_grad[i] = 1.0
            elif not has_grad[i] and bool(slot.any()):
                has_grad[i] = 1.0
        if self.comm.size > 1:
            self.comm.Reduce_scatter(self.grad_flat, self.grad_shard)
            self.comm.Allreduce(has_grad, op="max")
        if self.average and self.comm.size > 1:
            self.grad_shard.div_(self.comm.size)
        for i, piece, rows in self.pieces:
            piece.grad = self.grad_shard[rows] if has_grad[i] else None
        self._reduced = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer and make every ``param.grad`` its slot again (whatever
        ``set_to_none`` says: backward then accumulates in place, and ``step`` copies nothing).
        Not collective."""
        self.grad_flat.zero_()
        self._touched.zero_()
        self._reduced = False
        for (p, _), slot in zip(self.offsets, self._slots, strict=True):
            p.grad = slot

    def state_bytes(self) -> int:
        """Bytes of optimizer state (tensors) held by this rank."""
        return sum(v.numel() * v.element_size() for s in self.inner.state.values()
                   for v in s.values() if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: the inner optimizer's state dict and the layout it belongs to."""
        return {"inner": self.inner.state_dict(),
                "layout": {"rank": self.comm.rank, "ranks": self.comm.size,
                           "numel": self.numel}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a shard saved by :meth:`state_dict` on the same rank of the same layout."""
        want = {"rank": self.comm.rank, "ranks": self.comm.size, "numel": self.numel}
        if state_dict.get("layout") != want:
            raise UsageError(f"optimizer state shard has layout {state_dict.get('layout')}, "
                             f"this rank needs {want}; load the file this rank saved")
        self.inner.load_state_dict(state_dict["inner"])
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            outer.update({k: v for k, v in inner.items() if k != "params"})


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
            full = torch.empty_like(self.flat)
            if self.comm.size > 1:
                self.comm.Allgather(shard, full)
            else:
                full.copy_(shard)
            for i, (p, off) in enumerate(self.offsets):
                if i in state:
                    state[i][k] = full[off:off + p.numel()].view_as(p).clone()
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
        lo = self.comm.rank * self.shard_numel
        saved_state = {int(i): v for i, v in state_dict["state"].items()}
        for i, piece, rows in self.pieces:
            p, off = self.offsets[i]
            a, b = rows.start + lo - off, rows.stop + lo - off
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
