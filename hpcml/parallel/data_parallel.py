"""The one gradient-reduction mechanism of data parallelism (arXiv 1905.04035; Horovod's
``DistributedOptimizer`` and torch DDP work the same way).

:class:`GradientReducer` leaves in every ``param.grad`` the average (or sum) over the ranks of a
communicator of the ranks' gradients. A :class:`~hpcml.parallel.reductions.Reduction` decides
only *how* each tensor travels:

- **fused dense allreduce**: parameters sit in fused buckets (:mod:`hpcml.parallel.buckets`, one
  set per dtype). A ``register_post_accumulate_grad_hook`` on each parameter copies its gradient
  into its bucket slot the moment autograd finishes it on the *last* of the declared
  ``passes`` backward passes, divided by P on the way when averaging over a power-of-two P
  (exact, as torch DDP divides while copying: no pass over the reduced bucket,
  :meth:`GradientReducer._fill_scale`; earlier passes accumulate in ``param.grad`` as usual; a
  sparse gradient is densified; with the ``module`` given, a sparse parameter's gradient is
  densified use by use as autograd computes it, :mod:`hpcml.parallel.uses`, instead of after
  autograd concatenated the uses, and its ``.grad`` stays None until :meth:`synchronize`), and
  a bucket whose slots are all filled is reduced with a non-blocking ``Iallreduce`` while
  backward goes on. Buckets are launched in index order only, so every rank
  posts the same collectives in the same order. At :meth:`GradientReducer.synchronize` the
  slots backward left empty (parameters with no gradient on the last pass: unused branches,
  parameters used only in earlier micro-batches) are filled from ``param.grad``, or with zeros
  when there is none, and the remaining buckets are launched, so all ranks still post the same
  collectives. A parameter that has no ``.grad`` on *any* rank keeps ``grad = None`` (one small
  allreduce of "has a gradient" flags per step decides), so the wrapped optimizer skips it
  exactly as it would in a single process.
- **per-tensor exchange** for the parameters a strategy keeps out of the buckets (sparse
  gradients): at ``synchronize``, in the order given, by sparse allgather or by a dense
  allreduce of its own buffer, chosen per step by :meth:`Reduction.choose` from the largest
  number of sparse rows on any rank (a collective value, so all ranks choose alike).

Correctness rules enforced rather than assumed: a gradient arriving more often than the declared
``passes`` raises in a hook that runs *before* autograd accumulates it (``param.grad`` may be a
view of a bucket an ``Iallreduce`` owns, e.g. after ``zero_grad(set_to_none=False)``), so the
step's reduction stays exact when the error is caught; backward inside
:meth:`GradientReducer.no_sync` accumulates locally without communication, and raises when the
exchange of the step has already begun. Exchange memory (:class:`ExchangeMemory`) counts the bytes
of every buffer allocated for the exchange; ``peak`` is the per-rank high-water mark.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from hpcml.comm import Communicator, Request
from hpcml.parallel.buckets import Bucket, build_buckets
from hpcml.parallel.memory import ExchangeMemory
from hpcml.parallel.reductions import ALLGATHER, Reduction
from hpcml.parallel.sparse import add_into, allgather_sparse, densify_into
from hpcml.parallel.uses import UseTaps


class GradientReducer:
    """Data-parallel gradient reduction over ``comm`` (see module docstring).

    ``params``: ``(name, parameter)`` pairs in the order backward is expected to produce their
    gradients (reverse registration order), identical on every rank; ``sparse``: ids of the
    parameters whose gradient is a sparse COO tensor. Collective use: every rank builds it for
    the same parameters, runs backward and calls :meth:`synchronize` once per step.
    ``on_choice(name, method)`` is called whenever a per-tensor method changes (for logging).
    ``predivide`` (with ``average``): fused gradients are divided by it before the sum and the
    sum by ``size / predivide`` after (Horovod's ``gradient_predivide_factor``). ``wire_dtype``:
    floating-point gradients travel in this dtype (Horovod's ``Compression.fp16``) and come back
    in their parameter's dtype. ``buckets``: a ready layout instead of :func:`build_buckets`
    (ZeRO's units, :class:`~hpcml.parallel.zero.ShardReducer`, which also overrides how a
    bucket is filled, posted and delivered: :meth:`_fill`, :meth:`_post`, :meth:`_deliver`).
    ``module``: the model whose forward uses the parameters; given, each use's gradient of a
    fused sparse parameter is added into its bucket slot where autograd computes it (see
    :meth:`_take_use`)."""

    def __init__(self, comm: Communicator, params: Sequence[tuple[str, torch.Tensor]],
                 reduction: Reduction, *, bucket_bytes: int = 2**20,
                 sparse: frozenset[int] = frozenset(), passes: int = 1, average: bool = True,
                 on_choice: Callable[[str, str], None] | None = None,
                 predivide: float = 1.0, wire_dtype: torch.dtype | None = None,
                 buckets: list[Bucket] | None = None, module: nn.Module | None = None) -> None:
        if passes < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {passes}")
        self.comm, self.reduction, self.on_choice = comm, reduction, on_choice
        self.passes, self.average, self.predivide = passes, average, predivide
        size = comm.size
        # Averaging over a power-of-two P: divide while writing the slots (exact, see
        # _fill_scale), as DDP does, instead of a pass over every reduced bucket.
        self._prescale = (1.0 / size if average and predivide == 1.0 and size > 1
                          and size & (size - 1) == 0 else 1.0)
        self.memory = ExchangeMemory()
        self.params = list(params)
        self.names = {id(p): n for n, p in params}
        fused = [p for _, p in params if reduction.fused(id(p) in sparse)]
        fused_ids = {id(p) for p in fused}
        self.separate = [(n, p) for n, p in params if id(p) not in fused_ids]
        self.buckets: list[Bucket] = buckets if buckets is not None else \
            build_buckets(fused, bucket_bytes, wire_dtype)
        self._slot = {id(p): (b, j) for b, bucket in enumerate(self.buckets)
                      for j, p in enumerate(bucket.params)}
        for bucket in self.buckets:
            self.memory.alloc(bucket.buffer.nbytes)
        self.choices: dict[str, str] = {}
        self._solo: dict[str, torch.Tensor] = {}
        self._count = {id(p): 0 for _, p in params}
        self._next = 0
        self._started = False
        self._pending = False
        self._skip = False
        self.synchronized = False
        self._handles = [h for _, p in params for h in (
            p.register_hook(functools.partial(self._before_grad, p)),
            p.register_post_accumulate_grad_hook(self._on_grad))]
        tapped = [p for _, p in params if id(p) in sparse and id(p) in self._slot
                  and self._bucket_of(p).buffer.dtype == p.dtype]
        self._taps = (UseTaps(module, tapped, self._take_use)
                      if module is not None and tapped else None)
        self._taking: dict[int, tuple[int, bool]] = {}  # id -> (backward pass, taking its uses)
        self._taken: set[int] = set()  # ids whose local gradient this step is in their slot

    @property
    def posted(self) -> int:
        """Buckets whose reduction has been posted in the current step."""
        return self._next

    @property
    def pending(self) -> bool:
        """True between the first counted backward pass of a step and :meth:`synchronize`."""
        return self._pending

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        if self._taps is not None:
            self._taps.remove()

    def _bucket_of(self, p: torch.Tensor) -> Bucket:
        return self.buckets[self._slot[id(p)][0]]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate into ``param.grad`` without communication and do
        not count towards ``passes``; the next counted pass reduces the accumulated sum."""
        previous, self._skip = self._skip, True
        try:
            yield
        finally:
            self._skip = previous

    def _before_grad(self, p: torch.Tensor, _grad: torch.Tensor) -> None:
        """Runs before autograd accumulates into ``p.grad`` (which may be a view of a bucket
        that an ``Iallreduce`` owns): a pass the step cannot take raises here, so nothing is
        written into a buffer MPI owns and the step's reduction stays exact."""
        name = self.names[id(p)]
        if self._skip:
            if self._started:
                raise RuntimeError(f"backward inside no_sync() after the exchange of this step "
                                   f"began (parameter {name!r} already reduced); run the "
                                   "no_sync() passes before the last counted pass")
            return
        count = self._count[id(p)] + 1
        if count > self.passes:
            raise RuntimeError(f"parameter {name!r} got a gradient {count} times before step(), "
                               f"but backward_passes_per_step = {self.passes}; declare the "
                               "number of micro-batches per step, wrap the extra passes in "
                               "no_sync(), or call step() after every pass")

    def _take_use(self, p: torch.Tensor, grad: torch.Tensor) -> bool:
        """Add one use's gradient of fused sparse ``p`` into its bucket slot (True), or leave it
        to autograd (False). A backward pass takes all of its uses of ``p`` or none, decided at
        the first: it takes them when it is the step's only counted pass (``passes == 1``, not
        in :meth:`no_sync`, not building a graph of the gradient) and ``p.grad`` is None, so
        the slot then holds exactly what ``p.grad`` would (whatever autograd still brings is
        added in :meth:`_on_grad`)."""
        pass_id = torch._C._current_graph_task_id()
        decided = self._taking.get(id(p))
        b, j = self._slot[id(p)]
        bucket = self.buckets[b]
        if decided is None or decided[0] != pass_id:
            taking = (not torch.is_grad_enabled()  # not a backward(create_graph=True)
                      and not self._skip and self.passes == 1 and self._count[id(p)] == 0
                      and p.grad is None and j not in bucket.filled and bucket.request is None)
            decided = self._taking[id(p)] = (pass_id, taking)
            if taking:  # the first use writes the slot, the others add to it
                densify_into(grad, bucket.view(j).view(-1), self._fill_scale(bucket))
                return True
        if decided[1]:
            add_into(grad, bucket.view(j), self._fill_scale(bucket))
        return decided[1]

    def _on_grad(self, p: torch.Tensor) -> None:
        decided = self._taking.pop(id(p), None)  # a pass that ended in an error left one
        taken = decided == (torch._C._current_graph_task_id(), True)
        if self._skip:
            self.synchronized = False  # a step() now reduces what accumulated
            return
        count = self._count[id(p)] + 1
        self._count[id(p)] = count
        self._pending = True
        self.synchronized = False
        if count < self.passes:
            return
        self._started = True
        slot = self._slot.get(id(p))
        if slot is None:
            return
        bucket = self.buckets[slot[0]]
        if taken:  # the slot holds the uses' sum; add what autograd still summed
            if p.grad is not None:
                add_into(p.grad, bucket.view(slot[1]), self._fill_scale(bucket))
                p.grad = None
            self._taken.add(id(p))
        else:
            self._fill(bucket, slot[1], p.grad)
        bucket.filled.add(slot[1])
        self._launch_ready()

    def _fill(self, bucket: Bucket, j: int, grad: torch.Tensor | None) -> None:
        """Write ``grad`` times :meth:`_fill_scale` (zeros when None) into slot ``j``."""
        if grad is None:
            bucket.view(j).zero_()
        else:
            densify_into(grad, bucket.view(j).view(-1), self._fill_scale(bucket))

    def _fill_scale(self, bucket: Bucket) -> float:
        """The factor every gradient is multiplied by as it is written into ``bucket``'s slots:
        ``1 / P`` when averaging over a power-of-two number P of ranks (no ``predivide``) and
        the bucket is floating point but not float16 (which :meth:`_predivide` handles), else
        1. Dividing by a power of two is exact and commutes with every rounding of the sum, so
        the result is bit for bit the sum divided by P afterwards (except where an entry falls
        below float32's normal range, ~1e-38 x P) and no pass over the reduced bucket is
        needed; for other P the division stays after the sum (:meth:`_deliver`)."""
        dtype = bucket.buffer.dtype
        return self._prescale if dtype.is_floating_point and dtype != torch.float16 else 1.0

    def _post(self, bucket: Bucket) -> Request:
        """Start the reduction of a filled bucket (collective, in bucket order)."""
        return self.comm.Iallreduce(bucket.buffer)

    def _deliver(self, bucket: Bucket) -> None:
        """After the bucket's reduction: the averaged gradient into its parameters' ``.grad``."""
        divisor = self.comm.size / self.predivide
        if (self.average and not self._predivide(bucket) and self._fill_scale(bucket) == 1.0
                and divisor != 1.0):
            bucket.buffer.div_(divisor)
        for j, p in enumerate(bucket.params):
            view = bucket.view(j)
            p.grad = view if view.dtype == p.dtype else view.to(p.dtype)

    def _used(self, p: torch.Tensor) -> bool:
        """Whether ``p`` got a gradient in this step on this rank."""
        return p.grad is not None

    def _unused(self, p: torch.Tensor) -> None:
        """``p`` got no gradient on any rank in this step."""
        p.grad = None

    def _predivide(self, bucket: Bucket) -> bool:
        """float16 buckets are averaged *before* the sum (as torch DDP does): the float32 sum
        is written back in float16, which overflows at 65504 (bfloat16 has float32's range)."""
        return self.average and bucket.buffer.dtype == torch.float16

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if len(bucket.filled) < len(bucket.params):
                if not force:
                    return
                for j, p in enumerate(bucket.params):
                    if j not in bucket.filled:
                        self._fill(bucket, j, p.grad)
            if self._predivide(bucket):
                bucket.buffer.div_(self.comm.size)
            elif self.predivide != 1.0:
                bucket.buffer.div_(self.predivide)
            bucket.request = self._post(bucket)
            self._next += 1

    def _exchange_separate(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The reduced gradient of ``p`` by the strategy's choice (collective)."""
        size = self.comm.size
        grad = p.grad
        if grad is None:
            grad = torch.sparse_coo_tensor(
                torch.zeros((1, 0), dtype=torch.long, device=p.device),
                torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device), p.shape,
                check_invariants=False)
        nnz = grad._nnz() if grad.is_sparse else p.shape[0]
        nnz_max = int(self.comm.allreduce(nnz, op="max"))
        row_bytes = p[0].numel() * p.element_size()
        method = self.reduction.choose(nnz_max, p.shape[0], row_bytes, size)
        if self.choices.get(name) != method:
            self.choices[name] = method
            if self.on_choice is not None:
                self.on_choice(name, method)
        if method == ALLGATHER:
            total = allgather_sparse(self.comm, grad if grad.is_sparse else grad.to_sparse(1),
                                     self.memory).to_dense()
        else:
            total = self._solo.get(name)
            if total is None:
                total = self._solo[name] = torch.zeros(p.numel(), dtype=p.dtype,
                                                       device=p.device)
                self.memory.alloc(total.nbytes)
            densify_into(grad, total)
            self.comm.Allreduce(total)
            total = total.view(p.shape)
        return total.div(size) if self.average else total

    def synchronize(self) -> None:
        """Finish the exchange of this step: launch what backward has not, exchange the
        separate tensors, wait, and leave the reduced gradient in every ``param.grad`` (a view
        of its bucket for fused parameters, same dtype and device as the parameter).
        Collective; afterwards a new step's passes may begin."""
        params = [p for _, p in self.params]
        used = torch.tensor([id(p) in self._taken or self._used(p) for p in params],
                            dtype=torch.int32)
        self._launch_ready(force=True)
        used_request = self.comm.Iallreduce(used)
        results = [(p, self._exchange_separate(name, p)) for name, p in self.separate]
        for bucket in self.buckets:
            bucket.request.wait()
            self._deliver(bucket)
            bucket.filled.clear()
            bucket.request = None
        for p, grad in results:
            p.grad = grad
        used_request.wait()
        for p, anywhere in zip(params, used.tolist(), strict=True):
            if not anywhere:
                self._unused(p)
        self._next = 0
        self._count = dict.fromkeys(self._count, 0)
        self._taken.clear()
        self._started = self._pending = False
        self.synchronized = True
