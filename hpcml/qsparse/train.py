"""Job kind ``qsparse``: synchronous or asynchronous Qsparse-local-SGD on the digits data.

``mode = "sync"``: every rank is a worker with its own shard (Algorithm 1 of arXiv 1906.02367);
``mode = "allreduce"``: vanilla distributed SGD (dense gradient ``Allreduce`` every step), the
baseline. ``mode = "async"``: rank 0 is the server holding the global model and ranks 1..P-1
are workers, worker ``w`` synchronizing every ``train.periods[w]`` local steps (all
``<= train.H``, the bounded gap of Algorithm 2). ``comm.straggle(t)`` runs before every local
step, so a ``[stragglers]`` section makes workers run at different speeds.

Accounting: ``bits`` is the exact uplink payload size per worker (sum of
:meth:`Compressor.bits` over this worker's syncs; in async mode the mean over workers);
``seconds`` is training wall time on rank 0 excluding evaluation; accuracy is measured on the
360 held-out test images with the synchronized model (``x_sync`` / the server's model).

Preemption (SIGUSR1/SIGTERM, :mod:`hpcml.preemption`): ``sync`` and ``allreduce`` runs agree
to stop at an evaluation boundary (one small allreduce every ``train.eval_every`` local steps,
so the evaluated ``x_sync`` is the result); in ``async`` runs the server stops on its own signal
and tells each worker in its next reply (:mod:`hpcml.qsparse.exchange`). The summary then
names ``stopped_by`` and ``steps_done`` (local steps; async: the most any worker did) and the
run's status is ``preempted``; a signal during the last evaluation interval lets the run finish.

Async faults: a worker that is frozen or dead never stalls the server (see
:class:`~hpcml.qsparse.exchange.Server`); one silent for ``train.worker_timeout`` seconds after
the others finished is listed in the summary's ``unresponsive_ranks`` and the job ends by
aborting it once the results are written (exit code 3, see :mod:`hpcml.launch`); when every
worker is silent that long and none finished, the summary also names ``failed_by`` (status
``failed``). A stop signal is honoured the same way (the server polls its flag meanwhile).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from hpcml.comm import Communicator, StragglerConfig
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.jobs import JobKind, RunContext
from hpcml.preemption import Preemption
from hpcml.qsparse.compressors import NAMES, Compressor, make_compressor
from hpcml.qsparse.data import (
    Split,
    accuracy,
    batch_indices,
    load_digits_h5,
    mlp,
    mlp_dimension,
    shard,
    validate_digits,
)
from hpcml.qsparse.error_feedback import learning_rate
from hpcml.qsparse.exchange import WORKER_TIMEOUT, Server, ServerExchange
from hpcml.qsparse.optimizer import AllreduceSGD, QsparseLocalSGD


@dataclasses.dataclass
class CompressorConfig:
    name: str = option("qtopk", choices=NAMES, help="Q(S(x)): identity, topk, randk, qsgd, "
                       "sign, qtopk, qrandk, signtopk, signrandk")
    k: int = option(48, min=1, help="coordinates kept by top-k / rand-k (k <= d)")
    s: int = option(15, min=1, help="QSGD quantization levels (>= 1)")


@dataclasses.dataclass
class DataConfig:
    path: str = option("data/qsparse/digits.h5", help="digits HDF5 file (python -m "
                       "hpcml.qsparse.data PATH writes it)")
    hidden: list[int] = option([64], min=1, help="hidden layer widths of the MLP")


@dataclasses.dataclass
class TrainConfig:
    steps: int = option(600, min=1, help="local iterations per worker")
    batch: int = option(16, min=1, help="minibatch per worker and local step")
    lr: float = option(0.2, gt=0.0, help="learning rate eta (eta_0 for 'decay')")
    schedule: str = option("constant", choices=("constant", "decay"),
                           help="'constant' eta, or 'decay' eta_t = eta a / (a + t)")
    decay_a: float = option(200.0, gt=0.0, help="a of the 'decay' schedule")
    H: int = option(4, min=1, help="local steps between synchronizations (>= 1)")
    periods: list[int] = option([], min=1, help="async: each worker's sync period (<= H); "
                                "empty = H for all")
    eval_every: int = option(20, min=1, help="evaluate every N local steps (async: N server "
                             "updates)")
    target: float = option(0.9, gt=0.0, max=1.0, help="test accuracy whose first crossing "
                           "gives bits-to-target")
    worker_timeout: float = option(WORKER_TIMEOUT, gt=0.0, help="async: seconds a worker may "
                                   "stay silent when no other worker is still sending updates "
                                   "before the server names it unresponsive and the job ends "
                                   "without it (exit code 3)")


@dataclasses.dataclass
class QsparseConfig(JobConfig):
    mode: str = option("sync", choices=("sync", "async", "allreduce"),
                       help="'sync' (all ranks work), 'async' (rank 0 serves) or 'allreduce' "
                       "(vanilla distributed SGD baseline; ignores compressor and H)")
    compressor: CompressorConfig = option(CompressorConfig())
    data: DataConfig = option(DataConfig())
    train: TrainConfig = option(TrainConfig())
    stragglers: StragglerConfig = option(StragglerConfig())

    def check(self, size: int) -> None:
        check_setup(self.mode, self.compressor, self.data, self.train, size)


def check_setup(mode: str, comp: CompressorConfig, data: DataConfig, train: TrainConfig,
                size: int, prefix: str = "") -> None:
    """Cross-field rules of a Qsparse run on ``size`` ranks; raises ``ConfigError``."""
    d = mlp_dimension(data.hidden)
    if comp.name.endswith(("topk", "randk")) and comp.k > d:
        raise ConfigError(f"{prefix}compressor.k", f"k = {comp.k} exceeds the model dimension "
                          f"d = {d}", f"use 1 <= k <= {d}")
    if mode == "async":
        if size < 2:
            raise ConfigError(f"{prefix}mode", "'async' needs >= 2 ranks (rank 0 serves)",
                              "run under mpiexec -n 2 or more, or use mode = 'sync'")
        if train.periods and len(train.periods) != size - 1:
            raise ConfigError(f"{prefix}train.periods", f"{len(train.periods)} periods for "
                              f"{size - 1} workers", "give one per worker or none")
    if any(p > train.H for p in train.periods):
        raise ConfigError(f"{prefix}train.periods", f"{train.periods} exceed H = {train.H}",
                          "keep every period <= H (bounded gap)")


def compressor_of(cfg: CompressorConfig) -> Compressor:
    return make_compressor(cfg.name, k=cfg.k, s=cfg.s)


@dataclasses.dataclass
class Result:
    """A training run seen from rank 0: the evaluation curve and the totals; ``steps``: the
    local steps done per worker (async: the most any worker did); ``stopped_by``: the reason
    the run stopped early, None when it ran to the end; ``failed_by``: why it could not go on
    (async: every worker silent, none finished)."""

    curve: list[dict[str, float]]
    bits_per_worker: int
    bits_down_per_worker: int
    final_accuracy: float
    seconds: float
    syncs: int
    steps: int
    unresponsive: list[int] = dataclasses.field(default_factory=list)
    stopped_by: str | None = None
    failed_by: str | None = None


class _Evaluator:
    """Rank 0's test-set evaluation of flat parameter vectors, timed separately."""

    def __init__(self, hidden: list[int], split: Split) -> None:
        self.model, self.split = mlp(hidden, 0), split
        self.params = list(self.model.parameters())
        self.curve: list[dict[str, float]] = []
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, **point: float) -> dict[str, float]:
        start = time.perf_counter()
        torch.nn.utils.vector_to_parameters(x.clone(), self.params)
        acc, loss = accuracy(self.model, self.split.x_test, self.split.y_test)
        self.seconds += time.perf_counter() - start
        self.curve.append({**point, "accuracy": acc, "loss": loss})
        return self.curve[-1]


def _local_training(cfg: QsparseConfig, comm: Communicator, split: Split, worker: int,
                    workers: int, qs_factory: Callable[..., Any],
                    on_step: Callable[[int, Any], None],
                    stop: Callable[[int, Any], bool]) -> Any:
    """Worker ``worker``'s loop: straggle, local SGD step on its shard, sync via ``qs``;
    ends after local step ``t`` when ``stop(t, qs)`` (called after ``on_step``) says so.
    Returns ``qs``."""
    tc = cfg.train
    lo, hi = shard(len(split.y_train), workers, worker)
    xs, ys = split.x_train[lo:hi], split.y_train[lo:hi]
    model = mlp(cfg.data.hidden, cfg.seed)
    qs = qs_factory(model, torch.optim.SGD(model.parameters(), lr=tc.lr))
    for t in range(tc.steps):
        comm.straggle(t)
        for group in qs.param_groups:
            group["lr"] = learning_rate(t, tc.lr, tc.schedule, tc.decay_a)
        idx = torch.from_numpy(batch_indices(cfg.seed, worker, t, hi - lo, tc.batch))
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        qs.zero_grad()
        loss.backward()
        qs.step()
        on_step(t, qs)
        if stop(t, qs):
            break
    return qs


def train(cfg: QsparseConfig, comm: Communicator, split: Split,
          log: Callable[[dict[str, float]], None] = lambda point: None,
          preemption: Preemption | None = None) -> Result | None:
    """Run one Qsparse-local-SGD training (collective). Returns the result on rank 0, None
    elsewhere. ``log`` is called on rank 0 with each evaluation point. The clock starts
    after a barrier, so the ranks' start-up skew is not counted. With ``preemption``, a
    signal stops the run early (see the module; without it the run always goes to the end)."""
    comm.barrier()
    if cfg.mode != "async":
        return _train_sync(cfg, comm, split, log, preemption)
    return _train_async(cfg, comm, split, log, preemption)


def _train_sync(cfg: QsparseConfig, comm: Communicator, split: Split,
                log: Callable[[dict[str, float]], None],
                preemption: Preemption | None) -> Result | None:
    tc, comp = cfg.train, compressor_of(cfg.compressor)
    evaluate = _Evaluator(cfg.data.hidden, split) if comm.rank == 0 else None
    start = time.perf_counter()

    def on_step(t: int, qs: QsparseLocalSGD) -> None:
        if evaluate is not None and ((t + 1) % tc.eval_every == 0 or t + 1 == tc.steps):
            seconds = time.perf_counter() - start - evaluate.seconds
            log(evaluate(qs.x_sync, step=t + 1, bits=qs.bits_sent, seconds=seconds))

    def factory(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
        if cfg.mode == "allreduce":
            return AllreduceSGD(model, opt, comm)
        return QsparseLocalSGD(model, opt, compressor=comp, H=tc.H, comm=comm, seed=cfg.seed)

    stopped: str | None = None

    def stop(t: int, qs: Any) -> bool:
        # every rank passes the same t: the check is collective at evaluation boundaries only,
        # where rank 0 has just evaluated x_sync (the result when the run ends here)
        nonlocal stopped
        if preemption is None or (t + 1) % tc.eval_every or t + 1 == tc.steps:
            return False
        stopped = preemption.agreed(comm)
        return stopped is not None

    qs = _local_training(cfg, comm, split, comm.rank, comm.size, factory, on_step, stop)
    bits = comm.allreduce(qs.bits_sent, op="max")
    if evaluate is None:
        return None
    seconds = time.perf_counter() - start - evaluate.seconds
    return Result(evaluate.curve, bits, 0, evaluate.curve[-1]["accuracy"], seconds, qs.syncs,
                  int(evaluate.curve[-1]["step"]), stopped_by=stopped)


def _train_async(cfg: QsparseConfig, comm: Communicator, split: Split,
                 log: Callable[[dict[str, float]], None],
                 preemption: Preemption | None) -> Result | None:
    tc, comp = cfg.train, compressor_of(cfg.compressor)
    workers = comm.size - 1
    if comm.rank == 0:
        evaluate = _Evaluator(cfg.data.hidden, split)
        start = time.perf_counter()

        def on_update(server: Server) -> None:
            if server.updates % tc.eval_every == 0:
                seconds = time.perf_counter() - start - evaluate.seconds
                log(evaluate(server.x, step=server.updates, seconds=seconds,
                             bits=sum(server.bits_up.values()) / workers))

        x0 = torch.nn.utils.parameters_to_vector(mlp(cfg.data.hidden, cfg.seed).parameters())
        server = Server(comm, x0.detach(), comp, timeout=tc.worker_timeout)
        server.serve(on_update, None if preemption is None else lambda: preemption.received)
        x = server.x.clone() if server.unresponsive else comm.Bcast(server.x.clone())
        seconds = time.perf_counter() - start - evaluate.seconds
        bits = sum(server.bits_up.values()) / workers
        steps = server.local_steps.values()  # a stop signal after the last sync changes nothing
        evaluate(x, step=server.updates, seconds=seconds, bits=bits)
        log(evaluate.curve[-1])
        return Result(evaluate.curve, round(bits), round(server.bits_down / workers),
                      evaluate.curve[-1]["accuracy"], seconds, server.updates,
                      max(steps, default=0), server.unresponsive,
                      server.stopped_by if any(s < tc.steps for s in steps) else None,
                      server.failed_by)
    worker = comm.rank - 1
    period = tc.periods[worker] if tc.periods else tc.H
    qs = _local_training(cfg, comm, split, worker, workers, lambda m, o: QsparseLocalSGD(
        m, o, compressor=comp, H=period, exchange=ServerExchange(comm), seed=cfg.seed),
        lambda t, qs: None, lambda t, qs: qs.exchange.stopped)
    qs.close()
    comm.Bcast(torch.empty_like(qs.x_sync))
    return None


def run(cfg: QsparseConfig, ctx: RunContext) -> dict[str, Any]:
    split = load_digits_h5(cfg.data.path)
    d = mlp_dimension(cfg.data.hidden)
    comp = compressor_of(cfg.compressor)
    if cfg.mode == "allreduce":
        ctx.log(f"vanilla distributed SGD: dense gradient Allreduce, d = {d}, {32 * d} bits "
                "per step")
    else:
        ctx.log(f"qsparse {cfg.mode}: compressor {comp.name} (k={cfg.compressor.k}, "
                f"s={cfg.compressor.s}), d = {d}, {comp.bits(d)} bits per sync "
                f"(dense: {32 * d}), H = {cfg.train.H}")

    def log(point: dict[str, float]) -> None:
        ctx.run_dir.log_metrics(**point)
        print(f"  step {point['step']:>6.0f}  bits/worker {point['bits']:>12.0f}  "
              f"acc {point['accuracy']:.4f}  loss {point['loss']:.4f}", flush=True)

    result = train(cfg, ctx.comm, split, log, ctx.preemption)
    if result is None:
        return {}
    reached = next((p for p in result.curve if p["accuracy"] >= cfg.train.target), None)
    per_sync = 32 * d if cfg.mode == "allreduce" else comp.bits(d)
    summary = {"mode": cfg.mode, "compressor": comp.name, "d": d, "bits_per_sync": per_sync,
               "bits_per_worker": result.bits_per_worker,
               "bits_down_per_worker": result.bits_down_per_worker,
               "final_accuracy": result.final_accuracy, "train_seconds": result.seconds,
               "syncs": result.syncs, "target": cfg.train.target,
               "bits_to_target": reached["bits"] if reached else None,
               "steps_done": result.steps, "stopped_by": result.stopped_by}
    if cfg.mode == "async":
        summary["unresponsive_ranks"] = result.unresponsive
        summary["failed_by"] = result.failed_by
    if result.unresponsive:
        done = f"{result.failed_by}: the run failed" if result.failed_by else \
            "the results are complete"
        ctx.log(f"workers on ranks {result.unresponsive} stopped answering (frozen or dead): "
                f"{done}; the job aborts them to end (exit code 3)")
    ctx.log(f"final accuracy {result.final_accuracy:.4f}; {result.bits_per_worker} bits per "
            f"worker; bits to {cfg.train.target:.2f}: {summary['bits_to_target']}"
            + (f"; stopped by {result.stopped_by} after {result.steps} of {cfg.train.steps} "
               "local steps" if result.stopped_by else ""))
    return summary


JOB = JobKind(config=QsparseConfig, run=run,
              description="Qsparse-local-SGD (sync or async) on digits with exact bit counts",
              validate_data=lambda cfg, comm: validate_digits(
                  cfg.data.path, comm.size - (cfg.mode == "async")))
