"""Submission files: which hpcml job to run under Slurm, on what resources, over which grid.

A submission file is TOML (``jobs/slurm-*.toml``)::

    job = "scaling.toml"          # the hpcml job file, relative to this file
    set = ["steps=40"]            # --set overrides for every run
    [slurm]                        # resources and template (all optional; relative paths
                                   # are relative to the directory you submit from)
    nodes = 1
    ntasks_per_node = 2
    time = "00:10:00"
    [sweep]                        # optional grid: key -> list of values (any job key)
    lr = [0.1, 0.5]
    [scaling]                      # optional series of rank counts (template "scaling")
    ranks = [1, 2, 4]

A plain hpcml job file (one with a top-level ``kind``) is accepted too and means "this job with
default resources". :func:`load` validates everything before anything is submitted: the
resources, and the job file under every sweep point and every rank count with the job kind's own
schema, so an unknown sweep key or a bad value exits 2 with the usual one-line message.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from hpcml.config import apply_overrides, build, load_job_file, option, read_toml
from hpcml.errors import ConfigError, UsageError
from hpcml.jobs import job_kind
from hpcml.slurm.sweep import flatten_grid, grid_points, point_overrides, toml_value

TEMPLATES = ("single", "multi-node", "array", "scaling")
TIME_RE = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")
# an `extra` item: a long sbatch option, alone or with a value after "="
EXTRA_RE = re.compile(r"(--[a-z][a-z0-9-]*)(=.*)?", re.DOTALL)
# sbatch options hpcml writes itself from [slurm] keys (sbatch takes the last of a repeated one)
MANAGED = {"--job-name": "slurm.job_name", "--nodes": "slurm.nodes",
           "--ntasks": "slurm.ntasks_per_node", "--ntasks-per-node": "slurm.ntasks_per_node",
           "--cpus-per-task": "slurm.cpus_per_task", "--time": "slurm.time",
           "--output": "slurm.runs_dir", "--open-mode": "slurm.runs_dir",
           "--partition": "slurm.partition", "--account": "slurm.account",
           "--overcommit": "slurm.overcommit", "--signal": "slurm.signal_seconds",
           "--requeue": "slurm.requeue", "--no-requeue": "slurm.requeue", "--array": "[sweep]"}


@dataclasses.dataclass
class SlurmOptions:
    template: str = option("auto", choices=("auto", *TEMPLATES),
                           help="auto: array with [sweep], scaling with [scaling], multi-node "
                                "with nodes > 1, else single")
    nodes: int = option(1, min=1, help="#SBATCH --nodes")
    ntasks_per_node: int = option(1, min=1, help="#SBATCH --ntasks-per-node (MPI ranks)")
    cpus_per_task: int = option(1, min=1, help="#SBATCH --cpus-per-task (torch threads/rank)")
    time: str = option("00:30:00", help="#SBATCH --time, e.g. 00:30:00 or 1-00:00:00")
    partition: str = option("", help="#SBATCH --partition; empty = the cluster default")
    account: str = option("", help="#SBATCH --account; empty = your default account")
    launcher: str = option("mpiexec", choices=("mpiexec", "srun"),
                           help="mpiexec (Hydra, from the mpich wheel) or srun --mpi=pmi2")
    signal_seconds: int = option(120, min=0,
                                 help="SIGUSR1 this many seconds before the time limit; 0 = off")
    requeue: bool = option(True, help="requeue after a checkpoint on SIGUSR1/SIGTERM")
    overcommit: bool = option(False, help="#SBATCH --overcommit (more ranks than CPUs)")
    runs_dir: str = option("runs/slurm", help="root of run directories and Slurm output files")
    job_name: str = option("", help="#SBATCH --job-name; empty = the job's name or kind")
    extra: list[str] = option([], help="more sbatch options, each \"--name\" or \"--name=value\" "
                                       "(the value is quoted), e.g. [\"--qos=debug\"]")


@dataclasses.dataclass
class ScalingSeries:
    ranks: list[int] = option([], min=1, help="rank counts of a scaling series, e.g. [1, 2, 4]")


@dataclasses.dataclass
class SubmitFile:
    job: str = option("", help="the hpcml job file (relative to this file)")
    set: list[str] = option([], help="--set KEY=VALUE overrides for every run")
    slurm: SlurmOptions = option(SlurmOptions())
    sweep: dict[str, Any] = option({}, help="grid: job key -> list of values")
    scaling: ScalingSeries = option(ScalingSeries())


@dataclasses.dataclass
class Spec:
    """A validated submission: resolved paths, resources, and the sweep points."""

    source: Path
    job: Path
    kind: str
    name: str
    sets: list[str]
    slurm: SlurmOptions
    template: str
    sweep: dict[str, list[Any]]
    points: list[dict[str, Any]]
    ranks: list[int]

    @property
    def ntasks(self) -> int:
        return self.slurm.nodes * self.slurm.ntasks_per_node


def _template(sub: SubmitFile) -> str:
    if sub.slurm.template != "auto":
        return sub.slurm.template
    if sub.sweep:
        return "array"
    if sub.scaling.ranks:
        return "scaling"
    return "multi-node" if sub.slurm.nodes > 1 else "single"


def check_text(field: str, value: str, header: bool = False) -> None:
    """Refuse text that cannot reach the sbatch script as one shell-quoted word: control,
    line-separator and other non-printing characters (a newline would end a ``#SBATCH`` line or
    a comment and start a command), and in ``#SBATCH`` values (``header``) a backslash, which
    sbatch reads as an escape even inside quotes. Raises ``ConfigError`` naming ``field``."""
    bad = next((ch for ch in value if not ch.isprintable()), None)
    if bad is not None:
        raise ConfigError(field, f"contains the non-printing character {bad!r}",
                          "remove control characters, newlines and line separators")
    if header and "\\" in value:
        raise ConfigError(field, "contains a backslash, which sbatch reads as an escape",
                          "remove the backslash")


def check_name(field: str, name: str) -> None:
    """The job name reaches ``--job-name``, the run directory and the output file name: one
    printable word-safe string without ``/``. Raises ``ConfigError`` naming ``field``."""
    check_text(field, name, header=True)
    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(field, f"{name!r} cannot name a directory",
                          "use letters, digits, '-', '_' or '.' and no '/'")


def check_runs_dir(path: str) -> None:
    """``runs_dir`` (as given, or resolved) reaches ``#SBATCH --output``: printable, no
    backslash, and no ``%``, which sbatch would expand there. Raises ``ConfigError``."""
    check_text("slurm.runs_dir", path, header=True)
    if "%" in path:
        raise ConfigError("slurm.runs_dir", f"{path!r} contains '%', which sbatch expands in "
                          "--output", "choose a directory without '%'")


def _check_extra(extra: list[str]) -> None:
    for i, item in enumerate(extra):
        field = f"slurm.extra[{i}]"
        check_text(field, item, header=True)
        match = EXTRA_RE.fullmatch(item)
        if not match:
            raise ConfigError(field, f"{item!r} is not a long sbatch option",
                              "write \"--name\" or \"--name=value\", e.g. \"--qos=debug\"")
        if match.group(1) in MANAGED:
            raise ConfigError(field, f"{match.group(1)} is written by hpcml",
                              f"use {MANAGED[match.group(1)]} instead")


def _has_table(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(map(_has_table, value)))


def _check_sweep_value(field: str, value: Any) -> None:
    """A sweep value is a scalar or an array of them, rendered on one line as ``--set``
    TOML; a table would replace the whole section it names, so it is refused."""
    if _has_table(value):
        raise ConfigError(field, f"a table is not a sweep value, got {value!r}",
                          f"sweep its keys instead: [{field}] key = [values]")
    check_text(field, toml_value(value))


def _check(sub: SubmitFile, template: str) -> None:
    for key in ("partition", "account"):
        check_text(f"slurm.{key}", getattr(sub.slurm, key), header=True)
    check_runs_dir(sub.slurm.runs_dir)
    if sub.slurm.job_name:
        check_name("slurm.job_name", sub.slurm.job_name)
    _check_extra(sub.slurm.extra)
    for i, item in enumerate(sub.set):
        check_text(f"set[{i}]", item)
    if not TIME_RE.fullmatch(sub.slurm.time):
        raise ConfigError("slurm.time", f"{sub.slurm.time!r} is not a Slurm time",
                          "use MM, HH:MM:SS or D-HH:MM:SS")
    if sub.sweep and template != "array":
        raise ConfigError("slurm.template", f"[sweep] needs the array template, not {template!r}",
                          "remove slurm.template or set it to \"array\"")
    if template == "array" and not sub.sweep:
        raise ConfigError("sweep", "the array template needs a [sweep] grid",
                          "add [sweep] key = [values], or choose another template")
    if template == "scaling" and not sub.scaling.ranks:
        raise ConfigError("scaling.ranks", "the scaling template needs rank counts",
                          "add [scaling] ranks = [1, 2, 4]")
    slots = sub.slurm.nodes * sub.slurm.ntasks_per_node
    if template == "scaling" and max(sub.scaling.ranks) > slots and not sub.slurm.overcommit:
        raise ConfigError("scaling.ranks", f"{max(sub.scaling.ranks)} ranks exceed the "
                          f"{slots} tasks requested", "raise slurm.ntasks_per_node or nodes")


def load(path: str | Path, resources: dict[str, Any] | None = None) -> Spec:
    """Read and validate a submission (or plain job) file; ``resources`` are command-line
    overrides of ``[slurm]`` keys (None values ignored). Raises ``UsageError`` (exit 2)."""
    path = Path(path)
    try:
        check_text("JOB_FILE", str(path))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    data = read_toml(path)
    if "kind" in data:
        data = {"job": path.name}
    data = dict(data)
    slurm = dict(data.get("slurm", {}))
    slurm.update({k: v for k, v in (resources or {}).items() if v is not None})
    data["slurm"] = slurm
    try:
        sub = build(SubmitFile, data)
        if not sub.job:
            raise ConfigError("job", "missing", "add job = \"path/to/job.toml\"")
        check_text("job", sub.job)
        template = _template(sub)
        _check(sub, template)
        sweep = flatten_grid(sub.sweep)
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.{key}", f"must be a non-empty list, got {values!r}",
                                  f"e.g. {key} = [1, 2]")
            for value in values:
                _check_sweep_value(f"sweep.{key}", value)
    except ConfigError as exc:
        raise UsageError(f"{path}: {exc}") from None
    job_path = (path.parent / sub.job).resolve()
    job_data = apply_overrides(read_toml(job_path), sub.set)
    if not job_data.get("kind"):
        raise UsageError(f"{job_path}: kind: missing; add e.g. kind = \"scaling\"")
    schema = job_kind(job_data["kind"]).config
    points = grid_points(sweep)
    sizes = sub.scaling.ranks if template == "scaling" else [sub.slurm.nodes
                                                             * sub.slurm.ntasks_per_node]
    for point in points:
        point_data = apply_overrides(job_data, point_overrides(point))
        for size in sizes:
            where = f"{path} [sweep] {point}" if point else str(job_path)
            load_job_file(schema, point_data, where, size)
    name = sub.slurm.job_name or job_data.get("name") or job_data["kind"]
    if not sub.slurm.job_name:
        try:
            check_name("name" if job_data.get("name") else "kind", name)
        except ConfigError as exc:
            raise UsageError(f"{job_path}: {exc}") from None
    return Spec(source=path.resolve(), job=job_path, kind=job_data["kind"], name=name,
                sets=list(sub.set), slurm=sub.slurm, template=template, sweep=sweep,
                points=points, ranks=list(sub.scaling.ranks))
