"""Writing a scaling report: ``table.md``, ``scaling.png``, ``report.json`` (rank 0 / no MPI)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcml.bench.report import markdown_table, pyplot, save_figure
from hpcml.errors import UsageError
from hpcml.report.alphabeta import AlphaBeta
from hpcml.report.scaling import Measurement, to_json
from hpcml.rundir import atomic_write, directory_problem, dumps, read_json

COLUMNS = [("P", "P", "d"), ("source", "source", ""), ("time", "time", ".4g"),
           ("compute", "compute", ".4g"), ("comm", "comm", ".4g"),
           ("speedup", "speed-up", ".3f"), ("efficiency", "efficiency", ".3f"),
           ("model_time", "model time", ".4g"), ("model_efficiency", "model eff.", ".3f"),
           ("note", "note", "")]


def markdown(series: Sequence[Measurement], model: AlphaBeta | None,
             rows: list[dict[str, Any]], mode: str) -> str:
    """The report text: table plus where measurement ends and what the model assumes."""
    last = max(m.ranks for m in series)
    unit = series[0].unit
    table_rows = [{**r, "note": "oversubscribed" if r["oversubscribed"] else
                   ("projection" if r["source"] == "projection" else "")} for r in rows]
    lines = [f"# {mode.capitalize()} scaling ({unit}; baseline P = {min(m.ranks for m in series)})",
             "", markdown_table(table_rows, COLUMNS), "",
             f"Measured: P = {', '.join(str(m.ranks) for m in series)} on "
             f"{series[-1].hosts} host(s), {series[-1].cores} cores per host. "
             f"**Measurement ends at P = {last}; rows marked `projection` are the alpha-beta "
             "model, not measurements.**"]
    if any(r["oversubscribed"] for r in rows):
        lines.append("Rows marked `oversubscribed` ran more ranks than cores on a host, so "
                     "ranks shared cores; the model assumes one core per rank.")
    base = min(series, key=lambda m: m.ranks)
    if model:
        lines.append(f"Alpha-beta fit (Allreduce, {model.points} sizes at P = {model.ranks}; "
                     f"measured link: {model.link or 'not recorded'}): "
                     f"alpha = {model.alpha * 1e6:.2f} us, beta = {model.beta * 1e9:.4f} ns/B "
                     f"({model.bandwidth_GBs:.2f} GB/s = {model.bandwidth_GBs * 8:.3g} Gbit/s), "
                     "rms relative error "
                     f"{model.rms_rel_error:.2f}. Projection: compute of P = "
                     f"{base.ranks} ({'divided by P' if mode == 'strong' else 'constant'})"
                     f" + the rest of P = {base.ranks}'s unit ({base.other:.4g} s, constant)"
                     f" + {base.allreduce_calls:g} x Allreduce of {base.allreduce_bytes:.0f} B"
                     f" + {base.small_allreduces:g} x Allreduce of 8 B per unit.")
        lines.append(_model_check(rows))
    else:
        lines.append("No projection: pass --bench RUN_DIR of `hpcml bench collectives`.")
    return "\n".join(lines) + "\n"


def _model_check(rows: list[dict[str, Any]]) -> str:
    """How far the model is from the largest measured P: the projection's credibility."""
    last = [r for r in rows if r["source"] == "measured"][-1]
    gap = last["model_efficiency"] - last["efficiency"]
    text = (f"Model check at P = {last['P']} (largest measured): model efficiency "
            f"{last['model_efficiency']:.3f} vs measured {last['efficiency']:.3f}.")
    if gap > 0.1:
        text += (" The model counts only message latency and bandwidth, not ranks sharing "
                 "cores or waiting for slower ranks, so read the projection as an upper bound.")
    return text


def plot(rows: list[dict[str, Any]], mode: str, measured_up_to: int, path: Path) -> None:
    plt = pyplot()

    meas = [r for r in rows if r["source"] == "measured"]
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    ax_e.plot([r["P"] for r in meas], [r["efficiency"] for r in meas], "o-", label="measured")
    modelled = [r for r in rows if r["model_efficiency"] is not None]
    if modelled:
        ax_e.plot([r["P"] for r in modelled], [r["model_efficiency"] for r in modelled], "x--",
                  label="alpha-beta model (projection right of the line)")
    ax_t.plot([r["P"] for r in meas], [r["time"] for r in meas], "o-", label="measured")
    proj = [r for r in rows if r["source"] == "projection"]
    if proj:
        ax_t.plot([r["P"] for r in proj], [r["time"] for r in proj], "x--", label="projection")
    for ax in (ax_e, ax_t):
        ax.axvline(measured_up_to, color="grey", linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks P")
        ax.legend(fontsize=7)
    ax_e.set_ylim(0, 1.1)
    ax_e.set_ylabel(f"{mode} scaling efficiency")
    ax_e.set_title(f"{mode} scaling: measured to P = {measured_up_to}, projected beyond")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per unit (s)")
    save_figure(fig, path)


FILES = ("table.md", "report.json", "scaling.png")


def check_out(out: Path) -> None:
    """Raise a one-line ``UsageError`` unless the report may write its :data:`FILES` into
    ``out``: a directory that can be made or takes files, where no file of those names exists
    unless an earlier report wrote them (its ``report.json`` is one). Reads only."""
    problem = directory_problem(out)
    if problem:
        raise UsageError(f"--out: cannot write the report into {str(out)!r}: {problem} (choose "
                         "a writable directory)")
    present = [name for name in FILES if (out / name).exists()]
    if not present:
        return
    try:
        previous = read_json(out / "report.json")
        ours = isinstance(previous, dict) and {"mode", "rows", "measured_up_to"} <= set(previous)
    except UsageError:
        ours = False
    if not ours or not all((out / name).is_file() for name in present):
        raise UsageError(f"--out: {str(out)!r} holds {', '.join(present)} that no scaling report "
                         "wrote (choose a new directory; a report replaces only its own files)")


def write(out: Path, series: Sequence[Measurement], model: AlphaBeta | None,
          rows: list[dict[str, Any]], mode: str) -> str:
    """Write the three files into ``out`` (check it first with :func:`check_out`); returns
    the markdown."""
    text = markdown(series, model, rows, mode)
    atomic_write(out / "table.md", text)
    atomic_write(out / "report.json", dumps(to_json(series, model, rows, mode)))
    plot(rows, mode, max(m.ranks for m in series), out / "scaling.png")
    return text
