"""``hpcml bench model-parallel`` end to end on 2 ranks with a small setting; bad input exits 2."""

import json
from pathlib import Path

import pytest

from hpcml.errors import ConfigError
from hpcml.parallel.bench_model_parallel import ModelParallelConfig, _model
from hpcml.testing import hpcml_cli

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "bench-model-parallel.toml")


def args(tmp_path, *extra):
    out = []
    for kv in ["models=['base']", "layouts=['pp2-1f1b', 'pp4-1f1b']",
               "vocab=50", "batch=8", "microbatches=2", "min_len=3", "max_len=8", "steps=1",
               "warmup=0", "checkpoint_stages=[0]", f"runs_dir={tmp_path / 'runs'}", *extra]:
        out += ["--set", kv]
    return out


def test_bench_model_parallel_two_ranks(tmp_path):
    """Stage 0 recomputes its activations (switched on from the job file): still exact. The
    interleaved row equals one process too; the fp16 row equals the one-process run of its
    recipe to fp16 rounding (and differs from the fp32 one by more)."""
    layouts = ["pp2-1f1b", "pp4-1f1b", "pp2-interleaved", "pp2-fp16"]
    res = hpcml_cli(2, "bench", "model-parallel", JOB, *args(tmp_path, f"layouts={layouts}"),
                    cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["layout"]: r for r in summary["rows"]}
    assert set(rows) == {"pp2-1f1b", "pp2-interleaved", "pp2-fp16"}
    assert summary["skipped"] == ["pp4-1f1b"]
    for row in rows.values():
        assert {"layout", "ranks", "loss_abs_diff", "grad_max_abs_diff", "peak_bytes_per_rank",
                "ms_per_step"} <= set(row)
        tol = 2.0 ** -8 if row["precision"] == "fp16" else 1e-5
        assert row["grad_max_rel_diff"] <= tol and row["loss_abs_diff"] <= 1e-5 * row["loss"]
    assert rows["pp2-fp16"]["grad_rel_diff_vs_fp32"] > rows["pp2-fp16"]["grad_max_rel_diff"]
    assert rows["pp2-interleaved"]["bubble_theory"] == 1 / (2 * 2 + 1)  # v = M = S = 2
    assert "theoretical (S-1)/(v*M+S-1) = 0.200" in res.stdout
    # each pipeline stage holds part of the model
    full = sum(p.numel() * 4 for p in _model(ModelParallelConfig(vocab=50), "base").parameters())
    assert rows["pp2-1f1b"]["param_bytes"] < 0.8 * full
    assert "bubble: measured" in res.stdout and "| stage | units |" in res.stdout
    assert "| base | pp2-1f1b | 2 |" in (run / "table.md").read_text()
    assert (run / "model_parallel.png").stat().st_size > 0


def test_bench_model_parallel_bad_input_exits_2(tmp_path):
    res = hpcml_cli(1, "bench", "model-parallel", JOB, *args(tmp_path, "layouts=['pp3']"),
                    cwd=tmp_path)
    assert res.returncode == 2 and "layouts" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="batch: 3 sentences do not split into 1 replicas x 2"):
        ModelParallelConfig(batch=3, microbatches=2, layouts=["pp2-1f1b"]).check(2)


def test_bench_model_parallel_tensor_and_zero_four_ranks(tmp_path):
    """Tensor-parallel, ZeRO-1 and hybrid rows: gradients of the single-process model (gathered
    over the tensor group and the stages / read from the sharded optimizer), with less held per
    rank: parameters fall with T and S, Adam state with ZeRO's D."""
    layouts = ["single", "tp4", "dp4-zero1", "dp2xtp2-zero1", "pp2xtp2", "dp2xpp2-zero1"]
    res = hpcml_cli(4, "bench", "model-parallel", JOB,
                    *args(tmp_path, f"layouts={layouts}", "checkpoint_stages=[]"),
                    cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    rows = {r["layout"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}
    assert set(rows) == set(layouts)
    for row in rows.values():
        assert row["grad_max_rel_diff"] <= 1e-5 and row["loss_abs_diff"] <= 1e-5 * row["loss"]
    single = rows["single"]
    assert rows["tp4"]["param_bytes"] < 0.4 * single["param_bytes"]
    assert rows["dp2xtp2-zero1"]["param_bytes"] < 0.6 * single["param_bytes"]
    assert rows["dp4-zero1"]["optimizer_bytes"] < 0.3 * single["optimizer_bytes"]
    assert rows["dp2xtp2-zero1"]["optimizer_bytes"] < 0.3 * single["optimizer_bytes"]
    assert rows["dp4-zero1"]["param_bytes"] == single["param_bytes"]
    assert rows["pp2xtp2"]["param_bytes"] < 0.4 * single["param_bytes"]
    assert rows["dp2xpp2-zero1"]["param_bytes"] < 0.6 * single["param_bytes"]
    assert rows["dp2xpp2-zero1"]["optimizer_bytes"] < 0.3 * single["optimizer_bytes"]
