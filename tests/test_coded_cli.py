"""``hpcml run jobs/coded.toml`` and ``hpcml bench coded`` end to end; bad input exits 2."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "coded.toml")
MF_JOB = str(ROOT / "jobs" / "coded-mf.toml")


def runs(tmp_path):
    return f"runs_dir={tmp_path / 'runs'}"


@pytest.mark.parametrize("job,override,message", [
    (JOB, "code.wait_for=5", "code.wait_for: k = 5 > m = 4 workers"),
    (JOB, "code.beta=0.5", "code.beta: redundancy beta = 0.5 < 1"),
    (JOB, "solver.algorithm=fista", "solver.algorithm: 'fista' does not solve ridge"),
    (JOB, "code.etf_q=7", "code.etf_q: 7 is not a prime = 1 (mod 4)"),
    (MF_JOB, "problem.rank=0", "problem.rank: must be >= 1"),
    (MF_JOB, "problem.density=1.5", "problem.density"),
    (MF_JOB, "problem.test_fraction=1", "problem.test_fraction: 1.0 leaves no training entries"),
    (MF_JOB, "problem.data=diabetes", "problem.data: mf runs on ratings, not 'diabetes'"),
])
def test_bad_values_exit_2_before_any_output(tmp_path, job, override, message):
    res = hpcml_cli(1, "run", job, "--set", override, "--set", runs(tmp_path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_missing_hdf5_dataset_exits_2(tmp_path):
    with h5py.File(tmp_path / "data.h5", "w") as fh:
        fh["X"] = np.zeros((8, 2))
    res = hpcml_cli(1, "run", JOB, "--set", "problem.data=hdf5", "--set",
                    f"problem.path={tmp_path / 'data.h5'}", "--set", "problem.y_key=labels",
                    "--set", runs(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert "problem.y_key: dataset 'labels' not in" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_wait_for_more_workers_than_ranks_exit_2_under_mpi(tmp_path):
    res = hpcml_cli(3, "run", JOB, "--set", "code.wait_for=3", "--set", runs(tmp_path),
                    cwd=tmp_path)
    assert res.returncode == 2
    assert "code.wait_for: k = 3 > m = 2 workers" in res.stderr


def test_job_on_hdf5_input_with_five_ranks(tmp_path):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    with h5py.File(tmp_path / "diabetes.h5", "w") as fh:
        fh["features"], fh["target"] = x, y
    res = hpcml_cli(5, "run", JOB, "--set", "problem.data=hdf5", "--set",
                    f"problem.path={tmp_path / 'diabetes.h5'}", "--set", "problem.x_key=features",
                    "--set", "problem.y_key=target", "--set", "solver.algorithm=lbfgs",
                    "--set", "solver.iterations=120", "--set", "code.chunk=3",
                    "--set", "code.wait_for=4", "--set", runs(tmp_path), cwd=tmp_path,
                    timeout=180)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["wait_for"] == 4
    # ETF is a tight frame: with every worker awaited the coded solve is the uncoded one, so the
    # chunked HDF5 encoding must reach the true optimum whatever the stragglers' timing (with
    # k = 3 the erasure pattern, and so the error, depends on which worker is late)
    assert summary["final_relative_error"] < 1e-3
    assert not (run_dir / "shards").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 120


def test_bench_simulated_writes_table_and_plot(tmp_path):
    res = hpcml_cli(1, "bench", "coded", str(ROOT / "jobs" / "bench-coded.toml"),
                    "--set", "solver.iterations=15", "--set", "problem.n=256",
                    "--set", "problem.p=8", "--set", "fwht_log2=[8]", "--set", "eps=0.5",
                    "--set", "repeats=2", "--set", runs(tmp_path), cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    table = (run_dir / "table.md").read_text()
    for name in ("uncoded-all", "uncoded-k", "replication", "gaussian", "hadamard", "etf",
                 "sparse", "async", "exponential", "pareto", "FWHT"):
        assert name in table
    assert (run_dir / "coded.png").stat().st_size > 1000
    assert "x_m 5 ms, alpha 1.1" in table and "load average" in table
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = summary["rows"]
    # 'none' is skipped when simulated; per model: uncoded-all, 6 strategies x k in (2, 3), async
    assert {r["delays"] for r in rows} == {"exponential", "pareto", "fault"}
    assert len(rows) == 3 * (1 + 6 * 2 + 1)
    assert {(r["strategy"], r["k"]) for r in rows if r["strategy"] == "etf"} == {("etf", 2),
                                                                               ("etf", 3)}
    base = [r for r in rows if r["strategy"] == "uncoded-all"]
    assert all(r["speedup"] == pytest.approx(1.0) and r["reached"] == "2/2" for r in base)
    assert all(r["reached"].endswith("/2") for r in rows)
    assert "medians over 2 delay realizations" in table and "delay seeds 0 .. 1" in table
    for r in rows:
        assert r["round_s"] == pytest.approx(r["seconds"] / 15)


@pytest.mark.parametrize("bench,override,message", [
    ("coded", "strategies=['etf']", "strategies: no 'uncoded-all'"),
    ("coded", "wait_for=[2, 5]", "wait_for: k = 5 > m = 4 workers"),
    ("cf", "problem.kind=ridge", "problem.kind: bench cf runs collaborative filtering"),
])
def test_bench_bad_values_exit_2(tmp_path, bench, override, message):
    res = hpcml_cli(1, "bench", bench, str(ROOT / "jobs" / f"bench-{bench}.toml"),
                    "--set", override, "--set", runs(tmp_path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert not (tmp_path / "runs").exists()


SMALL_MF = ["--set", "problem.n=300", "--set", "problem.p=80", "--set", "problem.density=0.1",
            "--set", "problem.lam=1e-3", "--set", "solver.iterations=4", "--set",
            "solver.inner=5"]


def test_collaborative_filtering_job_with_five_ranks(tmp_path):
    res = hpcml_cli(5, "run", MF_JOB, *SMALL_MF, "--set", runs(tmp_path), cwd=tmp_path,
                    timeout=180)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["wait_for"] == 3
    assert abs(summary["final_suboptimality"]) < 0.5
    assert summary["final_test_rmse"] < 1.5 * summary["reference"]["test_rmse"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 2 * 5
    assert {"seconds", "suboptimality", "train_rmse", "test_rmse"} <= set(records[-1])
    assert not (run_dir / "shards").exists()


def test_collaborative_filtering_on_digits_simulated(tmp_path):
    res = hpcml_cli(1, "run", MF_JOB, "--set", "problem.data=digits", "--set",
                    "problem.observed=0.3", "--set", "problem.lam=1e-4", "--set",
                    "solver.iterations=4", "--set",
                    runs(tmp_path), cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["simulated"] and summary["reference"]["test_rmse"] < 0.9
    assert summary["final_test_rmse"] < 1.25 * summary["reference"]["test_rmse"]


def test_bench_cf_simulated_writes_table_and_plot(tmp_path):
    res = hpcml_cli(1, "bench", "cf", str(ROOT / "jobs" / "bench-cf.toml"), *SMALL_MF,
                    "--set", 'delay_models=["pareto"]', "--set", "eps=[0.5, 0.2]",
                    "--set", "repeats=2", "--set", runs(tmp_path), cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    table = (run_dir / "table.md").read_text()
    for name in ("uncoded-all", "uncoded-k", "etf", "hadamard", "time to 0.5", "load average",
                 "medians over 2 delay realizations", "delay seeds 0 .. 1"):
        assert name in table
    assert (run_dir / "cf.png").stat().st_size > 1000
    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["uncoded-all", "uncoded-k", "etf", "hadamard"]
    assert rows[0]["speedup_0.5"] == pytest.approx(1.0)
    assert {r["k"] for r in rows[1:]} == {3} and rows[0]["k"] == 4
    assert len({r["ref_test_rmse"] for r in rows}) == 1
