"""Run a rendered sbatch script without Slurm: ``python``, ``mpiexec`` (beside it), ``srun`` and
``scontrol`` replaced by stubs that record their argv, so a test sees exactly which words bash
passed to each program and whether the script asked Slurm to requeue.

The python stub also plays a run for ``python -m hpcml run ...``: it sends ``STUB_SIGNAL`` (if
set) to the batch shell, waits for the shell to forward SIGUSR1 back, and writes the run's
``summary.json`` with status ``STUB_STATUS`` under the ``runs_dir`` it was given. ``-c`` code
(the script reading a summary) runs in the real interpreter.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

REAL_PY = sys.executable  # before the fixture points sys.executable at the stub
RECORD = """#!/bin/bash
{ printf '%s\\0' "$(basename "$0")" "$@"; printf '\\n'; } >> "$STUB_LOG"
"""
STUBS = {
    "srun": RECORD,
    "scontrol": RECORD,
    "mpiexec": RECORD + """[ "$1" = -n ] && shift 2
[ "$1" = -ppn ] && shift 2
exec "$@"
""",
    "python": RECORD + """[ "$1" = -c ] && exec "$REAL_PY" "$@"
[ "$3" = run ] || exit 0
for a in "$@"; do case $a in runs_dir=/*) dir=${a#runs_dir=} ;; esac; done
trap 'echo USR1 >> "$STUB_LOG.forwarded"' USR1
if [ -n "${STUB_SIGNAL:-}" ]; then
  kill "-$STUB_SIGNAL" "$PPID"
  while [ ! -s "$STUB_LOG.forwarded" ]; do sleep 0.05; done
fi
mkdir -p "$dir/run-1"
printf '{"status": "%s"}\\n' "${STUB_STATUS:-complete}" > "$dir/run-1/summary.json"
""",
}


@pytest.fixture
def stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stub directory, made ``sys.executable``'s: scripts rendered in the test call its
    python and mpiexec, and :func:`run_script` puts it first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    return bin_dir


def run_script(text: str, workdir: Path, **env: str,
               ) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Execute the script in ``workdir`` as Slurm job 7 (array task 0) would, with the stubs
    (the ``stubs`` fixture's) first on PATH and ``env`` added; returns the process and the
    stubs' calls in order, each ``[program, *argv]`` (of this call only)."""
    script = workdir / "job.sbatch"
    script.write_text(text)
    log = workdir / "calls.log"
    for old in (log, workdir / "calls.log.forwarded"):
        old.unlink(missing_ok=True)
    full_env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "STUB_LOG": str(log),
                "REAL_PY": REAL_PY,
                "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_ARRAY_JOB_ID": "7",
                "SLURM_ARRAY_TASK_ID": "0", **env}
    res = subprocess.run(["bash", str(script)], cwd=workdir, env=full_env, capture_output=True,
                         text=True, timeout=60)
    calls = [record.split("\0")[:-1] for record in log.read_text().split("\n")[:-1]]
    return res, calls
