"""Kind ``scaling`` on real MPI ranks: strong scaling computes the single-process iterates on any
rank count, and a SIGUSR1 mid-run checkpoints so that ``--resume`` finishes with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpcml import checkpoint
from hpcml.rundir import read_metrics
from hpcml.slurm.scaling import gradient_sum, rows_block
from hpcml.testing import hpcml_cli, mpiexec

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "slurm-lsq.toml")
SMALL = ["--set", "rows=600", "--set", "features=12", "--set", "lr=0.5", "--set", "seed=4",
         "--set", "checkpoint_every=0"]


def reference(rows: int, features: int, steps: int, lr: float = 0.5, seed: int = 4) -> np.ndarray:
    """Gradient descent on the whole data set in one process."""
    x, y = rows_block(0, rows, features, 0.01, seed)
    w = np.zeros(features)
    for _ in range(steps):
        w -= lr / rows * gradient_sum(x, y, w)
    return w


def _run_dir(runs: Path) -> Path:
    (run,) = [p.parent for p in runs.glob("*/summary.json")]
    return run


def _weights(run: Path) -> tuple[np.ndarray, int]:
    manifest = checkpoint.latest(run)
    return checkpoint.read(manifest, 0).shared["w"].numpy(), manifest.step


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_strong_scaling_matches_single_process(tmp_path, nranks):
    res = hpcml_cli(nranks, "run", JOB, *SMALL, "--set", 'mode="strong"', "--set", "steps=15",
                    "--set", f"runs_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    run = _run_dir(tmp_path)
    w, step = _weights(run)
    assert step == 15
    np.testing.assert_allclose(w, reference(600, 12, 15), rtol=1e-10, atol=1e-13)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks"] == nranks and summary["rows_total"] == 600
    assert summary["rows_per_rank_max"] == -(-600 // nranks)
    ledger = json.loads((run / "ledger.json").read_text())["ranks"]
    assert all(r["Allreduce"]["calls"] == 15 and r["Allreduce"]["bytes_sent"] == 15 * 12 * 8
               for r in ledger)


def test_weak_scaling_grows_the_data_with_ranks(tmp_path):
    res = hpcml_cli(2, "run", JOB, *SMALL, "--set", "steps=5", "--set", f"runs_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    run = _run_dir(tmp_path)
    np.testing.assert_allclose(_weights(run)[0], reference(1200, 12, 5), rtol=1e-10)


def test_sigusr1_checkpoints_and_resume_loses_nothing(tmp_path):
    steps = 400
    args = [*mpiexec(), "-n", "2", sys.executable, "-m", "hpcml", "run", JOB, *SMALL,
            "--set", 'mode="strong"', "--set", f"steps={steps}", "--set", "step_sleep=0.02",
            "--set", f"runs_dir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            metrics = list(tmp_path.glob("*/metrics.jsonl"))
            if metrics and len(read_metrics(metrics[0])) >= 5:
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    run = _run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted"
    stopped = summary["steps_done"]
    assert 5 <= stopped < steps
    assert _weights(run)[1] == stopped
    res = hpcml_cli(2, "run", JOB, *SMALL, "--set", 'mode="strong"', "--set", f"steps={steps}",
                    "--set", f"runs_dir={tmp_path}", "--resume", str(run),
                    "--allow-config-change")  # step_sleep 0.02 -> 0
    assert res.returncode == 0, res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"], summary["steps_this_run"]) == (
        "complete", steps, steps - stopped)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, steps + 1))
    np.testing.assert_allclose(_weights(run)[0], reference(600, 12, steps), rtol=1e-10)


def test_strong_with_fewer_rows_than_ranks_exits_2(tmp_path):
    res = hpcml_cli(2, "run", JOB, "--set", 'mode="strong"', "--set", "rows=1",
                    "--set", f"runs_dir={tmp_path}")
    assert res.returncode == 2
    assert "rows: 1 rows cannot be split over 2 ranks" in res.stderr
    assert not any(tmp_path.iterdir())
