"""``--resume`` never rewrites history: a refused resume (rank count, changed config, missing,
damaged or malicious checkpoint) prints one line, exits 2 and leaves every file of the run
directory as it was; an accepted config change records a new segment beside the original
config. Uses the ``scaling`` kind (least squares, exact single-process reference)."""

import hashlib
import json
import os
import pickle
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from hpcml import checkpoint
from hpcml.slurm.scaling import gradient_sum, rows_block
from hpcml.testing import hpcml_cli

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "slurm-lsq.toml")
BASE = {"rows": 64, "features": 4, "lr": 0.5, "seed": 4, "checkpoint_every": 0, "steps": 4,
        "mode": '"strong"'}


def args(runs: Path, **changes) -> list[str]:
    out = []
    for key, value in {**BASE, "runs_dir": runs, **changes}.items():
        out += ["--set", f"{key}={value}"]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("finished")
    res = hpcml_cli(1, "run", JOB, *args(runs), cwd=runs)
    assert res.returncode == 0, res.stderr
    (run,) = [p.parent for p in runs.glob("*/summary.json")]
    return run


def snapshot(run: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                      p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def damage(run: Path, how: str, marker: Path) -> None:
    manifest = checkpoint.latest(run)
    if how == "missing checkpoint":
        (run / "checkpoint" / "latest").unlink()
    elif how in ("damaged checkpoint", "malicious checkpoint"):
        shared = manifest.path / "shared.pt"
        if how == "damaged checkpoint":
            shared.write_bytes(shared.read_bytes()[:-8])
        else:
            data = pickle.dumps({"w": Exploit(str(marker))}, protocol=2)
            shared.write_bytes(data)
            raw = json.loads((manifest.path / "manifest.json").read_text())
            raw["files"]["shared.pt"] = hashlib.sha256(data).hexdigest()
            (manifest.path / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("nranks,how,changes,expected", [
    (4, "wrong rank count", {}, "checkpoint written by 1 ranks, this job has 4 (resume with "
                                "mpiexec -n 1)"),
    (1, "changed config", {"lr": 0.3, "noise": 0.02},
     "the config differs from the checkpoint's: lr: 0.5 -> 0.3, noise: 0.01 -> 0.02 (resume "
     "with the same job file and --set values, or pass --allow-config-change"),
    (1, "missing checkpoint", {}, "no complete checkpoint in it"),
    (1, "damaged checkpoint", {}, "sha256 differs from the manifest's"),
    (1, "malicious checkpoint", {}, "refused to load (only tensors and plain values"),
    (1, "allowed change that does not fit", {"features": 5, "allow": True},
     "holds weights torch.float64 of shape (4,), the job has 5 float64 features"),
])
def test_refused_resume_changes_nothing(tmp_path, finished, nranks, how, changes, expected):
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    marker = tmp_path / "pwned"
    damage(run, how, marker)
    before = snapshot(run)
    flag = ["--allow-config-change"] if changes.pop("allow", False) else []
    res = hpcml_cli(nranks, "run", JOB, *args(tmp_path, **changes), "--resume", str(run), *flag,
                    cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcml: error: "), res.stderr
    assert expected in lines[0], lines[0]
    assert snapshot(run) == before
    assert not marker.exists()
    assert os.listdir(tmp_path) == [run.name]  # and no new run directory


def reference(segments: list[tuple[int, float]]) -> np.ndarray:
    """Gradient descent in one process, ``steps`` at rate ``lr`` per segment."""
    x, y = rows_block(0, 64, 4, 0.01, 4)
    w = np.zeros(4)
    for steps, lr in segments:
        for _ in range(steps):
            w -= lr / 64 * gradient_sum(x, y, w)
    return w


def test_allowed_config_change_records_a_segment(tmp_path, finished):
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    original = {name: (run / name).read_bytes() for name in ("config.toml", "env.json")}
    res = hpcml_cli(1, "run", JOB, *args(tmp_path, lr=0.25, steps=7), "--resume", str(run),
                    "--allow-config-change", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert {name: (run / name).read_bytes() for name in original} == original
    assert tomllib.loads((run / "config.segment-1.toml").read_text())["lr"] == 0.25
    assert (run / "env.segment-1.json").is_file()
    segments = json.loads((run / "segments.json").read_text())
    assert [(s["segment"], s["config"], s["start_step"]) for s in segments] == [
        (0, "config.toml", 0), (1, "config.segment-1.toml", 4)]
    assert segments[1]["config_hash"] != segments[0]["config_hash"]
    manifest = checkpoint.latest(run)
    assert (manifest.step, manifest.config_hash) == (7, segments[1]["config_hash"])
    w = checkpoint.read(manifest, 0).shared["w"].numpy()
    np.testing.assert_allclose(w, reference([(4, 0.5), (3, 0.25)]), rtol=1e-12)
    # the next resume compares with the latest segment's config: the same values are accepted
    res = hpcml_cli(1, "run", JOB, *args(tmp_path, lr=0.25, steps=7), "--resume", str(run),
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(json.loads((run / "segments.json").read_text())) == 3
