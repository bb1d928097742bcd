"""``hpcml bench collectives``: hpcml.comm against raw mpi4py on the same buffers, same run.

For each operation and message size the paths take turns call by call, each going first equally
often (so drift in machine load and cache warmth hit all alike); each rank takes the median time
per path and the slowest rank's median is reported.

What raw mpi4py gets: the same buffers, a torch tensor as the numpy view ``t.numpy()`` made once
before timing. That is the fastest way to hand mpi4py a tensor that a program keeps (passing the
tensor itself goes through DLPack: ~8 µs more per 4 KiB Allreduce here), so ``ratio`` (hpcml
speed / this peer's) is the strict comparison. Programs whose tensors are new every step
(activations, gradients) have to make the view in every call; for torch buffers that third path
is timed too (``raw_view_us``, ``ratio_view``), as context, never as the goal's peer.

Sizes follow the nccl-tests convention: Allreduce = vector size, Allgather = gathered (output)
size, Reduce_scatter = input size. Bus bandwidth = size / time x (2(P-1)/P for Allreduce, (P-1)/P
for Allgather and Reduce_scatter), which is comparable across P; at P = 1 it is 0 and only the
algorithm bandwidth (size / time) is meaningful. ``SendRecv`` is a ping-pong between ranks 2i and
2i+1 (a blocking ``Send`` answered by a blocking ``Recv`` and back; an odd last rank idles): its
time is the round trip, its bus bandwidth 2 x size / time (one message each way), and it needs at
least 2 ranks. A memcpy of the same size on one core is the local reference.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from hpcml.bench.report import human_bytes, markdown_table, median, pyplot, save_figure
from hpcml.comm import Communicator
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext

OPS = ("Allreduce", "Allgather", "Reduce_scatter", "SendRecv")
BUS_FACTOR = {"Allreduce": lambda p: 2 * (p - 1) / p, "Allgather": lambda p: (p - 1) / p,
              "Reduce_scatter": lambda p: (p - 1) / p, "SendRecv": lambda p: 2.0}


@dataclasses.dataclass
class CollectivesConfig(JobConfig):
    ops: list[str] = option(list(OPS), choices=OPS, help="collectives to time")
    buffers: list[str] = option(["numpy", "torch"], choices=("numpy", "torch"),
                                help="buffer types to time")
    min_bytes: int = option(4, min=4, help="smallest message (bytes)")
    max_bytes: int = option(64 * 2**20, min=4, help="largest message (bytes)")
    step: int = option(4, min=2, help="size multiplier between messages")
    iterations: int = option(30, min=1, help="timed calls per path at small sizes")
    bytes_per_size: int = option(1 * 2**30, min=2**20,
                                 help="cap on bytes moved per size and path (fewer calls at "
                                      "large sizes)")
    warmup: int = option(3, min=0, help="untimed calls per path before timing")

    def check(self, size: int) -> None:
        if self.max_bytes < self.min_bytes:
            raise ConfigError("max_bytes", f"{self.max_bytes} < min_bytes {self.min_bytes}",
                              "make max_bytes >= min_bytes")


def _sizes(cfg: CollectivesConfig, ranks: int) -> list[int]:
    """Message sizes in bytes, each divisible into float32 elements for every rank."""
    quantum = 4 * ranks
    out, n = [], cfg.min_bytes
    while n <= cfg.max_bytes:
        out.append(max(quantum, n // quantum * quantum))
        n *= cfg.step
    return sorted(set(out))


def _buffers(op: str, nbytes: int, ranks: int, kind: str) -> tuple[Any, Any]:
    n = nbytes // 4
    send_n = {"Allreduce": n, "Allgather": n // ranks, "Reduce_scatter": n, "SendRecv": n}[op]
    recv_n = {"Allreduce": n, "Allgather": n, "Reduce_scatter": n // ranks, "SendRecv": n}[op]
    send = np.random.default_rng(0).standard_normal(send_n).astype(np.float32)
    recv = np.zeros(recv_n, dtype=np.float32)
    if kind == "torch":
        return torch.from_numpy(send), torch.from_numpy(recv)
    return send, recv


def _calls(comm: Communicator, op: str, send: Any, recv: Any) -> list[Any]:
    """[hpcml call, raw mpi4py call] on the same buffers, and for torch tensors a third: raw
    mpi4py making the numpy views in every call."""
    mpi = comm.mpi
    if op == "SendRecv":
        paths = [_ping_pong(comm, comm.Send, comm.Recv, send, recv), _ping_pong(
            comm, mpi.Send, mpi.Recv, *_views(send, recv))]
        if isinstance(send, torch.Tensor):
            paths.append(_ping_pong(comm, mpi.Send, mpi.Recv, send, recv, view=True))
        return paths
    call = {"Allreduce": mpi.Allreduce, "Allgather": mpi.Allgather,
            "Reduce_scatter": mpi.Reduce_scatter_block}[op]
    hp = {"Allreduce": comm.Allreduce, "Allgather": comm.Allgather,
          "Reduce_scatter": comm.Reduce_scatter}[op]
    raw_send, raw_recv = _views(send, recv)
    paths = [lambda: hp(send, recv), lambda: call(raw_send, raw_recv)]
    if isinstance(send, torch.Tensor):
        paths.append(lambda: call(send.numpy(), recv.numpy()))
    return paths


def _views(*bufs: Any) -> list[Any]:
    return [b.numpy() if isinstance(b, torch.Tensor) else b for b in bufs]


def _ping_pong(comm: Communicator, send_fn: Any, recv_fn: Any, send: Any, recv: Any,
               view: bool = False) -> Any:
    """One round trip between this rank and its partner (rank ^ 1) with ``send_fn(buf, dest,
    tag)`` and ``recv_fn(buf, source, tag)`` (handed ``buf.numpy()`` made in the call if
    ``view``); a no-op on an odd last rank."""
    peer = comm.rank ^ 1
    if peer >= comm.size:
        return lambda: None
    if view:
        if comm.rank % 2 == 0:
            return lambda: (send_fn(send.numpy(), peer, 0), recv_fn(recv.numpy(), peer, 0))
        return lambda: (recv_fn(recv.numpy(), peer, 0), send_fn(send.numpy(), peer, 0))
    if comm.rank % 2 == 0:
        return lambda: (send_fn(send, peer, 0), recv_fn(recv, peer, 0))
    return lambda: (recv_fn(recv, peer, 0), send_fn(send, peer, 0))


def _time_paths(comm: Communicator, paths: list[Any], calls: int, warmup: int) -> list[float]:
    """Slowest rank's median seconds per call of each path; call i starts with path i mod n."""
    for _ in range(warmup):
        for fn in paths:
            fn()
    times: list[list[float]] = [[] for _ in paths]
    timed = list(zip(paths, times, strict=True))
    comm.barrier()
    for i in range(calls):
        k = i % len(timed)
        for fn, out in timed[k:] + timed[:k]:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [comm.allreduce(median(t), op="max") for t in times]


def _memcpy_seconds(nbytes: int, calls: int) -> float:
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return median(times)


def run(cfg: CollectivesConfig, ctx: RunContext) -> dict[str, Any]:
    comm, p = ctx.comm, ctx.comm.size
    rows = []
    for op in cfg.ops:
        if op == "SendRecv" and p < 2:
            ctx.log("  SendRecv        skipped: a ping-pong needs 2 ranks")
            continue
        for kind in cfg.buffers:
            for nbytes in _sizes(cfg, p):
                calls = max(3, min(cfg.iterations, cfg.bytes_per_size // nbytes))
                send, recv = _buffers(op, nbytes, p, kind)
                t_hp, t_raw, *t_view = _time_paths(comm, _calls(comm, op, send, recv), calls,
                                                   cfg.warmup)
                bus = BUS_FACTOR[op](p)
                rows.append({
                    "op": op, "buffer": kind, "bytes": nbytes, "size": human_bytes(nbytes),
                    "calls": calls, "hpcml_us": t_hp * 1e6, "raw_us": t_raw * 1e6,
                    "hpcml_busbw_GBs": nbytes / t_hp * bus / 1e9,
                    "raw_busbw_GBs": nbytes / t_raw * bus / 1e9,
                    "hpcml_algbw_GBs": nbytes / t_hp / 1e9,
                    "ratio": t_raw / t_hp,
                    "raw_view_us": t_view[0] * 1e6 if t_view else None,
                    "ratio_view": t_view[0] / t_hp if t_view else None,
                    "memcpy_GBs": nbytes / _memcpy_seconds(nbytes, min(calls, 10)) / 1e9,
                })
            ctx.log(f"  {op:<15} {kind:<6} done")
    comm.ledger.reset()
    big = [r["ratio"] for r in rows if r["bytes"] >= 2**20]
    summary = {"rows": rows, "median_ratio_ge_1MiB": median(big) if big else None,
               "min_ratio_ge_1MiB": min(big) if big else None}
    if ctx.is_root:
        table = markdown_table(rows, [
            ("op", "op", ""), ("buffer", "buffer", ""), ("size", "size", ""),
            ("hpcml_us", "hpcml µs", ".1f"), ("raw_us", "raw µs", ".1f"),
            ("hpcml_busbw_GBs", "hpcml busbw GB/s", ".3f"),
            ("raw_busbw_GBs", "raw busbw GB/s", ".3f"), ("ratio", "hpcml/raw", ".3f"),
            ("raw_view_us", "raw, t.numpy() per call µs", ".1f"),
            ("ratio_view", "hpcml/that", ".3f"),
            ("memcpy_GBs", "memcpy GB/s", ".2f")])
        ctx.run_dir.write_text("table.md", table + "\n")
        print(table)
        if big:
            print(f"\nhpcml/raw speed ratio at >= 1 MiB: median "
                  f"{summary['median_ratio_ge_1MiB']:.3f}, min {summary['min_ratio_ge_1MiB']:.3f}"
                  f" (goal >= 0.95), {p} ranks")
        _plot(rows, p, ctx)
    return summary


def _plot(rows: list[dict[str, Any]], ranks: int, ctx: RunContext) -> None:
    plt = pyplot()

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    key = "hpcml_busbw_GBs" if ranks > 1 else "hpcml_algbw_GBs"
    for ax, op in zip(axes[0], ops, strict=True):
        for kind in sorted({r["buffer"] for r in rows}):
            sel = [r for r in rows if r["op"] == op and r["buffer"] == kind]
            x = [r["bytes"] for r in sel]
            ax.plot(x, [r[key] for r in sel], "o-", label=f"hpcml ({kind})")
            raw = [r["raw_busbw_GBs"] if ranks > 1 else r["bytes"] / r["raw_us"] / 1e3
                   for r in sel]
            ax.plot(x, raw, "x--", label=f"raw mpi4py ({kind})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("bus bandwidth (GB/s)" if ranks > 1 else "algorithm bandwidth (GB/s)")
        ax.set_title(f"{op}, {ranks} ranks")
        ax.legend(fontsize=7)
    save_figure(fig, ctx.run_dir.path / "collectives.png")


JOB = JobKind(config=CollectivesConfig, run=run,
              description="hpcml.comm vs raw mpi4py collective bandwidth and latency")
