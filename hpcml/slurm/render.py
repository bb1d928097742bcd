"""Render a validated :class:`~hpcml.slurm.spec.Spec` into an sbatch script (pure text).

A script is the ``#SBATCH`` header made from ``[slurm]``, the shared preamble
(``templates/common.sh``: launcher, signal forwarding, resume-or-skip, requeue) and the body of
one template (``templates/<template>.sh``). Placeholders are ``{{name}}``, and an unknown
placeholder is an error, so a template and this module cannot drift apart silently.

Quoting contract: every substituted string — in ``#SBATCH`` lines, comments and commands — is
one ``shlex.quote``d word (integers are written by this module), and :mod:`hpcml.slurm.spec`
has refused every string with a non-printing character (so nothing ends a line early) and every
``#SBATCH`` value with a backslash (sbatch's own parser reads ``'...'`` and ``"..."`` like the
shell but takes a backslash as an escape even inside quotes). So ``shlex.split`` of a rendered
line gives back the values, and sbatch reads the same ones. ``extra`` items are ``--name`` or
``--name=value`` with the value quoted the same way.

Launchers: ``mpiexec`` is the Hydra launcher of the mpich wheel hpcml installs; inside an
allocation it reads ``SLURM_*`` and starts its proxies with ``srun`` itself. ``srun`` uses
``srun --mpi=pmi2``, which the mpich wheel's PMI client speaks (tested in
``tests/test_slurm_cluster.py``).
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path

from hpcml.errors import ConfigError, UsageError
from hpcml.slurm.spec import Spec, check_runs_dir, check_text
from hpcml.slurm.sweep import point_overrides

TEMPLATE_DIR = Path(__file__).parent / "templates"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every ``{{key}}``; ``KeyError`` names a placeholder without a value (pure)."""
    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return PLACEHOLDER.sub(sub, text)


def launcher() -> Path:
    """The Hydra ``mpiexec`` beside this interpreter (the mpich wheel), else ``mpiexec``."""
    beside = Path(sys.executable).parent / "mpiexec"
    return beside if beside.exists() else Path("mpiexec")


def _extra(item: str) -> str:
    """``--name=value`` with the value quoted, ``--name`` as it is (checked by the spec)."""
    name, eq, value = item.partition("=")
    return f"{name}={shlex.quote(value)}" if eq else name


def header(spec: Spec) -> list[str]:
    """The ``#SBATCH`` lines, every value quoted (pure)."""
    s = spec.slurm
    q = shlex.quote
    out_name = "%x-%A_%a.out" if spec.template == "array" else "%x-%j.out"
    lines = [
        f"--job-name={q(spec.name)}",
        f"--nodes={s.nodes}",
        f"--ntasks={spec.ntasks}",
        f"--cpus-per-task={s.cpus_per_task}",
        f"--time={q(s.time)}",
        f"--output={q(str(Path(s.runs_dir).resolve() / out_name))}",
        "--open-mode=append",
    ]
    if s.partition:
        lines.append(f"--partition={q(s.partition)}")
    if s.account:
        lines.append(f"--account={q(s.account)}")
    if s.overcommit:
        lines.append("--overcommit")  # with --ntasks-per-node Slurm would still count CPUs
    else:
        lines.append(f"--ntasks-per-node={s.ntasks_per_node}")
    if s.signal_seconds:
        lines.append(f"--signal=B:USR1@{s.signal_seconds}")
    lines.append("--requeue" if s.requeue else "--no-requeue")
    if spec.template == "array":
        lines.append(f"--array=0-{len(spec.points) - 1}")
    lines += [_extra(item) for item in s.extra]
    return [f"#SBATCH {line}" for line in lines]


def _launch_line(spec: Spec) -> str:
    if spec.slurm.launcher == "srun":
        return 'srun --mpi=pmi2 --ntasks="$n" "$@"'
    ppn = f" -ppn {spec.slurm.ntasks_per_node}" if spec.template == "multi-node" else ""
    return f'{shlex.quote(str(launcher()))} -n "$n"{ppn} "$@"'


def _cases(spec: Spec) -> str:
    lines = []
    for index, point in enumerate(spec.points):
        args = " ".join(f"--set {shlex.quote(o)}" for o in point_overrides(point))
        lines.append(f"  {index}) POINT=({args}) ;;")
    return "\n".join(lines)


def render(spec: Spec, workdir: str | Path | None = None) -> str:
    """The complete sbatch script for ``spec``. ``workdir`` (default: the current directory) is
    where the job runs and relative paths resolve. Raises ``UsageError`` when that directory,
    the resolved runs directory or the interpreter's path cannot be quoted safely."""
    s = spec.slurm
    workdir = Path(workdir or Path.cwd()).resolve()
    runs_dir = Path(s.runs_dir).resolve()
    try:
        check_text("working directory", str(workdir))
        check_text("python", sys.executable)
        check_runs_dir(str(runs_dir))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    values = {
        "python": shlex.quote(sys.executable),
        "job": shlex.quote(str(spec.job)),
        "sets": " ".join(f"--set {shlex.quote(o)}" for o in spec.sets),
        "runs_dir": shlex.quote(str(runs_dir)),
        "workdir": shlex.quote(str(workdir)),
        "signal_seconds": str(s.signal_seconds),
        "requeue": "1" if s.requeue else "0",
        "launch": _launch_line(spec),
        "name": shlex.quote(spec.name),
        "ntasks_per_node": str(s.ntasks_per_node),
        "cases": _cases(spec),
        "ranks": " ".join(str(p) for p in spec.ranks),
        "pmax": str(max(spec.ranks, default=1)),
    }
    common = fill((TEMPLATE_DIR / "common.sh").read_text(), values)
    body = fill((TEMPLATE_DIR / f"{spec.template}.sh").read_text(), values)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    intro = [
        "#!/bin/bash",
        f"# Rendered by `hpcml slurm render {shlex.quote(spec.source.name)}` on {stamp}; "
        f"template {spec.template!r}.",
        f"# Job file: {shlex.quote(str(spec.job))} (kind {shlex.quote(spec.kind)}). Submit with "
        "`sbatch` or `hpcml slurm submit`.",
    ]
    return "\n".join([*intro, *header(spec), "", common.rstrip(), "", body.rstrip(), ""])
