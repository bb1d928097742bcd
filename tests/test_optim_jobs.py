"""The optimizer benchmark, the byte corpus and MADA in the NMT trainer, end to end: bad job-file
values exit 2 with one line before any work; ``hpcml bench optimizers`` spreads its
(optimizer, lr, seed) runs over the ranks, each equal bit for bit to the same run in one process,
and writes the best-of-grid table (edge flagged) and both plots; the corpus is the standard
library's real source; ``[train] optimizer = "mada"`` trains the transformer and checkpoints the
coefficients."""

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcml import checkpoint
from hpcml.config import load_job_file, read_toml
from hpcml.errors import UsageError
from hpcml.optim.bench import BenchOptimizersConfig, train_once, validation_windows
from hpcml.optim.corpus import EOD, read_split
from hpcml.optim.mada import DEFAULT_HYPER_LR
from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "lm" / "pystdlib.h5"
JOB = str(ROOT / "jobs" / "bench-optimizers.toml")
TINY = ["steps=4", "seeds=1", "eval_every=2", "eval_windows=4", "batch_size=4",
        "model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
        "model.context=16", f"data={CORPUS}"]


def sets(tmp_path, *extra):
    out = []
    for kv in [*TINY, f"runs_dir={tmp_path / 'runs'}", *extra]:
        out += ["--set", kv]
    return out


@pytest.mark.parametrize("key, value, match", [
    ("mada.hyper_lr", -1.0, "mada: MADA: hyper_lr must be >= 0"),
    ("mada.beta3", 1.0, "mada: MADA: beta3 must be in [0, 1)"),
    ("mada.rho", 1.5, "mada: MADA: rho must be in [0, 1]"),
    ("lr", -0.001, "lr: must be >= 0.0"),
    ("lr_grid", [1.0, 3.0, 4.0], "lr_grid: [1.0, 3.0, 4.0] is not log-spaced"),
    ("lr_grid", [2.0, 1.0], "lr_grid: [2.0, 1.0] is not strictly ascending"),
    ("lr_grid", [0.0, 1.0], "lr_grid: must be > 0.0"),
])
def test_bad_values_are_one_line_errors(key, value, match):
    data = read_toml(JOB)
    section, _, field = key.rpartition(".")
    (data[section] if section else data)[field] = value
    with pytest.raises(UsageError) as err:
        load_job_file(BenchOptimizersConfig, data, JOB, 2)
    assert match in str(err.value) and "\n" not in str(err.value)


def test_bad_value_exits_2_with_one_line_before_any_work(tmp_path):
    res = hpcml_cli(2, "bench", "optimizers", JOB, *sets(tmp_path, "mada.hyper_lr=-1.0"),
                    cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "mada: MADA: hyper_lr must be >= 0" in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()


def test_bench_spreads_runs_over_ranks_and_reports_best_of_grid(tmp_path):
    res = hpcml_cli(2, "bench", "optimizers", *sets(
        tmp_path, 'optimizers=["adam", "mada", "mada-frozen"]', "lr_grid=[1.0, 4.0]"),
        cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    for name in ("table.md", "val-loss.png", "mada-coefficients.png"):
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["runs_done"] == summary["runs_planned"] == 6 == len(summary["runs"])
    rows = {r["optimizer"]: r for r in summary["rows"]}
    assert list(rows) == ["adam", "mada", "mada-frozen"]
    assert {c["lr"] for c in summary["grid"]} == {1e-3, 4e-3} and len(summary["grid"]) == 6
    table = (run / "table.md").read_text()
    assert "learning rates 0.001, 0.004 for every optimizer" in table
    for name, row in rows.items():  # a 2-value grid cannot bracket: every best is at an edge
        assert row["edge"] in ("low", "high") and row["lr"] in (1e-3, 4e-3), row
        assert f"| {name} | {row['lr']:.3g} | {row['val_loss']:.4f} |" in table
        assert "YES: " + ("smallest" if row["edge"] == "low" else "largest") in table
    assert rows["mada"]["state_mib"] > rows["mada-frozen"]["state_mib"] \
        > rows["adam"]["state_mib"]
    # Every run, whichever rank ran it, equals the same run in this one process, bit for bit.
    cfg = load_job_file(BenchOptimizersConfig, read_toml(run / "config.toml"), JOB, 1)
    frozen = cfg.build("mada-frozen", 1e-3, [torch.zeros(1, requires_grad=True)])
    assert frozen.param_groups[0]["hyper_lr"] == dict.fromkeys(DEFAULT_HYPER_LR, 0.0)
    train = read_split(CORPUS, "train").tokens
    valid = validation_windows(read_split(CORPUS, "valid").tokens, 4, 17)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's ranks (threads = 1)
    try:
        for done in summary["runs"]:
            again = train_once(cfg, train, valid, done["optimizer"], done["lr"], done["seed"])
            assert again["val_loss"] == done["val_loss"], done["optimizer"]
            assert again["coefficients"] == done["coefficients"]
    finally:
        torch.set_num_threads(threads)
    mada = next(r for r in summary["runs"] if r["optimizer"] == "mada")
    assert len(mada["coefficients"]) == 5 and mada["coefficients"][-1] != \
        mada["coefficients"][0]


def test_corpus_is_the_standard_library_source():
    with h5py.File(CORPUS) as f:
        manifest = json.loads(f.attrs["manifest"])
        version = f.attrs["python_version"]
        names = list(f["valid/files"].asstr()[:])
        offsets = f["valid/offsets"][:]
    whole = read_split(CORPUS, "valid").tokens
    parts = [read_split(CORPUS, "valid", r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate([p.tokens for p in parts]), whole)
    assert [p.start for p in parts] == [0, len(parts[0].tokens),
                                        len(parts[0].tokens) + len(parts[1].tokens)]
    first = whole[offsets[0]:offsets[1] - 1].tobytes()
    assert whole[offsets[1] - 1] == EOD and hashlib.sha256(first).hexdigest() == manifest[names[0]]
    if version != sys.version:
        pytest.skip(f"corpus built by Python {version.split()[0]}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert first == (stdlib / names[0]).read_bytes()
    assert set(manifest) == {p.name for p in stdlib.glob("*.py")}


def test_nmt_trains_with_mada_and_checkpoints_its_coefficients(tmp_path):
    job = str(ROOT / "jobs" / "transformer-nmt.toml")
    tiny = ["model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
            "train.batch_size=8", "train.warmup=4", "train.steps=4", "eval.batch_size=32",
            "eval.valid_every=2", "eval.checkpoint_every=0", "eval.bleu=false",
            'train.optimizer="mada"', f"runs_dir={tmp_path / 'runs'}"]
    res = hpcml_cli(2, "run", job, *[a for kv in tiny for a in ("--set", kv)], cwd=ROOT,
                    timeout=300)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    saved = checkpoint.read(checkpoint.latest(run), 0).shared["optimizer"]  # weights_only
    group = saved["param_groups"][0]
    assert {"beta1", "beta2", "beta3", "c", "rho", "gamma", "hyper_lr"} <= set(group)
    assert group["beta2"] != 0.98 and group["rho"] != 0.6  # learned from their start
    assert all("d_rho" in s for s in saved["state"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["valid_loss"])
