"""Pure parts of the Slurm capability, in one process: sweep grids, submission files, rendering,
sbatch hints, the alpha-beta fit, efficiency arithmetic and the least-squares workload."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hpcml.config.schema import parse_override
from hpcml.errors import UsageError
from hpcml.report.alphabeta import bandwidth_factor, fit, latency_factor
from hpcml.report.scaling import (
    Measurement,
    bench_link,
    build_table,
    efficiency,
    fit_bench,
    measure,
    model_time,
    projection_ranks,
)
from hpcml.slurm import render, spec, submit, sweep
from hpcml.slurm.local_cluster import slurm_conf
from hpcml.slurm.scaling import BLOCK, ScalingConfig, gradient_sum, local_rows, rows_block
from hpcml.testing import hpcml_cli

JOBS = Path(__file__).resolve().parents[1] / "jobs"


# --- sweep grids -------------------------------------------------------------------------------

def test_grid_points_last_key_fastest_and_index_inverse():
    grid = {"lr": [0.1, 0.5, 1.0], "features": [64, 128], "mode": ["weak", "strong"]}
    points = sweep.grid_points(grid)
    assert len(points) == 12
    assert points == [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
    assert points[1] == {"lr": 0.1, "features": 64, "mode": "strong"}
    for i, p in enumerate(points):
        assert sweep.point_index(grid, p) == i


def test_nested_grid_flattens_to_dotted_keys():
    assert sweep.flatten_grid({"a": {"b": [1, 2]}, "c": [3]}) == {"a.b": [1, 2], "c": [3]}
    assert sweep.grid_points({}) == [{}]


@pytest.mark.parametrize("value", [0.1, 3, True, "strong", [1, 2], "has space", 1e-12])
def test_point_overrides_round_trip_through_set_parser(value):
    (text,) = sweep.point_overrides({"x.y": value})
    assert parse_override(text) == (["x", "y"], value)


def _write_manifest(tmp_path, states):
    points = [{"lr": v} for v in (0.1, 0.2, 0.3, 0.4)]
    sweep.write_manifest(tmp_path, {"job_id": None, "points": points, "grid": {}})
    for i, state in enumerate(states):
        if state == "missing":
            continue
        run = tmp_path / f"point-{i}" / "lsq-1"
        run.mkdir(parents=True)
        (run / "config.toml").write_text("")
        if state != "failed":
            (run / "summary.json").write_text(json.dumps({"status": state, "loss": i / 10,
                                                          "lr": 9}))
    return points


def test_collect_names_missing_and_failed_points(tmp_path):
    _write_manifest(tmp_path, ["complete", "missing", "failed", "preempted"])
    rows, csv_text, md, problems = sweep.collect(tmp_path)
    assert [r["state"] for r in rows] == ["complete", "missing", "failed", "preempted"]
    assert problems == ["point 1 (lr=0.2): missing", "point 2 (lr=0.3): failed",
                        "point 3 (lr=0.4): preempted"]
    assert csv_text.splitlines()[0] == "index,lr,state,loss,run_dir"
    assert csv_text.splitlines()[1].startswith("0,0.1,complete,0.0,")
    assert md.splitlines()[0] == "| index | lr | state | loss |"


def test_sweep_cli_collect_exit_codes(tmp_path):
    _write_manifest(tmp_path, ["complete"] * 4)
    res = hpcml_cli(1, "sweep", "collect", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sweep.csv").is_file() and (tmp_path / "sweep.md").is_file()
    res = hpcml_cli(1, "sweep", "collect", str(tmp_path / "nope"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "not a sweep directory" in res.stderr


# --- submission files and rendering ------------------------------------------------------------

def _submission(tmp_path, body: str) -> Path:
    (tmp_path / "job.toml").write_text('kind = "scaling"\nrows = 64\nfeatures = 8\n')
    path = tmp_path / "sub.toml"
    path.write_text('job = "job.toml"\n' + body)
    return path


def test_plain_job_file_is_a_single_template(tmp_path):
    s = spec.load(JOBS / "slurm-lsq.toml", {"nodes": 2, "ntasks_per_node": 3,
                                            "partition": "gpu", "account": "abc"})
    assert (s.template, s.ntasks, s.kind, s.name) == ("multi-node", 6, "scaling", "lsq")
    text = render.render(s, tmp_path)
    head = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for want in ("--nodes=2", "--ntasks=6", "--ntasks-per-node=3", "--partition=gpu",
                 "--account=abc", "--signal=B:USR1@120", "--requeue"):
        assert f"#SBATCH {want}" in head
    assert "{{" not in text and "-ppn 3" in text


def test_sweep_renders_one_case_per_point(tmp_path):
    path = _submission(tmp_path, '[sweep]\nlr = [0.1, 0.2]\nmode = ["weak", "strong"]\n')
    s = spec.load(path)
    assert s.template == "array" and len(s.points) == 4
    text = render.render(s, tmp_path)
    assert "#SBATCH --array=0-3" in text
    assert "  3) POINT=(--set lr=0.2 --set 'mode=\"strong\"') ;;" in text
    bash = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert bash.returncode == 0, bash.stderr


@pytest.mark.parametrize("body, message", [
    ("[sweep]\nbogus = [1, 2]\n", "bogus: unknown key"),
    ("[sweep]\nlr = [0.1, -1.0]\n", "lr: must be > 0"),
    ("[sweep]\nlr = []\n", "sweep.lr: must be a non-empty list"),
    ("[sweep.train]\nlr = [0.1]\n", "train: unknown key"),
    ("[slurm]\ntime = \"ten minutes\"\n", "slurm.time"),
    ("[slurm]\ntemplate = \"scaling\"\n", "scaling.ranks"),
    ("[slurm]\nntasks_per_node = 2\n[scaling]\nranks = [1, 4]\n", "exceed the 2 tasks"),
    ("[slurm]\nlauncher = \"aprun\"\n", "slurm.launcher: must be one of"),
])
def test_bad_submission_is_one_line_usage_error(tmp_path, body, message):
    with pytest.raises(UsageError, match=message):
        spec.load(_submission(tmp_path, body))


def test_unknown_sweep_key_exits_2_before_submitting(tmp_path):
    path = _submission(tmp_path, "[slurm]\nruns_dir = \"out\"\n[sweep]\nbogus = [1, 2]\n")
    res = hpcml_cli(1, "slurm", "submit", str(path), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "bogus: unknown key" in res.stderr
    assert not (tmp_path / "out").exists()


def test_fill_rejects_unknown_placeholder():
    assert render.fill("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(KeyError, match="y"):
        render.fill("{{y}}", {})


@pytest.mark.parametrize("message, needle", [
    ("sbatch: error: invalid partition specified: nope", "sinfo -s"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not "
     "available", "lower --ntasks-per-node"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition "
     "combination specified", "--account"),
    ("sbatch: error: something new", "hpcml slurm render sub.toml"),
])
def test_hints(message, needle):
    assert needle in submit.hint(message, "sub.toml")


def test_slurm_conf_is_private(tmp_path):
    text = slurm_conf(tmp_path, (7001, 7002), 3, "host")
    assert "SlurmctldPort=7001" in text and "SlurmdPort=7002" in text
    assert f"StateSaveLocation={tmp_path}/state" in text and "CPUs=3" in text
    assert "ProctrackType=proctrack/linuxproc" in text and "TaskPlugin=task/none" in text


# --- alpha-beta model and efficiency -----------------------------------------------------------

def test_alpha_beta_factors():
    assert latency_factor(1) == 0 and bandwidth_factor(1) == 0
    assert latency_factor(2) == 2 and latency_factor(5) == 6 and latency_factor(1024) == 20
    assert bandwidth_factor(4) == 1.5


def test_fit_recovers_planted_alpha_beta():
    alpha, beta, p = 3e-6, 2.5e-10, 4
    sizes = [4 * 4**k for k in range(10)]
    times = [latency_factor(p) * alpha + bandwidth_factor(p) * n * beta for n in sizes]
    model = fit(sizes, times, p)
    assert model.alpha == pytest.approx(alpha, rel=1e-6)
    assert model.beta == pytest.approx(beta, rel=1e-6)
    assert model.rms_rel_error < 1e-9
    assert model.allreduce_seconds(1e6, 8) == pytest.approx(6 * alpha + 1.75e6 * beta)
    with pytest.raises(ValueError):
        fit(sizes, times, 1)


def test_efficiency_definitions():
    assert efficiency("strong", 1, 8.0, 4, 2.0) == (4.0, 1.0)
    assert efficiency("strong", 2, 8.0, 8, 4.0) == (2.0, 0.5)
    assert efficiency("weak", 1, 2.0, 4, 4.0) == (2.0, 0.5)
    assert projection_ranks(4, 1200) == [8, 16, 32, 64, 128, 256, 512, 1024, 1200]
    assert projection_ranks(1200, 1200) == []


def _m(p, compute, comm):
    return Measurement(run_dir="", ranks=p, time=compute + comm, compute=compute, comm=comm,
                       allreduce_bytes=1e6, allreduce_calls=1.0, mode="weak", hosts=1,
                       ranks_per_host=p, cores=2, unit="s/step")


def test_build_table_projects_weak_scaling_with_model():
    alpha, beta = 1e-5, 1e-9
    model = fit([1e3, 1e6], [2 * alpha + n * beta for n in (1e3, 1e6)], 2)
    rows = build_table([_m(2, 0.1, 0.001), _m(1, 0.1, 0.0)], "weak", model, 1200)
    assert [r["source"] for r in rows[:2]] == ["measured", "measured"]
    assert rows[-1]["P"] == 1200 and rows[-1]["source"] == "projection"
    t_1200 = 0.1 + latency_factor(1200) * alpha + bandwidth_factor(1200) * 1e6 * beta
    assert rows[-1]["efficiency"] == pytest.approx(0.1 / t_1200)
    effs = [r["efficiency"] for r in rows if r["source"] == "projection"]
    assert effs == sorted(effs, reverse=True)
    assert rows[1]["oversubscribed"] is False


def test_model_of_a_whole_step_keeps_the_rest_and_adds_small_allreduces(tmp_path):
    """A scaling run that reports its whole step: the part that is neither compute nor the
    gradient's Allreduce is measured at P0 and kept; each small allreduce adds the model's
    8-byte Allreduce time at P less that at P0; strong scaling divides only the compute."""
    summary = {"ranks": 2, "mode": "weak", "compute_s_per_step": 0.01,
               "allreduce_s_per_step": 0.03, "step_s_per_step": 0.045, "allreduce_bytes": 4e6,
               "small_allreduces_per_step": 2}
    for name, data in (("summary.json", summary), ("env.json", {"cores": 2}),
                       ("ledger.json", {"ranks": []})):
        (tmp_path / name).write_text(json.dumps(data))
    base = measure(tmp_path)
    assert (base.time, base.small_allreduces) == (pytest.approx(0.045), 2.0)
    assert base.other == pytest.approx(0.005)
    alpha, beta = 1e-4, 8e-9
    model = fit([1e6, 4e6], [2 * alpha + n * beta for n in (1e6, 4e6)], 2)
    for p in (2, 4, 8):
        small = 2 * (latency_factor(p) - latency_factor(2)) * alpha + 2 * (
            bandwidth_factor(p) - bandwidth_factor(2)) * 8 * beta
        t = 0.01 + 0.005 + latency_factor(p) * alpha + bandwidth_factor(p) * 4e6 * beta + small
        assert model_time(base, "weak", model, p) == pytest.approx(t)
        assert model_time(base, "strong", model, p) == pytest.approx(t - 0.01 + 0.01 * 2 / p)
    rows = build_table([base], "weak", model, 4)
    assert rows[0]["model_time"] == pytest.approx(model_time(base, "weak", model, 2))
    assert rows[-1]["P"] == 4 and rows[-1]["compute"] == pytest.approx(0.015)


def test_a_fitted_model_names_the_link_its_bench_measured(tmp_path):
    rows = [{"op": "Allreduce", "bytes": n, "hpcml_us": 1e6 * (2e-5 + n * 8e-9)}
            for n in (1e6, 2e6, 4e6)]
    (tmp_path / "summary.json").write_text(json.dumps({"ranks": 2, "rows": rows}))
    assert fit_bench(tmp_path).link == ""  # no env.json: not known
    env = {"ranks_per_host": {"node2": 1, "node1": 1},
           "transport": {"inter_node": "ip network"}}
    (tmp_path / "env.json").write_text(json.dumps(env))
    model = fit_bench(tmp_path)
    assert model.link == "2 hosts (node1, node2) over ip network"
    assert model.beta == pytest.approx(8e-9) and model.alpha == pytest.approx(1e-5)
    # Hockney's two points: a middle size faster than the line (a token bucket carrying part
    # of it) changes the fit's error, not the line through the smallest and largest sizes
    rows[1]["hpcml_us"] /= 2
    (tmp_path / "summary.json").write_text(json.dumps({"ranks": 2, "rows": rows}))
    bucket = fit_bench(tmp_path)
    assert (bucket.alpha, bucket.beta) == pytest.approx((model.alpha, model.beta))
    assert bucket.points == 3 and bucket.rms_rel_error == pytest.approx(1 / 3 ** 0.5)
    assert bench_link({"ranks_per_host": {"vm": 2}}) == "one host (vm), no network"
    # a second run of small sizes, its means (tail included) fitted rather than its medians
    small = tmp_path / "small"
    small.mkdir()
    rows = [{"op": "Allreduce", "bytes": n, "hpcml_us": 1.0,
             "hpcml_mean_us": 1e6 * (4e-4 + n * 8e-9)} for n in (8, 64)]
    (small / "summary.json").write_text(json.dumps({"ranks": 2, "rows": rows}))
    both = fit_bench(tmp_path, small)
    assert both.points == 5 and both.link == model.link
    assert both.alpha == pytest.approx(2e-4, rel=0.2)  # pulled up from 1e-5 by the small means
    (small / "summary.json").write_text(json.dumps({"ranks": 4, "rows": rows}))
    with pytest.raises(UsageError, match="different P"):
        fit_bench(tmp_path, small)


def test_measure_reads_generic_run_dir(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"ranks": 2, "seconds": 3.0}))
    (tmp_path / "env.json").write_text(json.dumps({"ranks_per_host": {"a": 2}, "cores": 1}))
    ledger = {"Allreduce": {"calls": 4, "bytes_sent": 400, "bytes_received": 400,
                            "seconds": 0.5}, "bcast": {"calls": 1, "bytes_sent": 1,
                                                       "bytes_received": 1, "seconds": 0.25}}
    (tmp_path / "ledger.json").write_text(json.dumps({"ranks": [ledger, ledger]}))
    m = measure(tmp_path)
    assert (m.time, m.comm, m.compute, m.allreduce_bytes, m.allreduce_calls) == (
        3.0, 0.75, 2.25, 100.0, 4.0)
    assert m.ranks_per_host > m.cores


# --- the least-squares workload ----------------------------------------------------------------

def test_rows_do_not_depend_on_how_they_are_split():
    x, y = rows_block(0, 3 * BLOCK + 7, 5, 0.1, seed=3)
    parts = [rows_block(a, b, 5, 0.1, seed=3) for a, b in ((0, 10), (10, BLOCK + 1),
                                                           (BLOCK + 1, 3 * BLOCK + 7))]
    np.testing.assert_array_equal(x, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))


def test_local_rows_weak_and_strong():
    weak = ScalingConfig(mode="weak", rows=10)
    strong = ScalingConfig(mode="strong", rows=10)
    assert [local_rows(weak, 3, r) for r in range(3)] == [(0, 10, 30), (10, 20, 30),
                                                          (20, 30, 30)]
    assert [local_rows(strong, 3, r) for r in range(3)] == [(0, 4, 10), (4, 7, 10),
                                                            (7, 10, 10)]


def test_gradient_is_the_least_squares_gradient():
    rng = np.random.default_rng(0)
    x, y, w = rng.standard_normal((7, 3)), rng.standard_normal(7), rng.standard_normal(3)
    eps = 1e-6
    loss = lambda v: 0.5 * np.sum((x @ v - y) ** 2)  # noqa: E731
    numeric = [(loss(w + eps * e) - loss(w - eps * e)) / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(gradient_sum(x, y, w), numeric, rtol=1e-6)
    assert not math.isnan(loss(w))


def test_cluster_refuses_without_root_in_one_line(tmp_path, monkeypatch):
    from hpcml.slurm import local_cluster

    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(local_cluster.ClusterUnavailable, match="needs root") as info:
        local_cluster.up(tmp_path)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())
