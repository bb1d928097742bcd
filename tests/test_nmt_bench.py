"""``hpcml bench reduction`` end to end on 2 ranks with a tiny model: rows for every method
(DDP over gloo and over "hpcml" moving the same bytes),
the memory facts the paper predicts, accumulation over runs, and bad input exits 2."""

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcml.nmt.bench import HOROVOD, METHODS, schedule
from hpcml.nmt.corpus import generate
from hpcml.testing import hpcml_cli

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "bench-reduction.toml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("nmtbench") / "c.h5", pairs=120, max_number=999)


def args(tmp_path, corpus, *extra):
    out = []
    for kv in ["model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
               "batch_per_rank=4", "steps=2", "warmup=1", f"data.path={corpus}",
               f"runs_dir={tmp_path / 'runs'}", f"results={tmp_path / 'rows.jsonl'}", *extra]:
        out += ["--set", kv]
    return out


@given(st.permutations(METHODS).flatmap(lambda ms: st.integers(1, len(ms)).map(
    lambda k: list(ms[:k]))), st.booleans())
def test_horovod_methods_step_last_and_alone(methods, interleave):
    """Whatever the order asked for, every method is measured once, Horovod's after all others
    and each alone (its background thread outlives its steps); the others alternate in the
    order given when interleaved and step alone otherwise."""
    groups = schedule(methods, interleave)
    assert sorted(m for g in groups for m in g) == sorted(methods)
    others = [m for m in methods if m not in HOROVOD]
    horovod = [m for m in methods if m in HOROVOD]
    assert groups[len(groups) - len(horovod):] == [[m] for m in horovod]
    head = groups[:len(groups) - len(horovod)]
    assert head == ([others] if interleave and others else [[m] for m in others])


def test_bench_reduction_two_ranks(tmp_path, corpus):
    res = hpcml_cli(2, "bench", "reduction", JOB, *args(tmp_path, corpus), cwd=tmp_path,
                    timeout=180)
    assert res.returncode == 0, res.stderr
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "rows.jsonl").read_text()
                                        .splitlines())}
    assert {"sparse_allgather", "dense_allreduce", "ddp", "ddp_hpcml"} <= set(rows)
    assert all(r["P"] == 2 and r["step_ms"] > 0 for r in rows.values())
    dense, sparse = rows["dense_allreduce"], rows["sparse_allgather"]
    assert dense["exchange_peak_bytes"] == rows["ddp"]["exchange_peak_bytes"]  # model size
    # DDP over "hpcml": the same buckets, and the ledger counts exactly what gloo's would move
    for key in ("exchange_peak_bytes", "recv_bytes_per_step"):
        assert rows["ddp_hpcml"][key] == rows["ddp"][key], key
    assert sparse["exchange_peak_bytes"] > dense["exchange_peak_bytes"]
    assert sparse["recv_KiB_per_step"] > dense["recv_KiB_per_step"]
    if "horovod" not in rows:
        assert "horovod: skipped (" in res.stdout
    # hpcml.horovod: the buckets of dense_allreduce, plus the header per step (16 int64)
    hh = rows["hpcml_horovod"]
    assert hh["exchange_peak_bytes"] == dense["exchange_peak_bytes"]
    assert hh["recv_bytes_per_step"] == dense["recv_bytes_per_step"] + 128
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "reduction.png").stat().st_size > 0
    assert "| 2 | dense_allreduce |" in (run / "table.md").read_text()
    # a torn line (a writer killed mid-row) is reported and kept; no row is dropped or rewritten
    first = (tmp_path / "rows.jsonl").read_bytes()
    with open(tmp_path / "rows.jsonl", "ab") as fh:
        fh.write(b'{"P": 3, "meth')
    res = hpcml_cli(1, "bench", "reduction", JOB, *args(tmp_path, corpus, "methods=['ddp']"),
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    data = (tmp_path / "rows.jsonl").read_bytes()
    assert data.startswith(first + b'{"P": 3, "meth\n')
    assert (f"hpcml: warning: {tmp_path / 'rows.jsonl'}: line {len(rows) + 1} not JSON (a torn "
            "write or an edit): skipped, left in place") in res.stderr
    merged = [json.loads(x) for x in data.decode().splitlines() if not x.startswith('{"P": 3')]
    assert sorted({r["P"] for r in merged}) == [1, 2] and len(merged) == len(rows) + 1
    newest = sorted((tmp_path / "runs").iterdir())[-1]
    assert "| 1 | ddp |" in (newest / "table.md").read_text()
    assert "| 2 | dense_allreduce |" in (newest / "table.md").read_text()


def test_bench_reduction_bad_methods_exit_2(tmp_path, corpus):
    res = hpcml_cli(1, "bench", "reduction", JOB,
                    *args(tmp_path, corpus, "methods=['ddp', 'ddp']"), cwd=tmp_path)
    assert res.returncode == 2 and "methods:" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()


def test_bench_reduction_refuses_a_results_path_it_does_not_own_before_running(tmp_path, corpus):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.md").write_text("my notes\n")
    for target, problem in [("keep/notes.md", "'keep/notes.md' is not named *.jsonl"),
                            ("keep", "'keep' is a directory")]:
        res = hpcml_cli(1, "bench", "reduction", JOB,
                        *args(tmp_path, corpus, f"results={target}"), cwd=tmp_path)
        lines = res.stderr.splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith(f"hpcml: error: results: {problem}"), res.stderr
    assert (tmp_path / "keep" / "notes.md").read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
