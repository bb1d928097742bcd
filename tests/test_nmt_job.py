"""The ``transformer-nmt`` job end to end: bad input exits 2 before any work, checkpoints resume
to exactly the uninterrupted result (after a finished run and after SIGUSR1)."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from hpcml import checkpoint
from hpcml.nmt.corpus import generate
from hpcml.testing import hpcml_cli

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "transformer-nmt.toml")
TINY = ["model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
        "train.batch_size=8", "train.warmup=4", "eval.batch_size=32", "eval.valid_every=2",
        "eval.checkpoint_every=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("nmtjob") / "c.h5", pairs=120, max_number=999)


def sets(tmp_path, corpus, *extra):
    out = []
    for kv in [*TINY, f"data.path={corpus}", f"runs_dir={tmp_path / 'runs'}", *extra]:
        out += ["--set", kv]
    return out


def only_run(tmp_path):
    (run,) = (tmp_path / "runs").iterdir()
    return run


def final_model(run):
    manifest = checkpoint.latest(run)
    return {"step": manifest.step, **torch.load(manifest.path / "shared.pt", weights_only=True)}


@pytest.mark.parametrize("nranks,key,value,match", [
    (2, "train.batch_size", "7", "train.batch_size: 7 sentences do not split evenly"),
    (1, "data.path", "missing.h5", "data.path: corpus file 'missing.h5' not found"),
    (1, "train.grad_reduction", "allreduce", "train.grad_reduction: must be one of"),
    (1, "model.heads", "3", "model.d_model: 16 must be even and divisible"),
    (1, "train.steps", "99999999999999999999999", "train.steps: must be <= 2147483647"),
])
def test_bad_values_exit_2_before_any_work(tmp_path, corpus, nranks, key, value, match):
    res = hpcml_cli(nranks, "run", JOB, *sets(tmp_path, corpus, f"{key}={value}"),
                    cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_after_finished_run_equals_uninterrupted(tmp_path, corpus):
    full, part = tmp_path / "full", tmp_path / "part"
    for where, steps in ((full, 6), (part, 3)):
        res = hpcml_cli(2, "run", JOB, *sets(where, corpus, f"train.steps={steps}"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    run = only_run(part)
    res = hpcml_cli(2, "run", JOB, *sets(part, corpus, "train.steps=6"), "--resume", str(run),
                    "--allow-config-change", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resumed from step 3" in res.stdout
    # the first segment's record stays; the second is recorded beside it
    assert tomllib.loads((run / "config.toml").read_text())["train"]["steps"] == 3
    assert tomllib.loads((run / "config.segment-1.toml").read_text())["train"]["steps"] == 6
    segments = json.loads((run / "segments.json").read_text())
    assert [(s["segment"], s["start_step"], s["ranks"]) for s in segments] == [(0, 0, 2), (1, 3, 2)]
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    a, b = final_model(only_run(full)), final_model(run)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["history"] == b["history"]


def test_sigusr1_checkpoints_and_resume_is_exact(tmp_path, corpus):
    interrupted = tmp_path / "sig"
    cmd = [sys.executable, "-m", "hpcml", "run", JOB,
           *sets(interrupted, corpus, "train.steps=100000", "eval.valid_every=0")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = list((interrupted / "runs").glob("*/metrics.jsonl"))
        if runs and len(runs[0].read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGUSR1" in out
    run = only_run(interrupted)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"]) == ("preempted", "SIGUSR1")
    stopped = final_model(run)["step"]
    target = f"train.steps={stopped + 2}"
    res = hpcml_cli(1, "run", JOB, *sets(interrupted, corpus, target, "eval.valid_every=0"),
                    "--resume", str(run), "--allow-config-change", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    straight = tmp_path / "straight"
    res = hpcml_cli(1, "run", JOB, *sets(straight, corpus, target, "eval.valid_every=0"),
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    a, b = final_model(only_run(straight)), final_model(run)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_resume_without_checkpoint_exits_2(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_text('kind = "transformer-nmt"\n')
    res = hpcml_cli(1, "run", JOB, *sets(tmp_path, corpus), "--resume",
                    str(tmp_path / "empty"), cwd=tmp_path)
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr, res.stderr
