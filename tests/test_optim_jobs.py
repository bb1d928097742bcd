"""The optimizer benchmark, the byte corpus and MADA in the NMT trainer, end to end: bad job-file
values exit 2 with one line before any work; ``hpcml bench optimizers`` writes its table and
both plots; the corpus is the standard library's real source; ``[train] optimizer = "mada"``
trains the transformer and checkpoints the coefficients."""

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcml import checkpoint
from hpcml.config import load_job_file, read_toml
from hpcml.errors import UsageError
from hpcml.optim.bench import BenchOptimizersConfig
from hpcml.optim.corpus import EOD, read_split
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


def test_bench_writes_table_and_plots_data_parallel(tmp_path):
    res = hpcml_cli(2, "bench", "optimizers", *sets(
        tmp_path, 'optimizers=["adam", "mada"]', 'settings=["default", "lr*10"]'),
        cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    for name in ("table.md", "val-loss.png", "mada-coefficients.png"):
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    rows = {(r["setting"], r["optimizer"]): r for r in summary["rows"]}
    assert set(rows) == {(s, o) for s in ("default", "lr*10") for o in ("adam", "mada")}
    assert all(np.isfinite(r["val_loss"]) for r in rows.values())
    assert rows[("default", "mada")]["state_mib"] > rows[("default", "adam")]["state_mib"]
    mada = next(r for r in summary["runs"] if r["optimizer"] == "mada")
    assert len(mada["coefficients"]) == 5 and mada["val_loss"][0] > mada["val_loss"][-1]


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
