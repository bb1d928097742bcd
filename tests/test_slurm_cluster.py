"""Against a real Slurm (munged + slurmctld + slurmd started by the ``slurm_cluster`` fixture):
a rendered template sbatch'ed and run under MPI, an ``srun --mpi=pmi2`` step, a 4-task array
sweep collected into one table, a weak-scaling series and its report, `scancel` ending a job for
good while either form of `scancel --signal=USR1` makes it checkpoint, requeue and resume, and
Slurm's own refusals with hpcml's hint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_fixture import slurm_cluster, states, wait_for  # noqa: F401 (the fixture)

from hpcml.rundir import read_metrics
from hpcml.slurm import spec
from hpcml.slurm.submit import submit
from hpcml.slurm.sweep import toml_value
from hpcml.testing import hpcml_cli

LSQ = str(Path(__file__).resolve().parents[1] / "jobs" / "slurm-lsq.toml")
pytestmark = pytest.mark.usefixtures("slurm_cluster")
TINY = '"rows=512", "features=16", "checkpoint_every=0"'


def _submission(tmp_path: Path, sets: str, slurm: str, extra: str = "") -> Path:
    path = tmp_path / "sub.toml"
    path.write_text(f'job = "{LSQ}"\nset = [{TINY}, {sets}]\n[slurm]\n'
                    f'runs_dir = "{tmp_path / "runs"}"\ntime = "5"\n{slurm}\n{extra}')
    return path


def _submit(path: Path, *args: str) -> str:
    res = hpcml_cli(1, "slurm", "submit", str(path), *args, cwd=path.parent)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _finished(job_id: str, tmp_path: Path) -> None:
    final = wait_for(job_id)
    outputs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "runs").glob("*.out"))
    assert set(final) == {"COMPLETED"}, f"job {job_id}: {final}\n{outputs}"


def _summaries(where: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(where.rglob("summary.json"))]


def test_sbatch_rendered_template_runs_mpi_job(tmp_path):
    path = _submission(tmp_path, '"steps=10"', 'ntasks_per_node = 2\nlauncher = "mpiexec"')
    job_id = _submit(path)
    _finished(job_id, tmp_path)
    (summary,) = _summaries(tmp_path / "runs" / f"lsq-{job_id}")
    assert (summary["status"], summary["ranks"], summary["steps_done"]) == ("complete", 2, 10)
    (env,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("env.json")]
    assert env["slurm_job_id"] == job_id and env["ranks"] == 2


def test_srun_pmi2_step_runs_hpcml_under_mpi(tmp_path):
    res = subprocess.run(["srun", "--mpi=pmi2", "-n", "2", sys.executable, "-m", "hpcml",
                          "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["ranks"] == 2 and info["slurm_job_id"]


def test_array_sweep_of_4_tasks_collects_into_one_table(tmp_path):
    path = _submission(tmp_path, '"steps=8"', 'job_name = "sw"',
                       '[sweep]\nlr = [0.1, 0.5]\nfeatures = [8, 16]\n')
    job_id = _submit(path)
    _finished(job_id, tmp_path)
    assert len(states(job_id)) == 4
    sweep_dir = tmp_path / "runs" / f"sw-{job_id}"
    res = hpcml_cli(1, "sweep", "collect", str(sweep_dir))
    assert res.returncode == 0, res.stderr
    lines = (sweep_dir / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("index,lr,features,state,")
    rows = [line.split(",") for line in lines[1:]]
    assert [r[:4] for r in rows] == [["0", "0.1", "8", "complete"], ["1", "0.1", "16", "complete"],
                                     ["2", "0.5", "8", "complete"],
                                     ["3", "0.5", "16", "complete"]]
    assert "| index | lr | features | state |" in (sweep_dir / "sweep.md").read_text()


def test_weak_scaling_series_and_report(tmp_path):
    path = _submission(tmp_path, '"steps=10"', 'template = "scaling"\nntasks_per_node = 4\n'
                       'overcommit = true\njob_name = "weak"', "[scaling]\nranks = [1, 2, 4]\n")
    job_id = _submit(path)
    _finished(job_id, tmp_path)
    series = tmp_path / "runs" / f"weak-{job_id}"
    ranks = sorted(s["ranks"] for s in _summaries(series) if s["kind"] == "scaling")
    assert ranks == [1, 2, 4]
    report = json.loads((series / "report" / "report.json").read_text())
    assert report["measured_up_to"] == 4 and report["alpha_beta"]["alpha"] >= 0
    sources = [(r["P"], r["source"]) for r in report["rows"]]
    assert sources[:3] == [(1, "measured"), (2, "measured"), (4, "measured")]
    assert sources[-1] == (1200, "projection")
    assert (series / "report" / "scaling.png").stat().st_size > 1000
    text = (series / "report" / "table.md").read_text()
    assert "Measurement ends at P = 4" in text and "Model check at P = 4" in text


def _restarts(job_id: str) -> int:
    res = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         check=True)
    return int(re.search(r"Restarts=(\d+)", res.stdout).group(1))


# how each case is signalled once its run has done 3 steps (of 80 at 0.1 s: the signal must
# land while hpcml runs, also when a loaded machine takes seconds to deliver it)
SIGNALS = {"cancel": [], "steps": ["--signal=USR1"], "batch": ["--batch", "--signal=USR1"]}
HOSTILE = "pre $(touch SENTINEL) `touch SENTINEL` \"; touch SENTINEL; '"


def test_scancel_ends_the_job_and_usr1_in_either_form_requeues_and_resumes(tmp_path):
    """Three jobs at once (2 ranks each under Hydra's mpiexec, whose proxies run as a job step;
    2-rank `srun --mpi=pmi2` steps starting beside other jobs failed intermittently in MPI_Init
    on the test node, a known MPICH/UCX issue): a plain `scancel` ends the job for good although its
    run stopped "preempted"; `scancel --signal=USR1` (the steps only, not the batch shell) and
    `scancel --batch --signal=USR1` both checkpoint, requeue (the run's summary says
    "preempted") and resume to the end. The --batch job has a hostile name and --comment."""
    jobs, runs = {}, {}
    for case, steps in (("cancel", 400), ("steps", 80), ("batch", 80)):
        work = tmp_path / case
        work.mkdir()
        name = HOSTILE if case == "batch" else case
        extra = f"extra = [{toml_value('--comment=' + HOSTILE)}]" if case == "batch" else ""
        path = _submission(work, f'"steps={steps}", "step_sleep=0.1", \'mode="strong"\'',
                           'ntasks_per_node = 2\novercommit = true\nlauncher = "mpiexec"\n'
                           f"job_name = {toml_value(name)}\n{extra}")
        done = submit(spec.load(path), work)  # in-process: three CLI starts cost seconds each
        jobs[case], runs[case] = done.job_id, done.results
    metrics = {}
    deadline = time.monotonic() + 300
    while len(metrics) < len(jobs) and time.monotonic() < deadline:
        for case in jobs.keys() - metrics.keys():
            found = list(runs[case].glob("*/metrics.jsonl"))
            if found and len(read_metrics(found[0])) >= 3:
                subprocess.run(["scancel", *SIGNALS[case], jobs[case]], check=True)
                metrics[case] = found[0]
        time.sleep(0.3)
    assert len(metrics) == len(jobs), {case: states(job) for case, job in jobs.items()}
    assert wait_for(jobs["cancel"]) == ["CANCELLED"] and _restarts(jobs["cancel"]) == 0
    (summary,) = _summaries(runs["cancel"])
    assert summary["status"] == "preempted" and summary["steps_done"] < 400
    out = (tmp_path / "cancel" / "runs" / f"cancel-{jobs['cancel']}.out").read_text()
    assert "requeueing" not in out and "restart 1" not in out
    for case in ("steps", "batch"):
        _finished(jobs[case], tmp_path / case)
        assert _restarts(jobs[case]) == 1
        (summary,) = _summaries(runs[case])
        assert (summary["status"], summary["steps_done"], summary["restarts"]) == (
            "complete", 80, 1), case
        assert 0 < summary["steps_this_run"] < 80
        records = read_metrics(metrics[case])
        assert [r["step"] for r in records] == list(range(1, 81))
        assert {r["restart"] for r in records} == {0, 1}
    res = subprocess.run(["squeue", "-h", "-t", "all", "-j", jobs["batch"], "-o", "%j|%k"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.rstrip("\n") == f"{HOSTILE}|{HOSTILE}"
    assert not list(tmp_path.rglob("SENTINEL"))


def test_unknown_partition_shows_slurm_message_and_hint(tmp_path):
    path = _submission(tmp_path, '"steps=1"', "")
    res = hpcml_cli(1, "slurm", "submit", str(path), "--partition", "nope", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("sbatch: error:") and "partition" in lines[0].lower()
    assert lines[-1].startswith("hpcml: hint:") and "sinfo -s" in lines[-1]
    assert not list((tmp_path / "runs").glob("*.sbatch"))


def test_impossible_resources_show_slurm_message_and_hint(tmp_path):
    path = _submission(tmp_path, '"steps=1"', "")
    res = hpcml_cli(1, "slurm", "submit", str(path), "--ntasks-per-node", "512", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("sbatch: error:") and "More processors requested" in lines[0]
    assert lines[-1].startswith("hpcml: hint:") and "--ntasks-per-node" in lines[-1]
