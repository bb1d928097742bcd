"""Output files outside run directories, refused up front unless they can only be hpcml's own:
results files of benches (hpcml.bench.results, bench reduction's rows), appended without
rewriting a byte, torn lines reported and kept, never a reason to drop rows; and the files of a
scaling report."""

import json

import pytest

from hpcml.bench import results
from hpcml.errors import ConfigError
from hpcml.nmt.bench import is_row, latest_runs


def row(p, method="ddp", run=None, step_ms=2.0):
    out = {"P": p, "method": method, "scaling": "weak", "step_ms": step_ms,
           "tokens_per_s": 100.0, "exchange_peak_bytes": None}
    return {**out, "run": run} if run else out


def check(path):
    results.check("results", str(path), is_row, "bench reduction")


def test_append_keeps_every_byte_and_closes_a_torn_line(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    results.append(path, [row(1)])
    torn = path.read_bytes() + b'{"P": 2, "meth'
    path.write_bytes(torn)
    check(path)  # a torn line is no reason to refuse the file
    results.append(path, [row(2, run="b"), row(2, "dense_allreduce", run="b")])
    data = path.read_bytes()
    assert data.startswith(torn + b"\n")  # nothing before the new rows changed
    assert results.read(path) == [row(1), row(2, run="b"), row(2, "dense_allreduce", run="b")]
    assert capsys.readouterr().err == (f"hpcml: warning: {path}: line 2 not JSON (a torn write "
                                       "or an edit): skipped, left in place\n")
    assert path.read_bytes() == data  # reading changes nothing


def test_latest_run_of_each_p_supersedes_older_ones_in_file_order():
    rows = [row(1), row(2, "dense_allreduce"), row(2),  # an older version: one run per P
            row(2, run="r2", step_ms=5.0), row(4, run="r3"), row(2, "dense_allreduce", run="r4")]
    assert latest_runs(rows) == [row(1), row(2, "dense_allreduce", run="r4"), row(4, run="r3")]


@pytest.mark.parametrize(("make", "expected"), [
    (lambda t: t / "keep", "is a directory"),
    (lambda t: t / "keep" / "notes.md", "is not named *.jsonl"),
    (lambda t: t / "summary.json", "is not named *.jsonl"),
    (lambda t: t / "link.jsonl", "(a link to"),
    (lambda t: t / "metrics.jsonl", "line 2 is not a row of bench reduction"),
    (lambda t: t / "garbage.jsonl", "holds no row of bench reduction"),
    (lambda t: t / "afile" / "x.jsonl", "ENOTDIR (Not a directory) at"),
])
def test_a_file_the_bench_does_not_own_is_refused_and_left_alone(tmp_path, make, expected):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.md").write_text("my notes\n")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "keep" / "notes.md")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row(1)) + '\n{"step": 1}\n')
    (tmp_path / "garbage.jsonl").write_text("not json\n")
    (tmp_path / "afile").write_text("x")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        check(make(tmp_path))
    assert str(err.value).startswith("results: ") and expected in str(err.value)
    assert str(err.value).endswith("(give a new .jsonl file or one that bench reduction wrote)")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_new_file_in_a_new_directory_is_accepted_without_creating_anything(tmp_path):
    check(tmp_path / "new" / "dir" / "rows.jsonl")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [
    {"P": "2", "method": "ddp", "step_ms": 1.0, "tokens_per_s": 1.0},
    {"P": 2, "method": "nosuch", "step_ms": 1.0, "tokens_per_s": 1.0},
    {"P": 2, "method": "ddp", "step_ms": 0.0, "tokens_per_s": 1.0},
    {"P": 2, "method": "ddp", "step_ms": 1.0},
    {"P": 2, "method": "ddp", "step_ms": 1.0, "tokens_per_s": 1.0, "rss_peak_MiB": "big"},
    [1, 2],
])
def test_is_row_rejects_what_the_tables_could_not_read(bad):
    assert is_row(row(2)) and not is_row(bad)


def test_scaling_report_replaces_only_its_own_files(tmp_path):
    from hpcml.errors import UsageError
    from hpcml.report.output import check_out

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table.md").write_text("my table\n")
    with pytest.raises(UsageError) as err:
        check_out(mine)
    assert str(err.value) == (f"--out: '{mine}' holds table.md that no scaling report wrote "
                              "(choose a new directory; a report replaces only its own files)")
    (mine / "report.json").write_text('{"rows": []}')  # not a report's: keys missing
    with pytest.raises(UsageError, match="holds table.md, report.json that no scaling report"):
        check_out(mine)
    assert (mine / "table.md").read_text() == "my table\n"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "table.md").write_text("old report\n")
    (earlier / "report.json").write_text('{"mode": "weak", "rows": [], "measured_up_to": 2}')
    check_out(earlier)  # an earlier report's files may be replaced
    check_out(tmp_path / "new" / "report")
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="ENOTDIR"):
        check_out(tmp_path / "afile" / "report")
