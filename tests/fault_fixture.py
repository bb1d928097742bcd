"""Real faults for the straggler tests: start an ``hpcml`` job under mpiexec, find the PID of a
given MPI rank (MPICH's Hydra puts ``PMI_RANK`` in each rank's environment) and freeze it with
``SIGSTOP`` / thaw it with ``SIGCONT`` from the test process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcml.testing import mpiexec


def start(nranks: int, *args: str, cwd: str | Path) -> subprocess.Popen[str]:
    """``mpiexec -n nranks python -m hpcml ARGS`` (plain python for one rank) in its own
    session, output to cwd/stdout.txt."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = [*mpiexec(), "-n", str(nranks)] if nranks > 1 else []
    with open(Path(cwd, "stdout.txt"), "w") as out:
        return subprocess.Popen([*launcher, sys.executable, "-m", "hpcml", *args], cwd=cwd,
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in Path(task, "children").read_text().split()]
        except OSError:
            continue
    return children + [d for c in children for d in _descendants(c)]


def rank_pid(proc: subprocess.Popen[str], rank: int, timeout: float = 60.0) -> int:
    """The PID of MPI rank ``rank`` of the job ``proc`` launched (waits until it exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _descendants(proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PMI_RANK={rank}".encode() in env and b"python" in Path(
                    f"/proc/{pid}/cmdline").read_bytes():
                return pid
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"rank {rank} of the job never appeared")


def wait_for_line(cwd: str | Path, text: str, proc: subprocess.Popen[str],
                  timeout: float = 60.0) -> None:
    """Block until the job's output contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in Path(cwd, "stdout.txt").read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"job ended before printing {text!r}:\n"
                               + Path(cwd, "stdout.txt").read_text()[-3000:])
        time.sleep(0.05)
    raise RuntimeError(f"job never printed {text!r}")


def finish(proc: subprocess.Popen[str], cwd: str | Path, timeout: float) -> tuple[int, str]:
    """Wait for the job (kill its session on timeout and raise); (exit code, output)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError(f"job did not end in {timeout} s:\n"
                           + Path(cwd, "stdout.txt").read_text()[-3000:]) from None
    return code, Path(cwd, "stdout.txt").read_text()


def metrics(cwd: str | Path) -> list[dict]:
    """The records of the (only) run directory's metrics.jsonl under cwd/runs (none yet: [])."""
    found = list(Path(cwd, "runs").glob("*/metrics.jsonl"))
    if not found:
        return []
    lines = found[0].read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for_metrics(cwd: str | Path, count: int, proc: subprocess.Popen[str],
                     timeout: float = 60.0) -> None:
    """Block until the run has logged ``count`` metrics records (the job is under way)."""
    deadline = time.monotonic() + timeout
    while len(metrics(cwd)) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the job never logged its metrics:\n"
                               + Path(cwd, "stdout.txt").read_text()[-3000:])
        time.sleep(0.05)
