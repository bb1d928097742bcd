"""Job-file validation (one line, exit 2, nothing written) and the CLI end to end."""

import dataclasses
import json

import pytest

from hpcml.config import JobConfig, apply_overrides, build, option
from hpcml.errors import ConfigError
from hpcml.runtime import configure_threads, cores_available
from hpcml.testing import hpcml_cli, mpi_test


@dataclasses.dataclass
class Inner:
    lr: float = option(0.1, gt=0.0)
    mode: str = option("a", choices=("a", "b"))


@dataclasses.dataclass
class Outer(JobConfig):
    steps: int = option(10, min=1)
    sizes: list[int] = option([1, 2], min=1)
    train: Inner = option(Inner())


def test_build_accepts_valid_values_and_coerces_ints_to_floats():
    cfg = build(Outer, {"steps": 3, "train": {"lr": 1}, "sizes": [4]})
    assert (cfg.steps, cfg.train.lr, cfg.sizes, cfg.train.mode) == (3, 1.0, [4], "a")
    assert Outer().sizes is not Outer().sizes


@pytest.mark.parametrize(("data", "message"), [
    ({"stepz": 1}, "stepz: unknown key in the top level; allowed: kind, name, runs_dir, seed, "
                   "sizes, steps, threads, train, watchdog_timeout"),
    ({"train": {"lr": "x"}}, "train.lr: must be a number, got 'x'"),
    ({"train": {"lr": 0.0}}, "train.lr: must be > 0.0, got 0.0"),
    ({"train": {"mode": "c"}}, "train.mode: must be one of 'a', 'b', got 'c'"),
    ({"steps": True}, "steps: must be an integer, got True"),
    ({"sizes": [1, 0]}, "sizes: must be >= 1, got 0"),
    ({"train": 3}, "train: must be a table [train], got 3"),
    ({"steps": 10**23}, "steps: must be <= 2147483647, got 100000000000000000000000"),
    ({"sizes": [1, 2**31]}, "sizes: must be <= 2147483647, got 2147483648"),
    ({"train": {"lr": float("nan")}}, "train.lr: must be a finite number, got nan"),
    ({"train": {"lr": float("inf")}}, "train.lr: must be a finite number, got inf"),
])
def test_build_names_the_key_and_the_rule(data, message):
    with pytest.raises(ConfigError) as err:
        build(Outer, data)
    assert str(err.value) == message


def test_integer_bound_is_the_largest_c_int_unless_the_option_sets_one():
    assert build(Outer, {"steps": 2**31 - 1}).steps == 2**31 - 1

    @dataclasses.dataclass
    class Big(JobConfig):
        n: int = option(1, max=2**40)

    assert build(Big, {"n": 2**40}).n == 2**40


def test_overrides_parse_toml_values_and_nest():
    out = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "name=foo", "sizes=[3, 4]"])
    assert out == {"train": {"lr": 0.5}, "name": "foo", "sizes": [3, 4]}


BAD_JOBS = [
    ("bogus = 1\n", "bogus: unknown key in the top level"),
    ("iterations = 'many'\n", "iterations: must be an integer, got 'many'"),
    ("min_bytes = 1\n", "min_bytes: must be >= 4, got 1"),
    ("max_bytes = 8\nmin_bytes = 64\n", "max_bytes: 8 < min_bytes 64"),
    ("ops = ['Allreduce', 'Bcastt']\n", "ops: must be one of"),
    ("iterations = [\n", "invalid TOML"),
    ("kind = 'nope'\n", "kind: unknown job kind 'nope'"),
]


def check_bad_job(tmp_path, nranks, body, expected):
    job = tmp_path / "job.toml"
    kind = "" if body.startswith("kind") else "kind = 'bench-collectives'\n"
    job.write_text(kind + f"runs_dir = '{tmp_path / 'runs'}'\n" + body)
    res = hpcml_cli(nranks, "run", str(job), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcml: error: "), res.stderr
    assert expected in lines[0]
    assert str(job) in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("body", "expected"), BAD_JOBS)
def test_bad_job_file_exits_2_with_one_line_and_no_output(tmp_path, body, expected):
    check_bad_job(tmp_path, 1, body, expected)


def test_bad_job_file_is_reported_once_by_four_ranks(tmp_path):
    check_bad_job(tmp_path, 4, *BAD_JOBS[0])


def test_missing_job_file_and_bad_set_exit_2(tmp_path):
    res = hpcml_cli(1, "run", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert res.returncode == 2 and "not found" in res.stderr
    res = hpcml_cli(1, "bench", "collectives", "--set", "warmup=-1", cwd=tmp_path)
    assert res.returncode == 2 and "warmup: must be >= 0, got -1" in res.stderr
    res = hpcml_cli(1, "bench", "nosuch", cwd=tmp_path)
    assert res.returncode == 2 and "unknown benchmark 'nosuch'" in res.stderr


@pytest.mark.parametrize("nranks", [1, 2])
def test_bench_collectives_writes_a_complete_run_directory(tmp_path, nranks):
    res = hpcml_cli(nranks, "bench", "collectives", "--set", f"runs_dir='{tmp_path}'",
                    "--set", "max_bytes=4096", "--set", "iterations=3", "--set", "warmup=1",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (run,) = tmp_path.iterdir()
    names = sorted(p.name for p in run.iterdir())
    assert names == ["collectives.png", "config.toml", "env.json", "ledger.json",
                     "segments.json", "summary.json", "table.md"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["ranks"] == nranks
    ops = {(r["op"], r["buffer"]) for r in summary["rows"]}
    assert len(ops) == (6 if nranks == 1 else 10) and all(r["ratio"] > 0 for r in summary["rows"])
    assert all(0 < r["hpcml_mean_us"] < 1e6 * 60 for r in summary["rows"])  # mean per call
    bound = {r["op"] for r in summary["rows"] if r["hpcml_persistent_us"] is not None}
    assert bound == ({"Allreduce"} if nranks == 1 else {"Allreduce", "SendRecv"})
    # torch buffers also take the torch.distributed path on the "hpcml" backend
    paths = {(r["buffer"], r["torch_us"] is not None and (r["ratio_torch"] or 0) > 0)
             for r in summary["rows"]}
    assert paths == {("torch", True), ("numpy", False)}
    assert all(r["ratio_persistent"] > 0 and r["raw_persistent_us"] > 0
               for r in summary["rows"] if r["op"] in bound)
    env = json.loads((run / "env.json").read_text())
    assert env["ranks"] == nranks and "MPICH" in env["mpi_library"]
    assert env["heap"] == {"keep_freed_below": 1 << 30, "set_by": "hpcml"}  # hpcml.heap
    assert "hpcml/raw" in res.stdout


def test_info_runs_without_mpiexec():
    res = hpcml_cli(1, "info")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["ranks"] == 1 and info["torch"]["threads"] >= 1


@mpi_test(ranks=[1, 2])
def test_configure_threads_bounds_torch_and_the_loaded_blas_pools(comm):
    """Each rank gets cores // ranks-per-node threads (or what it asks for) in torch and in the
    BLAS pools numpy already loaded, so ranks sharing a node never oversubscribe it."""
    import threadpoolctl
    import torch

    expected = max(1, cores_available() // comm.split_shared().size)
    assert configure_threads(comm, 0) == expected
    blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert blas and all(p["num_threads"] == expected for p in blas)
    assert torch.get_num_threads() == expected
    configure_threads(comm, 1)
    assert all(p["num_threads"] == 1 for p in threadpoolctl.threadpool_info()
               if p["user_api"] == "blas")
