"""The batch script's signal and requeue rules, with real signals to a real bash but stubbed
python/mpiexec/scontrol (the same rules on a real Slurm: tests/test_slurm_cluster.py).

The stubbed run sends the signal to the batch shell as Slurm would (or none: `scancel
--signal=USR1` without --batch reaches only the ranks) and writes the summary status a real run
would end with; the script must forward SIGUSR1 to the launcher, requeue exactly when the run's
summary says "preempted" and the shell was not sent SIGTERM, and on the next start resume or skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_stubs import run_script, stubs  # noqa: F401 (the fixture)

from hpcml.slurm import render, spec


def _script(tmp_path: Path, body: str = "") -> str:
    (tmp_path / "job.toml").write_text('kind = "scaling"\nname = "lsq"\nrows = 64\n')
    path = tmp_path / "sub.toml"
    path.write_text(f'job = "job.toml"\n[slurm]\nruns_dir = "{tmp_path / "runs"}"\n{body}')
    return render.render(spec.load(path), tmp_path)


def _requeued(calls: list[list[str]]) -> bool:
    assert [c for c in calls if c[0] == "scontrol"] in ([], [["scontrol", "requeue", "7"]])
    return ["scontrol", "requeue", "7"] in calls


@pytest.mark.parametrize("status, signal, requeue, expected", [
    ("complete", "", True, False),
    ("preempted", "", True, True),      # scancel --signal=USR1: the ranks only
    ("preempted", "USR1", True, True),  # scancel --batch --signal=USR1, --signal=B:USR1@N
    ("complete", "USR1", True, False),  # the signal came after the last step
    ("preempted", "TERM", True, False),  # plain scancel, time limit: cancelled for good
    ("failed", "", True, False),
    ("preempted", "USR1", False, False),  # requeue = false
])
@pytest.mark.usefixtures("stubs")
def test_requeue_follows_the_runs_summary_unless_cancelled(tmp_path, status, signal,
                                                           requeue, expected):
    text = _script(tmp_path, f"requeue = {str(requeue).lower()}\n")
    res, calls = run_script(text, tmp_path, STUB_STATUS=status, STUB_SIGNAL=signal)
    assert res.returncode == 0, res.stderr
    assert _requeued(calls) == expected, res.stdout
    forwarded = tmp_path / "calls.log.forwarded"
    assert (forwarded.read_text() if signal else "") == ("USR1\n" if signal else "")
    assert ("was preempted; requeueing job 7" in res.stdout) == expected


@pytest.mark.usefixtures("stubs")
def test_next_start_resumes_a_preempted_run_and_skips_a_complete_one(tmp_path):
    text = _script(tmp_path)
    run_script(text, tmp_path, STUB_STATUS="preempted")
    run_dir = tmp_path / "runs" / "lsq-7" / "run-1"
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "latest").write_text("step-1")
    res, calls = run_script(text, tmp_path, SLURM_RESTART_COUNT="1")
    (run,) = [c for c in calls if c[3:4] == ["run"]]
    assert run[-2:] == ["--resume", f"{run_dir}/"] and not _requeued(calls)
    res, calls = run_script(text, tmp_path, SLURM_RESTART_COUNT="2")
    assert not [c for c in calls if c[3:4] == ["run"]], res.stdout
    assert "is complete; skipping" in res.stdout and not _requeued(calls)


@pytest.mark.parametrize("signal, requeued", [("TERM", False), ("USR1", True)])
@pytest.mark.usefixtures("stubs")
def test_a_scaling_series_stops_at_a_cancelled_or_preempted_run(tmp_path, signal,
                                                                requeued):
    text = _script(tmp_path, "ntasks_per_node = 2\n[scaling]\nranks = [1, 2]\n")
    res, calls = run_script(text, tmp_path, STUB_STATUS="preempted", STUB_SIGNAL=signal)
    runs = [c for c in calls if c[3:4] == ["run"]]
    assert len(runs) == 1 and runs[0][-1].endswith("/lsq-7/p1"), res.stdout
    assert _requeued(calls) == requeued
    assert not [c for c in calls if c[3:4] == ["report"]]
