"""``ProcessGroupHpcml``: torch's ProcessGroup interface over one hpcml.comm communicator.

Every method starts hpcml non-blocking operations (so every byte goes through hpcml.comm: the
ledger counts it and the watchdog watches its wait) and returns an :class:`HpcmlWork`. Methods
take torch's arguments: lists of one tensor (torch's single-device convention), ranks of this
group, option objects. They are collective over the group in torch's sense: every rank of the
group calls the same collectives in the same order (``send``/``recv`` excepted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from time import monotonic, sleep
from typing import Any

import torch
import torch.distributed as dist

from hpcml.comm import ANY_SOURCE, Communicator, Request
from hpcml.comm.watchdog import current_timeout
from hpcml.distributed.ops import cpu, mpi_op, overlaps, readable, writable
from hpcml.distributed.work import HpcmlWork

BACKEND = "hpcml"
MONITOR_TAG = 32767  # monitored_barrier's tag (MPI guarantees tags up to 32767)
Steps = list[Callable[[], Any]]


def _copy_out(flat: torch.Tensor, outputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """The step that copies consecutive pieces of ``flat`` into ``outputs``."""
    def step() -> None:
        start = 0
        for out in outputs:
            out.copy_(flat[start:start + out.numel()].view(out.shape))
            start += out.numel()
    return step


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([readable(t).reshape(-1) for t in tensors])


class ProcessGroupHpcml(dist.ProcessGroup):
    """A torch process group whose collectives run on ``comm`` (its rank and size are the
    group's). Made by ``init_process_group("hpcml")`` and ``new_group`` (see
    :mod:`hpcml.distributed`), rarely by hand."""

    def __init__(self, comm: Communicator, timeout: timedelta | None = None) -> None:
        super().__init__(comm.rank, comm.size)
        self.comm = comm
        self.timeout = timeout
        self._group_name = self._group_desc = ""

    # torch's names: the base class would look these up in a C++ backend, which this group has
    # none of (it is its own backend)
    def getBackendName(self) -> str:  # noqa: N802
        return BACKEND

    def getGroupName(self) -> str:  # noqa: N802
        return self._group_name

    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._group_name = name

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._group_desc = desc

    def __repr__(self) -> str:
        comm = self.comm
        return f"ProcessGroupHpcml({comm.name!r}, rank={comm.rank}, size={comm.size})"

    # -- reductions --------
    def _reduction(self, tensor: torch.Tensor, op: Any, start: Callable[[torch.Tensor, str],
                   Request], steps: Steps, requests: list[Request], apply: bool = True) -> None:
        """Start ``start(buffer, op_name)`` on a writable buffer of ``tensor``; queue the copy
        back and, for AVG where ``apply``, the division."""
        name, average = mpi_op(op, tensor.dtype)
        buf, back = writable(tensor)
        requests.append(start(buf, name))
        steps += back
        if average and apply:
            steps.append(lambda: tensor.div_(self.comm.size))

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> HpcmlWork:
        op = dist.ReduceOp.SUM if opts is None else opts.reduceOp
        requests: list[Request] = []
        steps: Steps = []
        for t in tensors:
            self._reduction(t, op, lambda b, name: self.comm.Iallreduce(b, name), steps, requests)
        return HpcmlWork(requests, steps, tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> HpcmlWork:
        return self.allreduce(tensors, opts)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> HpcmlWork:
        root = opts.rootRank
        requests: list[Request] = []
        steps: Steps = []
        for t in tensors:
            self._reduction(t, opts.reduceOp, lambda b, name: self.comm.Ireduce(b, root, name),
                            steps, requests, apply=self.comm.rank == root)
        return HpcmlWork(requests, steps, tensors)

    def _reduce_scatter_into(self, output: torch.Tensor, flat: torch.Tensor,
                             counts: list[int] | None, op: Any, requests: list[Request],
                             steps: Steps) -> None:
        cpu(output)
        self._reduction(output, op, lambda b, name: self.comm.Ireduce_scatter(
            flat, b, counts, name), steps, requests)

    def reduce_scatter(self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]],
                       opts: Any) -> HpcmlWork:
        requests: list[Request] = []
        steps: Steps = []
        for out, inputs in zip(outputs, input_lists, strict=True):
            self._reduce_scatter_into(out, _flat(inputs), [t.numel() for t in inputs],
                                      opts.reduceOp, requests, steps)
        return HpcmlWork(requests, steps, outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                              opts: Any = None) -> HpcmlWork:
        op = dist.ReduceOp.SUM if opts is None else opts.reduceOp
        requests: list[Request] = []
        steps: Steps = []
        self._reduce_scatter_into(output, readable(input), None, op, requests, steps)
        return HpcmlWork(requests, steps, [output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor],
                                        opts: Any = None) -> HpcmlWork:
        op = dist.ReduceOp.SUM if opts is None else opts.reduceOp
        requests: list[Request] = []
        steps: Steps = []
        for out, inp in zip(outputs, inputs, strict=True):
            self._reduce_scatter_into(out, readable(inp), None, op, requests, steps)
        return HpcmlWork(requests, steps, outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # -- data movement --------
    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> HpcmlWork:
        requests: list[Request] = []
        steps: Steps = []
        for t in tensors:
            buf, back = writable(t)
            requests.append(self.comm.Ibcast(buf, opts.rootRank))
            steps += back
        return HpcmlWork(requests, steps, tensors)

    def _gather_into(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                     requests: list[Request], steps: Steps) -> None:
        """All-gather ``input`` into ``output`` (``size`` blocks, this rank's at ``rank``)."""
        buf, back = writable(output)
        block = buf.reshape(-1).narrow(0, self.comm.rank * input.numel(), input.numel()) \
            if buf.numel() == input.numel() * self.comm.size else None
        cpu(input)
        if block is not None and block.data_ptr() == input.data_ptr() and input.is_contiguous():
            send = None  # FSDP2's all-gather: the input already sits in its block (in place)
        else:
            send = input.contiguous()
            if overlaps(send, buf):
                send = send.clone()
        requests.append(self.comm.Iallgather(send, buf))
        steps += back

    def allgather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                  opts: Any = None) -> HpcmlWork:
        requests: list[Request] = []
        steps: Steps = []
        for outputs, inp in zip(output_lists, inputs, strict=True):
            if any(o.numel() != inp.numel() for o in outputs):
                raise ValueError("hpcml backend: allgather needs every output tensor the size of "
                                 "the input; pad the tensors to one size")
            flat = torch.empty(inp.numel() * self.comm.size, dtype=inp.dtype)
            self._gather_into(flat, inp, requests, steps)
            steps.append(_copy_out(flat, [cpu(o) for o in outputs]))
        return HpcmlWork(requests, steps, [o for outs in output_lists for o in outs])

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            inputs: list[torch.Tensor], opts: Any = None) -> HpcmlWork:
        """``output_lists[r][i]`` receives rank r's ``inputs[i]`` (torch's coalesced form)."""
        by_input = [[outputs[i] for outputs in output_lists] for i in range(len(inputs))]
        return self.allgather(by_input, inputs, opts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          opts: Any = None) -> HpcmlWork:
        requests: list[Request] = []
        steps: Steps = []
        self._gather_into(output, input, requests, steps)
        return HpcmlWork(requests, steps, [output])

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor],
                                    inputs: list[torch.Tensor], opts: Any = None) -> HpcmlWork:
        requests: list[Request] = []
        steps: Steps = []
        for out, inp in zip(outputs, inputs, strict=True):
            self._gather_into(out, inp, requests, steps)
        return HpcmlWork(requests, steps, outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def gather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
               opts: Any) -> HpcmlWork:
        root, inp = opts.rootRank, readable(inputs[0])
        if self.comm.rank != root:
            return HpcmlWork([self.comm.Igather(inp, None, root)], [], [])
        outputs = [cpu(o) for o in output_lists[0]]
        flat = torch.empty(inp.numel() * self.comm.size, dtype=inp.dtype)
        return HpcmlWork([self.comm.Igather(inp, flat, root)], [_copy_out(flat, outputs)],
                         outputs)

    def scatter(self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]],
                opts: Any) -> HpcmlWork:
        root = opts.rootRank
        buf, back = writable(outputs[0])
        flat = _flat(input_lists[0]) if self.comm.rank == root else None
        return HpcmlWork([self.comm.Iscatter(flat, buf, root)], back, outputs)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          output_splits: list[int], input_splits: list[int],
                          opts: Any = None) -> HpcmlWork:
        """Rows (dim 0) ``input_splits[j]`` go to rank j, ``output_splits[i]`` come from rank i;
        empty splits mean equal ones."""
        buf, back = writable(output)
        src = readable(input)
        size = self.comm.size

        def counts(t: torch.Tensor, splits: list[int]) -> list[int]:
            row = t.numel() // t.shape[0] if t.dim() and t.shape[0] else 0
            return [int(s) * row for s in splits] if len(splits) else [t.numel() // size] * size

        request = self.comm.Ialltoallv(src, buf, counts(src, input_splits),
                                       counts(buf, output_splits))
        return HpcmlWork([request], back, [output])

    alltoall_base = all_to_all_single

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                 opts: Any = None) -> HpcmlWork:
        outputs = [cpu(o) for o in outputs]
        flat_out = torch.empty(sum(o.numel() for o in outputs), dtype=outputs[0].dtype)
        request = self.comm.Ialltoallv(_flat(inputs), flat_out, [t.numel() for t in inputs],
                                       [o.numel() for o in outputs])
        return HpcmlWork([request], [_copy_out(flat_out, outputs)], outputs)

    # -- point to point --------
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> HpcmlWork:
        bufs = [readable(t) for t in tensors]
        return HpcmlWork([self.comm.Isend(b, dst, tag) for b in bufs], [], tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> HpcmlWork:
        requests: list[Request] = []
        steps: Steps = []
        for t in tensors:
            buf, back = writable(t)
            requests.append(self.comm.Irecv(buf, src, tag))
            steps += back
        return HpcmlWork(requests, steps, tensors)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> HpcmlWork:
        return self.recv(tensors, ANY_SOURCE, tag)

    # -- synchronisation --------
    def barrier(self, opts: Any = None) -> HpcmlWork:
        return HpcmlWork([self.comm.Ibarrier()], [], [])

    def monitored_barrier(self, timeout: timedelta | float | None = None,
                          wait_all_ranks: bool = False) -> None:
        """A barrier that raises ``RuntimeError`` naming the ranks that did not reach it within
        ``timeout`` (default: hpcml's watchdog timeout, else the group's) instead of waiting
        for them: every rank reports to rank 0, which answers once all did. Names the first
        missing rank, or all of them with ``wait_all_ranks``. Collective over the group."""
        seconds = _seconds(timeout) or current_timeout() or _seconds(self.timeout) or 1800.0
        deadline = monotonic() + seconds
        comm, token = self.comm, torch.zeros(1, dtype=torch.uint8)
        if comm.rank != 0:
            comm.Isend(token, 0, MONITOR_TAG).wait()
            ack = comm.Irecv(torch.zeros(1, dtype=torch.uint8), 0, MONITOR_TAG)
            if not _poll([ack], deadline):
                ack.cancel()
                raise RuntimeError(f"hpcml: monitored_barrier: rank 0 did not release rank "
                                   f"{comm.rank} within {seconds:g} s")
            return
        arrivals = {r: comm.Irecv(torch.zeros(1, dtype=torch.uint8), r, MONITOR_TAG)
                    for r in range(1, comm.size)}
        if not _poll(list(arrivals.values()), deadline):
            missing = [r for r, req in arrivals.items() if req.test() is None]
            for req in arrivals.values():
                req.cancel()
            named = missing if wait_all_ranks else missing[:1]
            raise RuntimeError(f"hpcml: monitored_barrier: rank(s) {named} did not reach the "
                               f"barrier within {seconds:g} s")
        for r in range(1, comm.size):
            comm.Isend(token, r, MONITOR_TAG).wait()


def _seconds(timeout: timedelta | float | None) -> float | None:
    if timeout is None:
        return None
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


def _poll(requests: list[Request], deadline: float) -> bool:
    """True once every request completed, False at ``deadline``. Unwatched on purpose: the
    caller reports its own timeout, which may be the watchdog's."""
    while True:
        if all(r.test() is not None for r in requests):
            return True
        if monotonic() >= deadline:
            return False
        sleep(1e-3)
