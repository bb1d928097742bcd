"""``hpcml bench collectives``: hpcml.comm against raw mpi4py on the same buffers, same run,
and for torch buffers torch.distributed on the ``"hpcml"`` backend (:mod:`hpcml.distributed`).

For each operation and message size the paths take turns call by call, in the orders of a
balanced Latin square (:func:`call_orders`): over each cycle every path goes first equally often
and directly follows every other path equally often, so drift in machine load, cache warmth and
what the previous call left behind (one rank finishing a collective before the other, a
persistent request's progress) hit all alike; each rank takes the median time
per path and the slowest rank's median is reported. The slowest rank's mean of the hpcml path
is kept beside it (``hpcml_mean_us``, tail included: what a loop of such calls takes on
average; :func:`hpcml.report.scaling.fit_bench` fits it).

What raw mpi4py gets: the same buffers, a torch tensor as the numpy view ``t.numpy()`` made once
before timing. That is the fastest way to hand mpi4py a tensor that a program keeps (passing the
tensor itself goes through DLPack: ~8 µs more per 4 KiB Allreduce here), so ``ratio`` (hpcml
speed / this peer's) is the strict comparison. Programs whose tensors are new every step
(activations, gradients) have to make the view in every call; for torch buffers that third path
is timed too (``raw_view_us``, ``ratio_view``), as context, never as the goal's peer.

For torch buffers a fourth path is torch.distributed over ``"hpcml"`` (``torch_us``):
``all_reduce`` (in place on the output buffer), ``all_gather_single``, ``reduce_scatter_single``,
``send``/``recv`` and ``isend``/``irecv`` + ``wait``, each starting hpcml's non-blocking form
and waiting on it; ``ratio_torch`` is its speed / raw mpi4py's, ``torch_vs_hpcml`` its speed /
hpcml.comm's (the cost of torch's Python layer and the Work object).

Allreduce and SendRecv are also timed as bound (persistent) operations, the buffers bound once
and each call a start and a wait: hpcml's ``Allreduce_init`` / ``Send_init`` / ``Recv_init``
(``hpcml_persistent_us``) against mpi4py's own on the same views (``raw_persistent_us``);
``ratio_persistent`` compares the two, ``ratio_persistent_raw`` hpcml's bound form with raw
mpi4py's plain call. Torch buffers are tensors torch allocated (resizable storage, so the bound
form's re-allocation guard runs on every start, as in a program).

Sizes follow the nccl-tests convention: Allreduce = vector size, Allgather = gathered (output)
size, Reduce_scatter = input size. Bus bandwidth = size / time x (2(P-1)/P for Allreduce, (P-1)/P
for Allgather and Reduce_scatter), which is comparable across P; at P = 1 it is 0 and only the
algorithm bandwidth (size / time) is meaningful. ``SendRecv`` is a ping-pong between ranks 2i and
2i+1 (a blocking ``Send`` answered by a blocking ``Recv`` and back; an odd last rank idles): its
time is the round trip, its bus bandwidth 2 x size / time (one message each way), and it needs at
least 2 ranks. ``IsendIrecv`` is the same ping-pong with each message an ``Isend`` / ``Irecv``
completed by a wait (what a pipeline stage does per activation and gradient). A memcpy of the
same size on one core is the local reference.
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

OPS = ("Allreduce", "Allgather", "Reduce_scatter", "SendRecv", "IsendIrecv")
PING_PONGS = ("SendRecv", "IsendIrecv")
BUS_FACTOR = {"Allreduce": lambda p: 2 * (p - 1) / p, "Allgather": lambda p: (p - 1) / p,
              "Reduce_scatter": lambda p: (p - 1) / p, "SendRecv": lambda p: 2.0,
              "IsendIrecv": lambda p: 2.0}


@dataclasses.dataclass
class CollectivesConfig(JobConfig):
    ops: list[str] = option(list(OPS), choices=OPS, nonempty=True, help="collectives to time")
    buffers: list[str] = option(["numpy", "torch"], choices=("numpy", "torch"),
                                nonempty=True, help="buffer types to time")
    min_bytes: int = option(4, min=4, help="smallest message (bytes)")
    max_bytes: int = option(64 * 2**20, min=4, help="largest message (bytes)")
    step: int = option(4, min=2, help="size multiplier between messages")
    iterations: int = option(30, min=1, help="timed calls per path at small sizes")
    bytes_per_size: int = option(1 * 2**30, min=2**20,
                                 help="cap on bytes moved per size and path (fewer calls at "
                                      "large sizes)")
    warmup: int = option(3, min=0, help="untimed calls per path before timing")

    def check(self, size: int) -> None:
        if size < 2 and set(self.ops) <= set(PING_PONGS):
            raise ConfigError("ops", f"{self.ops} are ping-pongs, which need 2 ranks, so one rank "
                              "would measure nothing", "launch with mpiexec -n 2 or add e.g. "
                              "'Allreduce'")
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
    send_n = {"Allgather": n // ranks}.get(op, n)
    recv_n = {"Reduce_scatter": n // ranks}.get(op, n)
    send = np.random.default_rng(0).standard_normal(send_n).astype(np.float32)
    recv = np.zeros(recv_n, dtype=np.float32)
    if kind == "torch":  # tensors torch allocated (resizable storage), as a program's are
        return torch.from_numpy(send).clone(), torch.from_numpy(recv).clone()
    return send, recv


PERSISTENT_OPS = ("Allreduce", "SendRecv")  # the ops hpcml can bind once (``*_init``)


def _calls(comm: Communicator, op: str, send: Any,
           recv: Any) -> tuple[dict[str, Any], list[Any]]:
    """The timed paths on the same buffers, by name: ``hpcml`` and ``raw`` (mpi4py on views made
    once); for torch tensors ``raw_view`` (mpi4py making the views in every call); for the
    ops with a persistent form, ``hpcml_persistent`` and ``raw_persistent`` (the buffers bound
    once, each call a start and a wait). Also the calls that free the persistent handles."""
    mpi = comm.mpi
    raw_send, raw_recv = _views(send, recv)
    is_tensor = isinstance(send, torch.Tensor)
    frees: list[Any] = []
    if op in PING_PONGS:
        peer = comm.rank ^ 1
        if peer >= comm.size:  # an odd last rank idles
            names = ["hpcml", "raw"] + ["raw_view", "torch"] * is_tensor + [
                "hpcml_persistent", "raw_persistent"] * (op in PERSISTENT_OPS)
            return {name: lambda: None for name in names}, frees
        if op == "SendRecv":
            ends = {"hpcml": (lambda: comm.Send(send, peer, 0), lambda: comm.Recv(recv, peer, 0)),
                    "raw": (lambda: mpi.Send(raw_send, peer, 0),
                            lambda: mpi.Recv(raw_recv, peer, 0)),
                    "raw_view": (lambda: mpi.Send(send.numpy(), peer, 0),
                                 lambda: mpi.Recv(recv.numpy(), peer, 0))}
        else:
            ends = {"hpcml": (lambda: comm.Isend(send, peer, 0).wait(),
                              lambda: comm.Irecv(recv, peer, 0).wait()),
                    "raw": (lambda: mpi.Isend(raw_send, peer, 0).Wait(),
                            lambda: mpi.Irecv(raw_recv, peer, 0).Wait()),
                    "raw_view": (lambda: mpi.Isend(send.numpy(), peer, 0).Wait(),
                                 lambda: mpi.Irecv(recv.numpy(), peer, 0).Wait())}
        paths = {name: _ping_pong(comm, *pair) for name, pair in ends.items()
                 if name != "raw_view" or is_tensor}
        if is_tensor:
            paths.update(_torch_calls(comm, op, send, recv))
        if op not in PERSISTENT_OPS:
            return paths, frees
        hp_send, hp_recv = comm.Send_init(send, peer, 1), comm.Recv_init(recv, peer, 1)
        raw_bound = [mpi.Send_init(raw_send, peer, 2), mpi.Recv_init(raw_recv, peer, 2)]
        paths["hpcml_persistent"] = _ping_pong(comm, hp_send.run, hp_recv.run)
        paths["raw_persistent"] = _ping_pong(*[comm] + [
            lambda r=r: (r.Start(), r.Wait()) for r in raw_bound])
        return paths, [hp_send.free, hp_recv.free] + [r.Free for r in raw_bound]
    call = {"Allreduce": mpi.Allreduce, "Allgather": mpi.Allgather,
            "Reduce_scatter": mpi.Reduce_scatter_block}[op]
    hp = {"Allreduce": comm.Allreduce, "Allgather": comm.Allgather,
          "Reduce_scatter": comm.Reduce_scatter}[op]
    paths = {"hpcml": lambda: hp(send, recv), "raw": lambda: call(raw_send, raw_recv)}
    if is_tensor:
        paths["raw_view"] = lambda: call(send.numpy(), recv.numpy())
        paths.update(_torch_calls(comm, op, send, recv))
    if op in PERSISTENT_OPS:
        hp_bound = comm.Allreduce_init(send, recv)
        raw_bound = mpi.Allreduce_init(raw_send, raw_recv)
        paths["hpcml_persistent"] = hp_bound.run
        paths["raw_persistent"] = lambda: (raw_bound.Start(), raw_bound.Wait())
        frees = [hp_bound.free, raw_bound.Free]
    return paths, frees


def _torch_calls(comm: Communicator, op: str, send: Any, recv: Any) -> dict[str, Any]:
    """The ``torch`` path: torch.distributed on the ``"hpcml"`` world group (made by
    :func:`run` before any path), on the same tensors."""
    import torch.distributed as dist

    from hpcml.distributed import world_group

    g = world_group()
    if op == "SendRecv":
        peer = comm.rank ^ 1
        return {"torch": _ping_pong(comm, lambda: dist.send(send, peer, group=g),
                                    lambda: dist.recv(recv, peer, group=g))}
    if op == "IsendIrecv":
        peer = comm.rank ^ 1
        return {"torch": _ping_pong(comm, lambda: dist.isend(send, peer, group=g).wait(),
                                    lambda: dist.irecv(recv, peer, group=g).wait())}
    return {"torch": {"Allreduce": lambda: dist.all_reduce(recv, group=g),
                      "Allgather": lambda: dist.all_gather_single(recv, send, group=g),
                      "Reduce_scatter": lambda: dist.reduce_scatter_single(recv, send, group=g),
                      }[op]}


def _views(*bufs: Any) -> list[Any]:
    return [b.numpy() if isinstance(b, torch.Tensor) else b for b in bufs]


def _ping_pong(comm: Communicator, send_once: Any, recv_once: Any) -> Any:
    """One round trip between this rank and its partner (rank ^ 1): even ranks send first."""
    if comm.rank % 2 == 0:
        return lambda: (send_once(), recv_once())
    return lambda: (recv_once(), send_once())


def call_orders(n: int) -> list[list[int]]:
    """The orders in which :func:`_time_paths` calls ``n`` paths, one per round, cycling: a
    Williams design (a balanced Latin square; for odd ``n`` with its rows reversed too), in
    which each path takes each position equally often and each ordered pair of distinct paths
    stands side by side equally often."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(k + r) % n for k in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def _time_paths(comm: Communicator, paths: list[Any], calls: int,
                warmup: int) -> tuple[list[float], list[float]]:
    """Slowest rank's median and slowest rank's mean seconds per call of each path (two lists);
    call i runs the paths in the order ``call_orders(len(paths))[i % len(...)]``. Collective."""
    for _ in range(warmup):
        for fn in paths:
            fn()
    times: list[list[float]] = [[] for _ in paths]
    orders = [[(paths[k], times[k]) for k in row] for row in call_orders(len(paths))]
    comm.barrier()
    for i in range(calls):
        for fn, out in orders[i % len(orders)]:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return ([comm.allreduce(median(t), op="max") for t in times],
            [comm.allreduce(sum(t) / len(t), op="max") for t in times])


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
    if "torch" in cfg.buffers:
        from hpcml.distributed import world_group

        world_group()  # collective: made once, before the first path
    for op in cfg.ops:
        if op in PING_PONGS and p < 2:
            ctx.log(f"  {op:<15} skipped: a ping-pong needs 2 ranks")
            continue
        for kind in cfg.buffers:
            for nbytes in _sizes(cfg, p):
                calls = max(3, min(cfg.iterations, cfg.bytes_per_size // nbytes))
                send, recv = _buffers(op, nbytes, p, kind)
                paths, frees = _calls(comm, op, send, recv)
                medians, means = _time_paths(comm, list(paths.values()), calls, cfg.warmup)
                t = dict(zip(paths, medians, strict=True))
                for free in frees:
                    free()
                t_hp, t_raw, bus = t["hpcml"], t["raw"], BUS_FACTOR[op](p)
                t_php, t_praw = t.get("hpcml_persistent"), t.get("raw_persistent")
                t_torch = t.get("torch")
                rows.append({
                    "op": op, "buffer": kind, "bytes": nbytes, "size": human_bytes(nbytes),
                    "calls": calls, "hpcml_us": t_hp * 1e6, "raw_us": t_raw * 1e6,
                    "hpcml_mean_us": means[list(paths).index("hpcml")] * 1e6,
                    "hpcml_busbw_GBs": nbytes / t_hp * bus / 1e9,
                    "raw_busbw_GBs": nbytes / t_raw * bus / 1e9,
                    "hpcml_algbw_GBs": nbytes / t_hp / 1e9,
                    "ratio": t_raw / t_hp,
                    "raw_view_us": t["raw_view"] * 1e6 if "raw_view" in t else None,
                    "ratio_view": t["raw_view"] / t_hp if "raw_view" in t else None,
                    "torch_us": t_torch * 1e6 if t_torch else None,
                    "ratio_torch": t_raw / t_torch if t_torch else None,
                    "torch_vs_hpcml": t_hp / t_torch if t_torch else None,
                    "hpcml_persistent_us": t_php * 1e6 if t_php else None,
                    "raw_persistent_us": t_praw * 1e6 if t_praw else None,
                    "ratio_persistent": t_praw / t_php if t_php else None,
                    "ratio_persistent_raw": t_raw / t_php if t_php else None,
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
            ("torch_us", "torch.distributed on hpcml µs", ".1f"),
            ("ratio_torch", "torch.distributed/raw", ".3f"),
            ("torch_vs_hpcml", "torch.distributed/hpcml", ".3f"),
            ("hpcml_persistent_us", "hpcml bound µs", ".1f"),
            ("raw_persistent_us", "raw bound µs", ".1f"),
            ("ratio_persistent", "bound hpcml/raw", ".3f"),
            ("ratio_persistent_raw", "bound hpcml/raw plain", ".3f"),
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
