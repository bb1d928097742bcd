"""A filesystem that refuses writes. At start: one line naming the path and the errno, exit 2,
nothing left behind (no empty run directory; a resumed one unchanged). Mid-run: one line,
exit 1, a ``failed`` summary, the partial checkpoint removed and the last good one untouched;
``--resume`` then continues, and :func:`hpcml.launch.run_metrics` leaves out the steps redone.

The full disk is real: a small tmpfs mounted for the test (needs root; skipped otherwise). The
checkpoint writer's own clean-up is also tested in-process with a write that raises ENOSPC."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from one_rank import OneRank

from hpcml import checkpoint
from hpcml.errors import StorageError
from hpcml.launch import run_metrics
from hpcml.slurm.scaling import gradient_sum, rows_block
from hpcml.testing import hpcml_cli

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "slurm-lsq.toml")
# 20000 float64 weights: a 161 KB checkpoint; a 256 KiB filesystem holds one, not two
BIG = {"rows": 16, "features": 20000, "lr": 0.01, "noise": 0.01, "seed": 3, "steps": 6,
       "checkpoint_every": 2, "mode": '"strong"'}




def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_refused_checkpoint_write_keeps_the_last_one(tmp_path, monkeypatch):
    """ENOSPC while writing ``shared.pt``: StorageError with one line naming the file and the
    errno; the step's ``.tmp`` is gone and ``latest`` and the previous checkpoint are as
    they were. A stale ``.latest.*.tmp`` (a job killed while replacing the pointer) is
    removed by the next successful save."""
    checkpoint.save(OneRank(), tmp_path, 5, {"w": torch.arange(4.0)}, {}, "abc")
    before = tree(tmp_path)
    real = checkpoint._write_payload

    def full(path, payload):
        if path.name == checkpoint.SHARED:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, payload)

    monkeypatch.setattr(checkpoint, "_write_payload", full)
    with pytest.raises(StorageError) as exc:
        checkpoint.save(OneRank(), tmp_path, 9, {"w": torch.arange(4.0)}, {}, "abc")
    text = str(exc.value)
    assert "\n" not in text and "step-000000009.tmp/shared.pt: cannot write (ENOSPC" in text
    assert tree(tmp_path) == before
    monkeypatch.undo()
    stale = tmp_path / "checkpoint" / ".latest.x1y2.tmp"
    stale.write_text("step-0000")
    checkpoint.save(OneRank(), tmp_path, 9, {"w": torch.arange(4.0)}, {}, "abc")
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "latest", "step-000000009"]


def test_run_metrics_leave_out_redone_steps_and_torn_lines(tmp_path):
    """Segment 0 logged steps 1..5 (the last line torn by the kill) after a checkpoint at
    step 3; segment 1 resumed at 3 and logged 4..6: the reader gives 1..6 once each, with
    segment 1's records for 4 and 5, and keeps a record without a step."""
    first = b"".join(json.dumps({"step": s, "seg": 0}).encode() + b"\n" for s in range(1, 5))
    first += b'{"note": "no step"}\n{"step": 5, "se'
    second = b"".join(json.dumps({"step": s, "seg": 1}).encode() + b"\n" for s in range(4, 7))
    (tmp_path / "metrics.jsonl").write_bytes(first + second)
    (tmp_path / "config.toml").write_text('kind = "scaling"\n')
    (tmp_path / "segments.json").write_text(json.dumps([
        {"segment": 0, "config": "config.toml", "env": "env.json", "start_step": 0},
        {"segment": 1, "config": "config.toml", "env": "env.json", "start_step": 3,
         "metrics_bytes": len(first)}]))
    records = run_metrics(tmp_path)
    assert [(r.get("step"), r.get("seg")) for r in records] == [
        (1, 0), (2, 0), (3, 0), (None, None), (4, 1), (5, 1), (6, 1)]


@pytest.fixture
def small_fs(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` at ``tmp_path / 'fs'`` (remounted when called
    again); unmounted at the end."""
    where = tmp_path / "fs"
    where.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        options = f"remount,size={size}" if mounted else f"size={size}"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs for a real full disk: {res.stderr.strip()}")
        mounted.append(size)
        return where

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def sets(runs: Path, **values) -> list[str]:
    out = []
    for key, value in {**BIG, "runs_dir": runs, **values}.items():
        out += ["--set", f"{key}={value}"]
    return out


def one_line(res, code: int, *words: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and len(lines) == 1, res.stderr
    assert lines[0].startswith("hpcml: error: ") and "Traceback" not in res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def fill(fs: Path) -> None:
    """Write zeros into ``fs`` until it is full."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk_at_start_leaves_nothing(tmp_path, small_fs):
    fs = small_fs("64k")
    fill(fs)
    res = hpcml_cli(1, "run", JOB, *sets(fs / "runs" / "deep"), cwd=tmp_path)
    one_line(res, 2, f"runs_dir: {fs / 'runs' / 'deep'}/", "cannot write (ENOSPC: No space left",
             "nothing was left behind")
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


def reference(steps: int) -> np.ndarray:
    """The weights after ``steps`` of gradient descent in one process."""
    x, y = rows_block(0, BIG["rows"], BIG["features"], BIG["noise"], BIG["seed"])
    w = np.zeros(BIG["features"])
    for _ in range(steps):
        w -= BIG["lr"] / BIG["rows"] * gradient_sum(x, y, w)
    return w


def close(w: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to the rounding of sums in another order (2 ranks' Allreduce vs one process),
    relative to the largest weight."""
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_full_disk_mid_run_then_resume(tmp_path, small_fs):
    """2 ranks on a 256 KiB filesystem: the checkpoint of step 2 fits, that of step 4 does
    not. The run ends with exit 1 and one line, its summary says failed, step 2 is the
    checkpoint left. A resume into a full disk changes nothing (exit 2); with room again the
    resume completes with the weights of 6 uninterrupted steps."""
    fs = small_fs("256k")
    res = hpcml_cli(2, "run", JOB, *sets(fs / "runs"), cwd=tmp_path)
    (run,) = (fs / "runs").iterdir()
    one_line(res, 1, f"{run}/checkpoint/step-000000004.tmp/", "cannot write (ENOSPC",
             "the previous one is untouched", f"continue with --resume {run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "ENOSPC" in summary["failed_by"]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["latest",
                                                                      "step-000000002"]
    manifest = checkpoint.latest(run)
    w = checkpoint.read(manifest, 0).shared["w"].numpy()
    close(w, reference(2))

    (run / "summary.json").unlink()  # make the disk full again, with the run as it is
    fill(fs)
    before = tree(run)
    res = hpcml_cli(2, "run", JOB, *sets(fs / "runs"), "--resume", str(run), cwd=tmp_path)
    one_line(res, 2, f"--resume {run}: {run}/config.segment-1.toml: cannot write (ENOSPC",
             "the run directory is unchanged")
    assert tree(run) == before

    (fs / "filler").unlink()
    small_fs("4m")
    res = hpcml_cli(2, "run", JOB, *sets(fs / "runs"), "--resume", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    raw = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert raw == [1, 2, 3, 4, 3, 4, 5, 6]  # append-only: steps 3 and 4 were done twice
    assert [r["step"] for r in run_metrics(run)] == [1, 2, 3, 4, 5, 6]
    w = checkpoint.read(checkpoint.latest(run), 0).shared["w"].numpy()
    close(w, reference(6))
    shutil.rmtree(run)
