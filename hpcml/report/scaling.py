"""``hpcml report scaling RUNS...``: weak/strong scaling efficiency, measured and projected.

Definitions (P0 = smallest measured rank count, T(P) = time per unit of work at P):

* strong scaling (fixed total work): speed-up S(P) = T(P0) / T(P), efficiency
  E(P) = S(P) * P0 / P;
* weak scaling (fixed work per rank): efficiency E(P) = T(P0) / T(P), scaled speed-up
  S(P) = E(P) * P / P0.

T is the time per step when the run reports ``compute_s_per_step`` and ``allreduce_s_per_step``
(kind ``scaling``), else the run's wall time (``summary.json`` ``seconds``) with communication
time from ``ledger.json``. A ``scaling`` run that also reports ``step_s_per_step`` (the wall time
of a whole step) splits T into compute, the gradient's Allreduce and ``other``: the rest of the
step (the update, ``small_allreduces_per_step`` small allreduces, the metrics line), measured.

The projection keeps P0's compute time (divided by P / P0 for strong scaling: one rank per core,
perfectly divided work) and P0's ``other`` time (not divided), and adds the Allreduce cost of
the fitted alpha-beta model (:mod:`hpcml.report.alphabeta`) for the run's message size and
Allreduce count, and for each small allreduce the model's time of an 8-byte Allreduce (its
latency term) in place of the one measured at P0::

    T_model(P) = compute(P) + other(P0) + calls * T(n, P) + small * (T(8, P) - T(8, P0))

Rows beyond the largest measured P are marked ``projection``; the model's time and efficiency
are also shown next to every measured row so its error is visible.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpcml.errors import UsageError
from hpcml.report.alphabeta import AlphaBeta, fit
from hpcml.rundir import read_json


@dataclass(frozen=True)
class Measurement:
    """One run of a series, reduced to what the report needs."""

    run_dir: str
    ranks: int
    time: float            # seconds per unit (step or run)
    compute: float         # of which computation
    comm: float            # of which communication
    allreduce_bytes: float
    allreduce_calls: float  # per unit
    mode: str | None
    hosts: int
    ranks_per_host: int
    cores: int
    unit: str
    other: float = 0.0             # rest of the unit: update, small allreduces, metrics
    small_allreduces: float = 0.0  # small (latency-bound) allreduces per unit


def _read(path: Path, name: str) -> dict[str, Any]:
    file = path / name
    if not file.is_file():
        raise UsageError(f"{path}: no {name} (give run directories of finished runs)")
    data = read_json(file)
    if not isinstance(data, dict):
        raise UsageError(f"{file}: not a JSON object; not a file hpcml wrote, or a damaged one")
    return data


def _damaged(path: Path, exc: Exception) -> UsageError:
    """The one-line error for run files that parse but lack what a finished run records."""
    return UsageError(f"{path}: summary.json / env.json / ledger.json do not hold a finished "
                      f"run's records ({type(exc).__name__}: {exc}); give run directories that "
                      "hpcml wrote")


def measure(run_dir: str | Path) -> Measurement:
    """Read one run directory (``summary.json``, ``env.json``, ``ledger.json``); a one-line
    ``UsageError`` when one is missing, not JSON or not a finished run's record."""
    path = Path(run_dir)
    summary, env, ledger = (_read(path, n) for n in ("summary.json", "env.json", "ledger.json"))
    try:
        m = _measure(path, summary, env, ledger)
        if not (math.isfinite(m.time) and m.time > 0 and m.ranks >= 1):
            raise ValueError(f"{m.ranks} ranks, {m.time} {m.unit}")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError,
            ZeroDivisionError) as exc:
        raise _damaged(path, exc) from None
    return m


def _measure(path: Path, summary: dict[str, Any], env: dict[str, Any],
             ledger: dict[str, Any]) -> Measurement:
    if summary.get("status", "complete") != "complete":
        raise UsageError(f"{path}: run status is {summary['status']!r}, not complete (resume it "
                         "or leave it out)")
    ranks = int(summary["ranks"])
    per_host = env.get("ranks_per_host") or {"?": ranks}
    common = {"run_dir": str(path), "ranks": ranks, "mode": summary.get("mode"),
              "hosts": len(per_host), "ranks_per_host": max(per_host.values()),
              "cores": int(env.get("cores") or 0)}
    if "compute_s_per_step" in summary:
        compute, comm = summary["compute_s_per_step"], summary["allreduce_s_per_step"]
        step = summary.get("step_s_per_step")
        other = max(0.0, step - compute - comm) if step is not None else 0.0
        return Measurement(time=compute + comm + other, compute=compute, comm=comm,
                           allreduce_bytes=summary["allreduce_bytes"], allreduce_calls=1.0,
                           unit="s/step", other=other,
                           small_allreduces=float(summary.get("small_allreduces_per_step", 0)),
                           **common)
    per_rank = ledger["ranks"]
    comm = max(sum(op["seconds"] for op in r.values()) for r in per_rank)
    ar = per_rank[0].get("Allreduce", {"calls": 0, "bytes_sent": 0})
    calls = ar["calls"]
    return Measurement(time=summary["seconds"], compute=summary["seconds"] - comm, comm=comm,
                       allreduce_bytes=ar["bytes_sent"] / calls if calls else 0.0,
                       allreduce_calls=float(calls), unit="s/run", **common)


def efficiency(mode: str, p0: int, t0: float, p: int, t: float) -> tuple[float, float]:
    """(speed-up, efficiency) of time ``t`` on ``p`` ranks against ``t0`` on ``p0`` (pure)."""
    if mode == "strong":
        speedup = t0 / t
        return speedup, speedup * p0 / p
    eff = t0 / t
    return eff * p / p0, eff


SMALL_BYTES = 8  # one float64 or int: the modelled size of a small allreduce


def model_comm(base: Measurement, model: AlphaBeta, p: int) -> float:
    """Modelled communication per unit at ``p`` ranks: the run's Allreduces plus its small
    allreduces, less the small ones' modelled time at the baseline's P (pure)."""
    small = model.allreduce_seconds(SMALL_BYTES, p) - model.allreduce_seconds(SMALL_BYTES,
                                                                               base.ranks)
    return (base.allreduce_calls * model.allreduce_seconds(base.allreduce_bytes, p)
            + base.small_allreduces * small)


def model_time(base: Measurement, mode: str, model: AlphaBeta, p: int) -> float:
    """Projected time per unit at ``p`` ranks from the baseline run ``base`` (pure)."""
    compute = base.compute * (base.ranks / p if mode == "strong" else 1.0)
    return compute + base.other + model_comm(base, model, p)


def projection_ranks(p_max: int, max_ranks: int) -> list[int]:
    """Powers of two above ``p_max`` and below ``max_ranks``, then ``max_ranks`` (pure)."""
    out, p = [], 1
    while p < max_ranks:
        if p > p_max:
            out.append(p)
        p *= 2
    return out + ([max_ranks] if max_ranks > p_max else [])


def bench_link(env: dict[str, Any]) -> str:
    """The link a bench run measured, from its ``env.json`` (pure): its hosts and, across
    hosts, the transport that carried the data (see :mod:`hpcml.comm.transport`)."""
    hosts = sorted(env.get("ranks_per_host") or {})
    if len(hosts) < 2:
        return f"one host{f' ({hosts[0]})' if hosts else ''}, no network"
    transport = (env.get("transport") or {}).get("inter_node", "transport not recorded")
    return f"{len(hosts)} hosts ({', '.join(hosts)}) over {transport}"


def fit_bench(*bench_dirs: str | Path) -> AlphaBeta:
    """Alpha-beta from the Allreduce rows of one or more ``hpcml bench collectives`` run
    directories measured at the same P (e.g. one of small sizes for the latency, one of large
    sizes for the bandwidth), naming the link the first measured (:func:`bench_link`, when it
    has an ``env.json``). Each row's time is the slowest rank's mean per call
    (``hpcml_mean_us``) where the bench recorded it, else its median.

    Hockney's two-point fit: alpha and beta go exactly through the smallest and the largest
    size timed (``points`` and ``rms_rel_error`` describe all rows). A least-squares fit over
    every size would let the middle sizes set beta, and on a real link the time per byte is not
    constant: on a token-bucket link the bucket carries part of a 1 MiB message at memory
    speed, so such a fit predicts a 4 MiB Allreduce 20-30 % too fast (measured:
    ``docs/guide/multi-node-local-cluster.md``). Time the bench up to the size the job sends.
    A one-line ``UsageError`` when a directory is not such a run (with >= 2 ranks) or the P
    differ."""
    sizes: list[float] = []
    seconds: list[float] = []
    ranks = set()
    for bench_dir in bench_dirs:
        summary = _read(Path(bench_dir), "summary.json")
        try:
            rows = [r for r in summary.get("rows", []) if r.get("op") == "Allreduce"]
            p = int(summary.get("ranks", 1))
            sizes += [float(r["bytes"]) for r in rows]
            seconds += [float(r.get("hpcml_mean_us") or r["hpcml_us"]) * 1e-6 for r in rows]
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            raise _damaged(Path(bench_dir), exc) from None
        if p < 2 or not rows:
            raise UsageError(f"--bench {bench_dir}: needs Allreduce rows measured on >= 2 ranks "
                             "(run `mpiexec -n 4 hpcml bench collectives --set "
                             "'ops=[\"Allreduce\"]'`)")
        ranks.add(p)
    if len(ranks) != 1:
        raise UsageError(f"--bench: the runs were measured at different P ({sorted(ranks)}); "
                         "give runs of one P")
    p = ranks.pop()
    lo, hi = sizes.index(min(sizes)), sizes.index(max(sizes))
    try:
        ends = fit([sizes[lo], sizes[hi]], [seconds[lo], seconds[hi]], p)
    except ValueError as exc:
        raise UsageError(f"--bench {bench_dirs[0]}: {exc}") from None
    rel = [(ends.allreduce_seconds(n, p) - t) / t for n, t in zip(sizes, seconds, strict=True)]
    model = dataclasses.replace(ends, points=len(sizes),
                                rms_rel_error=math.sqrt(sum(r * r for r in rel) / len(rel)))
    env = Path(bench_dirs[0]) / "env.json"
    return dataclasses.replace(model, link=bench_link(_read(env.parent, "env.json"))
                               if env.is_file() else "")


def build_table(series: Sequence[Measurement], mode: str, model: AlphaBeta | None,
                max_ranks: int) -> list[dict[str, Any]]:
    """Measured rows then projected rows (pure)."""
    series = sorted(series, key=lambda m: m.ranks)
    base = series[0]
    t_model0 = model_time(base, mode, model, base.ranks) if model else None
    rows = []
    for m in series:
        speedup, eff = efficiency(mode, base.ranks, base.time, m.ranks, m.time)
        row = {"P": m.ranks, "source": "measured", "time": m.time, "compute": m.compute,
               "comm": m.comm, "speedup": speedup, "efficiency": eff,
               "oversubscribed": m.ranks_per_host > m.cores > 0, "model_time": None,
               "model_efficiency": None}
        if model:
            row["model_time"] = model_time(base, mode, model, m.ranks)
            row["model_efficiency"] = efficiency(mode, base.ranks, t_model0, m.ranks,
                                                 row["model_time"])[1]
        rows.append(row)
    if model:
        for p in projection_ranks(series[-1].ranks, max_ranks):
            t, comm = model_time(base, mode, model, p), model_comm(base, model, p)
            speedup, eff = efficiency(mode, base.ranks, t_model0, p, t)
            rows.append({"P": p, "source": "projection", "time": t, "compute": t - comm,
                         "comm": comm, "speedup": speedup, "efficiency": eff,
                         "oversubscribed": False, "model_time": t, "model_efficiency": eff})
    return rows


def series_mode(series: Sequence[Measurement], mode: str | None) -> str:
    """The scaling mode: ``mode`` if given, else the one every run reports."""
    if mode:
        return mode
    modes = {m.mode for m in series}
    if len(modes) != 1 or None in modes:
        raise UsageError("--mode: the runs do not all say weak or strong; pass --mode weak or "
                         "--mode strong")
    return modes.pop()


def to_json(series: Sequence[Measurement], model: AlphaBeta | None,
            rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    return {"mode": mode, "runs": [asdict(m) for m in series],
            "alpha_beta": asdict(model) if model else None, "rows": rows,
            "measured_up_to": max(m.ranks for m in series)}
