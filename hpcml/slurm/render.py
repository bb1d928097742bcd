"""Render a validated :class:`~hpcml.slurm.spec.Spec` into an sbatch script (pure text).

A script is the ``#SBATCH`` header made from ``[slurm]``, the shared preamble
(``templates/common.sh``: launcher, signal forwarding, resume-or-skip, requeue) and the body of
one template (``templates/<template>.sh``). Placeholders are ``{{name}}``; every value is
shell-quoted where it lands in a command, and an unknown placeholder is an error, so a template
and this module cannot drift apart silently.

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

from hpcml.slurm.spec import Spec
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


def header(spec: Spec) -> list[str]:
    """The ``#SBATCH`` lines (pure)."""
    s = spec.slurm
    out_name = "%x-%A_%a.out" if spec.template == "array" else "%x-%j.out"
    lines = [
        f"--job-name={spec.name}",
        f"--nodes={s.nodes}",
        f"--ntasks={spec.ntasks}",
        f"--cpus-per-task={s.cpus_per_task}",
        f"--time={s.time}",
        f"--output={Path(s.runs_dir).resolve() / out_name}",
        "--open-mode=append",
    ]
    if s.partition:
        lines.append(f"--partition={s.partition}")
    if s.account:
        lines.append(f"--account={s.account}")
    if s.overcommit:
        lines.append("--overcommit")  # with --ntasks-per-node Slurm would still count CPUs
    else:
        lines.append(f"--ntasks-per-node={s.ntasks_per_node}")
    if s.signal_seconds:
        lines.append(f"--signal=B:USR1@{s.signal_seconds}")
    lines.append("--requeue" if s.requeue else "--no-requeue")
    if spec.template == "array":
        lines.append(f"--array=0-{len(spec.points) - 1}")
    lines += s.extra
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
    where the job runs and relative paths resolve."""
    s = spec.slurm
    values = {
        "python": shlex.quote(sys.executable),
        "job": shlex.quote(str(spec.job)),
        "sets": " ".join(f"--set {shlex.quote(o)}" for o in spec.sets),
        "runs_dir": shlex.quote(str(Path(s.runs_dir).resolve())),
        "workdir": shlex.quote(str(Path(workdir or Path.cwd()).resolve())),
        "signal_seconds": str(s.signal_seconds),
        "requeue": "1" if s.requeue else "0",
        "launch": _launch_line(spec),
        "name": spec.name,
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
        f"# Rendered by `hpcml slurm render {spec.source.name}` on {stamp}; template "
        f"{spec.template!r}.",
        f"# Job file: {spec.job} (kind {spec.kind}). Submit with `sbatch` or `hpcml slurm "
        "submit`.",
    ]
    return "\n".join([*intro, *header(spec), "", common.rstrip(), "", body.rstrip(), ""])
