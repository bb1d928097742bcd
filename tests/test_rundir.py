"""Atomic writes and torn-line-tolerant metrics."""

import pytest

from hpcml.rundir import RunDir, atomic_write, read_metrics


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "old")
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 12345)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_metrics_reader_drops_a_torn_last_line(tmp_path):
    run = RunDir.create(str(tmp_path), "job")
    run.log_metrics(step=1, loss=0.5)
    run.log_metrics(step=2, loss=0.25)
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    assert read_metrics(run.path / "metrics.jsonl") == [{"step": 1, "loss": 0.5},
                                                        {"step": 2, "loss": 0.25}]


def test_run_directories_are_unique(tmp_path):
    a, b = RunDir.create(str(tmp_path), "job"), RunDir.create(str(tmp_path), "job")
    assert a.path != b.path
