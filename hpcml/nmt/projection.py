"""Projection of the reduction benchmark's measured rows to the paper's machine (arXiv
1905.04035: Stampede2, up to 300 nodes x 4 MPI processes = 1,200 for weak scaling, 400 for
strong scaling; 91 % and 65 % efficiency).

Measured (per method, from the rows of every P that was run): time per step, the exchange's
peak buffer bytes per rank and received bytes per rank per step, the process peak RSS per rank.
Projected, per method that reports its bytes (hpcml's exchanges and DDP; Horovod reports none):

- **bytes**: least-squares lines ``peak(P) = a + b P`` and ``received(P) = a_r + b_r P`` through
  the measured points. For a dense allreduce ``b`` is 0 (buffers = model bytes, flat in P); for
  the sparse allgather each rank receives every rank's payload, so ``b`` is the per-rank
  payload (in weak scaling exactly; in strong scaling too, because its all-vocabulary rows do
  not shrink with P while the looked-up rows, which do, sum to a constant);
- **time**: compute = the method's step time at the smallest measured P (divided by P / P0 for
  strong scaling), plus an Allreduce of ``a_r`` bytes in ``ceil(a_r / bucket)`` buckets and,
  when ``b_r > 0``, a ring allgather of ``b_r`` bytes per rank, on the alpha-beta model of
  :mod:`hpcml.report.alphabeta`: ``T_AR(n) = 2 ceil(log2 P) alpha + 2 (P-1)/P n beta`` per
  bucket, ``T_AG(m) = (P-1) (alpha + m beta)``. alpha/beta are fitted to a ``hpcml bench
  collectives`` run (``projection.bench``) or, by default, the nominal figures of Stampede2's
  Intel Omni-Path fabric (100 Gb/s = 12.5 GB/s per link, ~1 us MPI latency);
- **memory per node**: ``ranks_per_node x (RSS(P0) + peak(P) - peak(P0))``, against
  ``node_memory_gib`` (default 192: a Stampede2 SKX node's DDR4; a KNL node has 96 GB DDR4 +
  16 GB MCDRAM). The first P where a node runs out is reported. In strong scaling RSS(P0)
  holds the whole batch's activations, which shrink with P, so the node figure is an upper bound.

Caveats, printed with the table: compute comes from this machine (one thread per rank), not a
48-core SKX node, so compute is slower and the projected efficiency optimistic; contention,
stragglers and the coalescing of the gathered rows are not modelled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hpcml.bench.report import markdown_table, pyplot, save_figure
from hpcml.config import option
from hpcml.report.alphabeta import AlphaBeta, bandwidth_factor, latency_factor
from hpcml.report.scaling import fit_bench
from hpcml.rundir import RunDir

PAPER = {"weak": (1200, 0.91), "strong": (400, 0.65)}  # processes, efficiency (arXiv 1905.04035)
OMNIPATH = AlphaBeta(alpha=1e-6, beta=1 / 12.5e9, ranks=0, points=0, rms_rel_error=0.0)
KNL_NODE_GIB = 96 + 16


@dataclasses.dataclass
class ProjectionConfig:
    ranks: int = option(0, min=0, help="project to this many processes (0 = no projection)")
    ranks_per_node: int = option(4, min=1, help="MPI processes per node (the paper: 4)")
    node_memory_gib: float = option(192.0, gt=0.0, help="memory of one node, GiB (Stampede2 "
                                                        "SKX: 192)")
    bench: str = option("", help="a `hpcml bench collectives` run directory to fit alpha-beta "
                                 "to ('' = nominal Omni-Path: 1 us, 12.5 GB/s)")


def line_fit(ps: list[int], values: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line ``a + b P``; ``(mean, 0)`` from a single P or when
    the slope is under 1 % of the intercept (a flat series; slopes that small are rounding or
    the varying token counts of the batches, not a gather). Pure."""
    if len(set(ps)) >= 2:
        b, a = np.polyfit(np.asarray(ps, float), np.asarray(values, float), 1)
        if b >= 0.01 * max(abs(a), 1.0):
            return float(a), float(b)
    return float(np.mean(values)), 0.0


def projection_ranks(p_max: int, ranks: int) -> list[int]:
    """Powers of 4 above ``p_max`` and below ``ranks``, then ``ranks`` (pure)."""
    out, p = [], 4
    while p < ranks:
        if p > p_max:
            out.append(p)
        p *= 4
    return out + ([ranks] if ranks > p_max else [])


def exchange_seconds(model: AlphaBeta, p: int, allreduce_bytes: float, gather_bytes: float,
                     bucket_bytes: int) -> float:
    """Alpha-beta time of one step's exchange at ``p`` ranks (see module docstring). Pure."""
    if p <= 1:
        return 0.0
    buckets = max(1, math.ceil(allreduce_bytes / bucket_bytes))
    t = (buckets * latency_factor(p) * model.alpha
         + bandwidth_factor(p) * allreduce_bytes * model.beta)
    if gather_bytes > 0:
        t += (p - 1) * (model.alpha + gather_bytes * model.beta)
    return t


@dataclasses.dataclass(frozen=True)
class MethodModel:
    """What the projection keeps of one method's measured rows."""

    method: str
    p0: int
    compute_s: float
    peak: tuple[float, float]
    received: tuple[float, float]
    rss0: float | None
    peak0: float

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> MethodModel:
        rows = sorted(rows, key=lambda r: r["P"])
        ps = [r["P"] for r in rows]
        peak = line_fit(ps, [r["exchange_peak_bytes"] for r in rows])
        received = line_fit(ps, [r["recv_bytes_per_step"] for r in rows])
        return cls(rows[0]["method"], ps[0], rows[0]["step_ms"] / 1e3, peak, received,
                   rows[0].get("rss_peak_bytes"), float(rows[0]["exchange_peak_bytes"]))

    def peak_bytes(self, p: int) -> float:
        return self.peak[0] + self.peak[1] * p

    def node_bytes(self, p: int, ranks_per_node: int) -> float:
        per_rank = (self.rss0 - self.peak0 if self.rss0 else 0.0) + self.peak_bytes(p)
        return ranks_per_node * per_rank

    def step_seconds(self, model: AlphaBeta, p: int, scaling: str, bucket_bytes: int) -> float:
        compute = self.compute_s * (self.p0 / p if scaling == "strong" else 1.0)
        return compute + exchange_seconds(model, p, self.received[0], self.received[1],
                                          bucket_bytes)

    def first_p_out_of_memory(self, node_bytes: float, ranks_per_node: int) -> int | None:
        """Smallest P whose node memory exceeds ``node_bytes`` (None: never, flat in P)."""
        if self.peak[1] <= 0:
            return None if self.node_bytes(1, ranks_per_node) <= node_bytes else 1
        per_rank_fixed = (self.rss0 - self.peak0 if self.rss0 else 0.0) + self.peak[0]
        p = (node_bytes / ranks_per_node - per_rank_fixed) / self.peak[1]
        return max(1, math.floor(p) + 1)


def project(rows: list[dict[str, Any]], scaling: str, cfg: ProjectionConfig,
            bucket_bytes: int, model: AlphaBeta) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(table rows: measured then projected per method, facts: out-of-memory P per method and
    the paper's figure). Pure."""
    node = cfg.node_memory_gib * 2**30
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)
               if all(r["recv_bytes_per_step"] is not None and r["exchange_peak_bytes"]
                      is not None for r in rows if r["method"] == m)]
    out, facts = [], {"paper": PAPER[scaling], "out_of_memory_at": {}}
    for m in methods:
        mm = MethodModel.from_rows([r for r in rows if r["method"] == m])
        t0 = mm.step_seconds(model, mm.p0, scaling, bucket_bytes)
        p_max = max(r["P"] for r in rows if r["method"] == m)
        measured = sorted((r["P"], r["step_ms"] / 1e3) for r in rows if r["method"] == m)
        points = [(p, "measured", t) for p, t in measured]
        points += [(p, "projected", mm.step_seconds(model, p, scaling, bucket_bytes))
                   for p in projection_ranks(p_max, cfg.ranks)]
        t_base = measured[0][1]
        for p, source, t in points:
            ref = t_base if source == "measured" else t0
            eff = ref / t * (mm.p0 / p if scaling == "strong" else 1.0)
            node_b = mm.node_bytes(p, cfg.ranks_per_node)
            out.append({"method": m, "P": p, "source": source, "step_ms": t * 1e3,
                        "efficiency": eff, "exchange_peak_GiB": mm.peak_bytes(p) / 2**30,
                        "node_GiB": node_b / 2**30,
                        "fits_node": "yes" if node_b <= node else "NO (out of memory)"})
        facts["out_of_memory_at"][m] = mm.first_p_out_of_memory(node, cfg.ranks_per_node)
    return out, facts


def alpha_beta(cfg: ProjectionConfig) -> tuple[AlphaBeta, str]:
    """The network model and how it was obtained."""
    if cfg.bench:
        fitted = fit_bench(cfg.bench)
        return fitted, (f"alpha-beta fitted to {cfg.bench} (P = {fitted.ranks}; measured link: "
                        f"{fitted.link or 'not recorded'}): alpha {fitted.alpha * 1e6:.2f} us, "
                        f"{fitted.bandwidth_GBs:.2f} GB/s ({fitted.bandwidth_GBs * 8:.3g} "
                        "Gbit/s)")
    return OMNIPATH, "alpha-beta: nominal Intel Omni-Path (Stampede2), alpha 1 us, 12.5 GB/s"


def write_projection(rows: list[dict[str, Any]], cfg: Any, run_dir: RunDir) -> dict[str, Any]:
    """projection.md + projection.png of the merged benchmark rows ``rows`` (rank 0 only)."""
    pc: ProjectionConfig = cfg.projection
    if len({r["P"] for r in rows}) < 2:
        note = ("projection: the results hold one P only; run the series at two or more P "
                "(e.g. 1, 2, 4) to extrapolate")
        run_dir.write_text("projection.md", note + "\n")
        print(note)
        return {"note": note}
    model, source = alpha_beta(pc)
    table, facts = project(rows, cfg.scaling, pc, cfg.bucket_kib * 1024, model)
    p_paper, e_paper = PAPER[cfg.scaling]
    lines = [f"{cfg.scaling} scaling, measured on this machine up to P = "
             f"{max(r['P'] for r in rows)}; rows marked projected are the model's, not "
             "measurements.", source + ".",
             f"Node memory assumed: {pc.node_memory_gib:g} GiB for {pc.ranks_per_node} ranks "
             f"(Stampede2 SKX node: 192 GB DDR4; a KNL node has 96 GB + 16 GB MCDRAM).",
             f"Paper (arXiv 1905.04035, Stampede2, dense reduction): {e_paper:.0%} {cfg.scaling}"
             f"-scaling efficiency at {p_paper} processes."]
    for m, p in facts["out_of_memory_at"].items():
        lines.append(f"{m}: " + (f"exceeds {pc.node_memory_gib:g} GiB per node from P = {p} "
                                 f"({math.ceil(p / pc.ranks_per_node)} nodes)" if p
                                 else "per-rank memory flat in P, never exceeds the node"))
    lines.append("Compute is this machine's (one thread per rank), not an SKX node's; "
                 "contention and coalescing are not modelled: read efficiencies as upper "
                 "bounds." + (" Node memory keeps P0's activations (an upper bound)."
                              if cfg.scaling == "strong" else ""))
    text = markdown_table(table, [
        ("method", "method", ""), ("P", "P", "d"), ("source", "source", ""),
        ("step_ms", "ms/step", ".1f"), ("efficiency", "efficiency", ".3f"),
        ("exchange_peak_GiB", "exchange GiB/rank", ".3f"), ("node_GiB", "GiB/node", ".1f"),
        ("fits_node", f"fits {pc.node_memory_gib:g} GiB node", "")])
    run_dir.write_text("projection.md", text + "\n\n" + "\n".join(lines) + "\n")
    print(text + "\n" + "\n".join(lines))
    _plot(table, facts, cfg.scaling, pc, run_dir)
    return {"rows": table, **facts, "alpha_beta": source}


def _plot(table: list[dict[str, Any]], facts: dict[str, Any], scaling: str,
          pc: ProjectionConfig, run_dir: RunDir) -> None:
    plt = pyplot()
    fig, (eff_ax, mem_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, m in enumerate(dict.fromkeys(r["method"] for r in table)):
        for source, style in (("measured", "o-"), ("projected", "--")):
            sel = [r for r in table if r["method"] == m and r["source"] == source]
            if sel:
                label = f"{m} ({source})"
                eff_ax.plot([r["P"] for r in sel], [r["efficiency"] for r in sel], style,
                            color=f"C{i}", label=label)
                mem_ax.plot([r["P"] for r in sel], [r["node_GiB"] for r in sel], style,
                            color=f"C{i}", label=label)
    p_paper, e_paper = facts["paper"]
    eff_ax.plot([p_paper], [e_paper], "k*", markersize=14, label=f"paper: {e_paper:.0%}")
    eff_ax.set(xscale="log", xlabel="processes P", ylabel=f"{scaling} efficiency",
               title="efficiency: measured, then projected")
    mem_ax.axhline(pc.node_memory_gib, color="k", lw=1,
                   label=f"node memory {pc.node_memory_gib:g} GiB")
    mem_ax.axhline(KNL_NODE_GIB, color="gray", lw=1, ls=":", label="KNL node 96 + 16 GiB")
    mem_ax.set(xscale="log", yscale="log", xlabel="processes P",
               ylabel=f"memory per node, {pc.ranks_per_node} ranks (GiB)",
               title="process memory per node")
    for ax in (eff_ax, mem_ax):
        ax.legend(fontsize=7)
    save_figure(fig, run_dir.path / "projection.png")
