"""Real SIGUSR1/SIGTERM sent to the launcher (plain ``python`` at 1 rank, Hydra's ``mpiexec``,
which forwards them, at 4): a signal that arrives before the loop starts stops the run at its
first step boundary with a checkpoint and ``status = "preempted"`` (which ``hpcml sweep
status`` reports), and the run resumes to the uninterrupted result; a signal during the last
step lets the run finish cleanly (``complete``), never a killed rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hpcml import checkpoint
from hpcml.cli import cli
from hpcml.rundir import read_metrics
from hpcml.slurm.scaling import gradient_sum, rows_block
from hpcml.slurm.sweep import write_manifest
from hpcml.testing import hpcml_cli, mpiexec

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "slurm-lsq.toml")
STEPS, SLEEP = 3, 2.0
SETS = ["--set", "rows=64", "--set", "features=4", "--set", "seed=4", "--set", 'mode="strong"',
        "--set", "checkpoint_every=0", "--set", f"steps={STEPS}"]


def interrupted(runs: Path, nranks: int, sig: signal.Signals, when: str
                ) -> tuple[subprocess.CompletedProcess, Path]:
    """Start the job, send ``sig`` when the run directory appears (``before``: the job's loop
    has not started, its first step sleeps SLEEP s) or when the last step's metrics line is
    written (``after``: the last step sleeps SLEEP s), and wait for the end."""
    cmd = [sys.executable, "-m", "hpcml", "run", JOB, *SETS, "--set", f"step_sleep={SLEEP}",
           "--set", f"runs_dir={runs}"]
    if nranks > 1:
        cmd = [*mpiexec(), "-n", str(nranks), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = list(runs.glob("*/metrics.jsonl"))
            if when == "before" and list(runs.glob("*/config.toml")):
                break
            if when == "after" and metrics and len(read_metrics(metrics[0])) >= STEPS:
                break
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run,) = [p.parent for p in runs.glob("*/config.toml")]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), run


def ID(value: object) -> str:
    return getattr(value, "name", str(value))


def reference(steps: int) -> np.ndarray:
    x, y = rows_block(0, 64, 4, 0.01, 4)
    w = np.zeros(4)
    for _ in range(steps):
        w -= 0.5 / 64 * gradient_sum(x, y, w)
    return w


@pytest.mark.parametrize("nranks,sig", [(1, signal.SIGUSR1), (4, signal.SIGTERM)], ids=ID)
def test_signal_before_the_loop_stops_at_the_first_step_and_resumes(tmp_path, nranks, sig):
    sweep = tmp_path / "sweep"
    res, run = interrupted(sweep / "point-0", nranks, sig, "before")
    assert res.returncode == 0, res.stderr
    assert "BAD TERMINATION" not in res.stdout + res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["steps_done"]) == (
        "preempted", sig.name, 1)
    assert checkpoint.latest(run).step == 1
    write_manifest(sweep, {"points": [{"steps": STEPS}], "job_id": None})
    status = CliRunner().invoke(cli, ["sweep", "status", str(sweep)])
    assert status.exit_code == 0 and status.output.split()[:2] == ["0", "preempted"]
    done = hpcml_cli(nranks, "run", JOB, *SETS, "--set", "step_sleep=0", "--set",
                     f"runs_dir={sweep / 'point-0'}", "--resume", str(run), "--allow-config-change")
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("complete", STEPS)
    w = checkpoint.read(checkpoint.latest(run), 0).shared["w"].numpy()
    np.testing.assert_allclose(w, reference(STEPS), rtol=1e-12)


@pytest.mark.parametrize("nranks,sig", [(1, signal.SIGTERM), (4, signal.SIGUSR1)], ids=ID)
def test_signal_in_the_last_step_lets_the_run_finish(tmp_path, nranks, sig):
    res, run = interrupted(tmp_path, nranks, sig, "after")
    assert res.returncode == 0, res.stderr
    assert "BAD TERMINATION" not in res.stdout + res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["steps_done"]) == (
        "complete", None, STEPS)
    assert checkpoint.latest(run).step == STEPS
