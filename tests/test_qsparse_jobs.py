"""The ``qsparse`` job kind end to end through the CLI: bad input, sync and async runs."""

import json
import re
from pathlib import Path

import pytest
import torch

from hpcml.config import apply_overrides, load_job_file, read_toml
from hpcml.errors import UsageError
from hpcml.qsparse.data import load_digits_h5, write_digits
from hpcml.qsparse.train import QsparseConfig
from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]
SYNC, ASYNC = str(ROOT / "jobs/qsparse-sync.toml"), str(ROOT / "jobs/qsparse-async.toml")
DATA = f"data.path='{ROOT / 'data/qsparse/digits.h5'}'"


def summary_of(runs: Path) -> dict:
    (run,) = list(runs.iterdir())
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("override, key", [
    ("compressor.k=5000", "compressor.k: k = 5000 exceeds the model dimension d = 4810"),
    ("compressor.s=0", "compressor.s: must be >= 1"),
    ("train.H=0", "train.H: must be >= 1"),
])
def test_bad_parameters_exit_2_with_one_line_and_no_output(tmp_path, override, key):
    runs = tmp_path / "runs"
    res = hpcml_cli(1, "run", SYNC, "--set", override, "--set", f"runs_dir='{runs}'",
                    cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], res.stderr
    assert not runs.exists()


@pytest.mark.parametrize("overrides, size, key", [
    (["mode=async"], 1, "mode: 'async' needs >= 2 ranks"),
    (["mode=async", "train.periods=[4, 4]"], 4, "train.periods: 2 periods for 3 workers"),
    (["train.periods=[5]"], 2, "train.periods: [5] exceed H = 4"),
    (["compressor.name=topq"], 1, "compressor.name: must be one of"),
    (["data.hidden=[0]"], 1, "data.hidden: must be >= 1, got 0"),
])
def test_cross_field_rules_in_process(overrides, size, key):
    data = apply_overrides(read_toml(SYNC), overrides)
    with pytest.raises(UsageError, match=re.escape(key)):
        load_job_file(QsparseConfig, data, "qsparse-sync.toml", size)


def test_missing_data_file_names_the_fix(tmp_path):
    with pytest.raises(UsageError, match=re.escape(
            "data.path: 'nowhere.h5' not found (create it with `python -m hpcml.qsparse.data")):
        load_digits_h5("nowhere.h5")


def test_shipped_digits_file_is_the_deterministic_split(tmp_path):
    fresh = load_digits_h5(write_digits(tmp_path / "digits.h5"))
    shipped = load_digits_h5(ROOT / "data/qsparse/digits.h5")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(fresh, name), getattr(shipped, name))
    assert shipped.x_train.shape == (1797 - 360, 64) and shipped.x_test.shape == (360, 64)


def test_sync_job_learns_digits_with_exact_bits(tmp_path):
    runs = tmp_path / "runs"
    res = hpcml_cli(2, "run", SYNC, "--set", "train.steps=240", "--set", "train.eval_every=60",
                    "--set", "train.schedule=decay",
                    "--set", DATA, "--set", f"runs_dir='{runs}'", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = summary_of(runs)
    assert s["bits_per_sync"] == 48 * 13 + 32 + 48 * 5
    assert s["syncs"] == 60 and s["bits_per_worker"] == 60 * s["bits_per_sync"]
    assert s["final_accuracy"] >= 0.85


def test_async_job_with_a_slow_worker_converges(tmp_path):
    """Rank 1 sleeps 10 ms per local step; the server still reaches a good model."""
    runs = tmp_path / "runs"
    res = hpcml_cli(3, "run", ASYNC, "--set", "train.steps=240", "--set", "train.periods=[4,2]",
                    "--set", "stragglers.delay=0.01", "--set", DATA,
                    "--set", f"runs_dir='{runs}'", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = summary_of(runs)
    assert s["syncs"] == 240 // 4 + 240 // 2
    assert s["bits_per_worker"] == round(s["syncs"] * s["bits_per_sync"] / 2)
    assert s["bits_down_per_worker"] == s["syncs"] * 32 * 4810 / 2
    assert s["final_accuracy"] >= 0.85
    (run,) = list(runs.iterdir())
    ledger = json.loads((run / "ledger.json").read_text())["ranks"]
    assert ledger[1]["straggle"]["calls"] == 240 and "straggle" not in ledger[2]
