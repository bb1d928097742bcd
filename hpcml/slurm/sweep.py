"""Parameter sweeps as Slurm job arrays: grid -> points, array index -> point, and results.

The grid is the ``[sweep]`` table of a submission file: each key is a job-file key (dotted for
nested sections, e.g. ``stragglers.model`` or ``[sweep.stragglers] model = [...]``) and each value
the list of values to try. Points are the Cartesian product in the order the keys appear, the last
key varying fastest; array index ``i`` is point ``i`` (a mixed-radix number). Each array task runs
in ``<sweep dir>/point-<i>/``, and ``sweep.json`` in the sweep directory records the points, so
:func:`status` and :func:`collect` can name every point that is missing or failed.
"""

from __future__ import annotations

import csv
import io
import itertools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import tomli_w

from hpcml.errors import UsageError
from hpcml.rundir import read_json

MANIFEST = "sweep.json"


def flatten_grid(grid: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables become dotted keys: {"a": {"b": [1]}} -> {"a.b": [1]} (pure)."""
    out: dict[str, Any] = {}
    for key, value in grid.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten_grid(value, name))
        else:
            out[name] = value
    return out


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """All points of the grid, last key fastest; ``[{}]`` for an empty grid (pure)."""
    flat = flatten_grid(grid)
    keys = list(flat)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(flat[k] for k in keys))]


def point_index(grid: dict[str, list[Any]], point: dict[str, Any]) -> int:
    """Inverse of :func:`grid_points`: the array index of ``point`` (pure)."""
    flat = flatten_grid(grid)
    index = 0
    for key, values in flat.items():
        index = index * len(values) + values.index(point[key])
    return index


def toml_value(value: Any) -> str:
    """``value`` (a scalar or an array of them) written as a one-line TOML literal, the form
    ``--set key=VALUE`` parses back (pure). ``ValueError`` for a table, which ``--set`` would
    put in place of a whole section."""
    if isinstance(value, dict):
        raise ValueError(f"a table is not a --set value: {value!r}")
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def point_overrides(point: dict[str, Any]) -> list[str]:
    """``--set`` strings for one point: ``["lr=0.1", "name=\\"a\\""]`` (pure)."""
    return [f"{key}={toml_value(value)}" for key, value in point.items()]


def write_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> Path:
    from hpcml.rundir import atomic_write, dumps

    return atomic_write(sweep_dir / MANIFEST, dumps(manifest))


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    """The sweep's manifest; a one-line ``UsageError`` when it is missing, not JSON or lacks the
    list of points."""
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{sweep_dir}: not a sweep directory (no {MANIFEST}; give the directory "
                         "`hpcml slurm submit` printed)")
    manifest = read_json(path)
    points = manifest.get("points") if isinstance(manifest, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise UsageError(f"{path}: no list of points in it; not a manifest `hpcml slurm submit` "
                         "wrote, or a damaged one")
    return manifest


def _run_dir(point_dir: Path) -> Path | None:
    runs = sorted(p.parent for p in point_dir.glob("*/config.toml"))
    return runs[-1] if runs else None


def _queue_states(job_id: str | None) -> dict[int, str]:
    """Array task -> Slurm state, from ``squeue`` (empty when Slurm cannot be asked)."""
    if not job_id or not shutil.which("squeue"):
        return {}
    res = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", str(job_id),
                          "-o", "%K %T"], capture_output=True, text=True)
    states = {}
    for line in res.stdout.splitlines():
        task, _, state = line.partition(" ")
        if task.isdigit():
            states[int(task)] = state.strip()
    return states


def _summary(path: Path) -> dict[str, Any] | None:
    """A point's summary, or None when it is not a JSON object (a damaged run directory)."""
    try:
        summary = read_json(path)
    except UsageError:
        return None
    return summary if isinstance(summary, dict) else None


def point_states(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One record per point: index, point, state, run_dir, summary (or None).

    State: ``complete`` or ``preempted`` from the run's summary (``damaged`` when the summary
    is not a JSON object); else the Slurm state while
    the task is pending or running; else ``failed`` (a run directory without a summary) or
    ``missing`` (no run directory)."""
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    queue = _queue_states(manifest.get("job_id"))
    records = []
    for index, point in enumerate(manifest["points"]):
        run = _run_dir(sweep_dir / f"point-{index}")
        summary_path = run / "summary.json" if run else None
        summary = None
        if summary_path is not None and summary_path.is_file():
            summary = _summary(summary_path)
            state = summary.get("status", "complete") if summary is not None else "damaged"
        elif queue.get(index) in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"):
            state = queue[index].lower()
        else:
            state = "failed" if run else "missing"
        records.append({"index": index, "point": point, "state": state,
                        "run_dir": str(run) if run else "", "summary": summary})
    return records


def _scalars(summary: dict[str, Any] | None, skip: set[str]) -> dict[str, Any]:
    return {k: v for k, v in (summary or {}).items()
            if k not in skip and isinstance(v, int | float | str) and not isinstance(v, bool)}


def collect(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], str, str, list[str]]:
    """Gather every point into one table. Returns (rows, csv text, markdown text, problems),
    where ``problems`` names each point that is not complete. Not collective."""
    records = point_states(sweep_dir)
    keys = list(records[0]["point"]) if records else []
    skip = {"kind", "status", *keys}
    metrics: list[str] = []
    for rec in records:
        metrics += [k for k in _scalars(rec["summary"], skip) if k not in metrics]
    rows = [{"index": r["index"], **r["point"], "state": r["state"],
             **_scalars(r["summary"], skip), "run_dir": r["run_dir"]} for r in records]
    columns = ["index", *keys, "state", *metrics, "run_dir"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    md = markdown(rows, ["index", *keys, "state", *metrics])
    problems = [f"point {r['index']} ({_describe(r['point'])}): {r['state']}"
                for r in records if r["state"] != "complete"]
    return rows, buf.getvalue(), md, problems


def _describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={toml_value(v)}" for k, v in point.items())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as a markdown table; empty cells for absent values (pure)."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
