"""The bad-input contract, property-based (Hypothesis): for EVERY job kind, a job file or
``--set`` overrides mutated with wrong types, huge integers, NaN/inf, unknown keys, hostile
names and paths and empty lists either validate, or end with exit code 2 and exactly one line
``hpcml: error: ...`` -- no traceback, nothing created, no existing file changed.

The property runs the validation that ``hpcml run`` and ``hpcml bench`` run
(:func:`hpcml.launch.validated`, on a one-rank world) in this process, so it is fast; a few
subprocess cases check the same contract end to end through the ``hpcml`` command.
``HPCML_CONTRACT_EXAMPLES=500`` explores further (random, not the fixed CI examples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import math
import os
import re
import shutil
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcml.config import read_toml
from hpcml.config.schema import SAFE_NAME, to_dict
from hpcml.jobs import KINDS, job_kind
from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]
TMP = "@TMP@"  # stands for the example's scratch directory in drawn values
EXAMPLES = int(os.environ.get("HPCML_CONTRACT_EXAMPLES", "0"))
CONTRACT = settings(max_examples=EXAMPLES or 60, deadline=None, derandomize=not EXAMPLES,
                    database=None, suppress_health_check=[HealthCheck.too_slow])
ERROR = re.compile(r"hpcml: error: \S.*")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def base_jobs() -> dict[str, dict[str, Any]]:
    """Kind -> a valid job to mutate: its first shipped job file that one rank accepts (as
    TOML data), else the kind's defaults."""
    bases = {kind: {"kind": kind} for kind in KINDS}
    skip = {"qsparse-async.toml", "bench-consensus.toml"}  # need more than one rank
    for path in sorted((ROOT / "jobs").glob("*.toml")):
        data = read_toml(path)
        if data.get("kind") in KINDS and path.name not in skip and len(bases[data["kind"]]) == 1:
            bases[data["kind"]] = data
    return bases


BASES = base_jobs()


def schema_keys(cls: type, prefix: str = "") -> list[tuple[str, Any, dict[str, Any]]]:
    """Every dotted key of schema ``cls`` with its type and option metadata, sections
    included (the section itself too)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key, tp = f"{prefix}{field.name}", hints[field.name]
        keys.append((key, tp, dict(field.metadata)))
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{key}.")
    return keys


KEYS = {kind: schema_keys(job_kind(kind).config) for kind in KINDS}

# values a user may bring to any key
HUGE = st.integers(10, 450).map(lambda k: 10**k) | st.integers(10, 450).map(lambda k: -(10**k))
NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, -0.0, 1e308, 2**31 - 1, 2**31,
                           2**63, -(2**31) - 1, 0.5, 1e-300]) | st.integers() | st.floats()
NAMES = st.sampled_from(["", "a" * 300, "a\x00b", "a/b", "../../escape", ".hidden", "-rf",
                         "line\nbreak", "$(touch pwned)", '"; touch pwned; "', "é中文", " ",
                         "ok-name", "a" * 100])
PATHS = st.sampled_from([f"{TMP}/keep/notes.md", f"{TMP}/keep", f"{TMP}/rows.jsonl",
                         f"{TMP}/torn.jsonl", f"{TMP}/nosuch/dir/x.jsonl", f"{TMP}/nosuch",
                         f"{TMP}/runs", f"{TMP}/keep/notes.md/sub", "/proc", "/proc/x.jsonl",
                         "/dev/null", "/sys/x", "", "."])
ODD = st.sampled_from([True, False, [], {}, [1, "a"], {"x": 1}, [[]], "x", "1e400",
                       datetime.date(2020, 1, 1), [math.nan], [10**400], [""], ["a/b"]])
VALUES = st.one_of(HUGE, NUMBERS, NAMES, PATHS, ODD, st.text(max_size=20),
                   st.lists(st.integers() | st.text(max_size=8) | NUMBERS, max_size=4))


def substitute(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace(TMP, str(tmp))
    if isinstance(value, list):
        return [substitute(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, tmp) for k, v in value.items()}
    return value


def put(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[key] = value`` for a dotted key, replacing a non-table on the way."""
    *sections, last = key.split(".")
    for part in sections:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[last] = value


def literal(value: Any) -> str:
    """``value`` as the text after ``KEY=`` of a --set (a TOML literal, tables inline)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(str(k))} = {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def typed(tp: Any, meta: dict[str, Any], hostile: bool) -> st.SearchStrategy[Any]:
    """Values of the key's own type, so that validation gets past the type check to bounds,
    cross-field rules and data checks: plausible ones (small numbers, its choices, an empty or
    short list), or ``hostile`` ones of the type (boundaries, huge and non-finite numbers,
    hostile names and paths)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return st.lists(typed(inner, meta, hostile), max_size=4)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return (st.sampled_from([-1, 2**31 - 1, 2**31, 2**40]) | HUGE if hostile
                else st.integers(0, 64))
    if tp is float:
        return (st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e-300, 1e300]) | HUGE
                if hostile else st.floats(0.0, 100.0))
    if tp is str:
        return (NAMES | PATHS if hostile
                else st.sampled_from(list(meta["choices"] or ["x", "run1"])))
    return ODD  # a section or table: anything else than a table


@st.composite
def mutations(draw: st.DrawFn, kind: str) -> list[tuple[str, Any, bool]]:
    """(dotted key, value, given as --set rather than in the file) x 1-3: mostly a key of the
    kind with a value of its type, else any value, an unknown key or the kind itself."""
    out = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        if draw(st.integers(0, 9)) == 0:
            key = draw(st.sampled_from(["kind", "bogus", "train.bogus", "name", "runs_dir"]))
            value = draw(VALUES)
        else:
            key, tp, meta = draw(st.sampled_from(KEYS[kind]))
            how = draw(st.integers(0, 9))  # 0-5 plausible, 6-8 hostile of its type, 9 anything
            value = draw(typed(tp, meta, how > 5) if how < 9 else VALUES)
        out.append((key, value, draw(st.booleans())))
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Path -> content hash (or 'dir') of everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def plant(tmp: Path) -> None:
    """User files that no bad input may change: a note, a results file of bench reduction, and
    one with a torn last line."""
    (tmp / "keep").mkdir()
    (tmp / "keep" / "notes.md").write_text("my notes\n")
    row = ('{"P": 1, "method": "ddp", "scaling": "weak", "step_ms": 2.0, '
           '"tokens_per_s": 10.0}\n')
    (tmp / "rows.jsonl").write_text(row)
    (tmp / "torn.jsonl").write_text(row + '{"P": 2, "meth')


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    """Job files name their data relative to the repository root."""
    before = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(before)


def validate(job_path: str | None, kind: str | None, overrides: list[str]) -> tuple[Any, str]:
    """(plan or None, stderr) of the validation ``hpcml run``/``hpcml bench`` runs; exit codes
    other than 2 and any other exception propagate (they break the contract)."""
    from hpcml.comm import world
    from hpcml.launch import validated

    comm = world()
    delays = comm.delays
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            plan = validated(comm, job_path, kind, overrides)
    except SystemExit as exc:
        assert exc.code == 2, err.getvalue()
        return None, err.getvalue()
    finally:
        comm.set_delays(delays)  # a straggler model of a valid config must not leak
    return plan, err.getvalue()


def assert_valid_config(config: Any) -> None:
    """What no accepted config may hold, whatever was drawn."""
    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            assert not CONTROL.search(value), value
        elif isinstance(value, float):
            assert math.isfinite(value), value

    walk(to_dict(config))
    assert config.name == "" or re.fullmatch(SAFE_NAME.regex, config.name), config.name
    results = getattr(config, "results", "")
    assert results == "" or results.endswith(".jsonl"), results


def check_contract(kind: str, muts: list[tuple[str, Any, bool]], as_bench: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hpcml-contract-"))
    try:
        plant(tmp)
        data = {k: v for k, v in BASES[kind].items()}
        overrides = [f"runs_dir={literal(str(tmp / 'runs'))}"]
        for key, value, as_set in muts:
            value = substitute(value, tmp)
            if as_set:
                overrides.append(f"{key}={literal(value)}")
            else:
                put(data, key, value)
        job = tmp / "job.toml"
        job.write_text(tomli_w.dumps(data))
        before = snapshot(tmp)
        plan, err = validate(str(job), f"{kind}" if as_bench else None, overrides)
        assert snapshot(tmp) == before  # nothing created, nothing changed
        if plan is None:
            lines = err.splitlines()
            assert len(lines) == 1 and ERROR.fullmatch(lines[0]), err
            assert "Traceback" not in err
        else:
            assert err == "", err
            assert_valid_config(plan.config)
    finally:
        shutil.rmtree(tmp)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_base_job_of_every_kind_is_valid(kind):
    """The property below would be vacuous if its starting points did not validate."""
    check_contract(kind, [], as_bench=False)
    with tempfile.TemporaryDirectory() as tmp:
        plan, err = validate(None, kind, [f"runs_dir={literal(tmp)}"])
    assert plan is not None and err == "", err


@pytest.mark.parametrize("kind", sorted(KINDS))
@CONTRACT
@given(data=st.data())
def test_mutated_jobs_validate_or_give_one_line(kind, data):
    muts = data.draw(mutations(kind), label="mutations")
    as_bench = kind.startswith("bench-") and data.draw(st.booleans(), label="as bench")
    check_contract(kind, muts, as_bench)


# runs that used to crash after doing all their work (or quietly accept nonsense), each now
# refused before anything is written; one rank
REFUSED_UP_FRONT = [
    ("bench-privacy", ["projections=[2000000000]"],
     "projections: m = 2000000000 rows: each release would draw an m x 442 Gaussian matrix"),
    ("bench-model-parallel", ['layouts=["dp4"]'],
     "layouts: none of ['dp4'] fits 1 rank (the smallest needs 4)"),
    ("bench-qsparse", ["methods=[]"], "methods: must list at least one value, got []"),
    ("bench-qsparse", ['methods=["qsparse-async"]'], "needs >= 2 ranks (rank 0 serves)"),
    ("bench-collectives", ['ops=["SendRecv", "IsendIrecv"]'], "are ping-pongs, which need 2"),
    ("bench-coded", ['delay_models=["none"]'], "delay_models: ['none'] alone measures nothing"),
    ("bench-cf", ['delay_models=["none"]'], "delay_models: ['none'] alone measures nothing"),
    ("bench-reduction", [f"results={literal(str(ROOT / 'jobs'))}"], "' is a directory"),
    ("bench-reduction", [f"results={literal(str(ROOT / 'README.md'))}"], "is not named *.jsonl"),
    ("bench-reduction", ['projection.bench="no/such/run"'],
     "projection.bench: no/such/run: no summary.json"),
    ("scaling", ['name="a/b"'], "name: 'a/b' is not allowed"),
    ("scaling", ['runs_dir="/proc/runs"'], "ENOENT (No such file or directory) at '/proc'"),
]


@pytest.mark.parametrize(("kind", "overrides", "expected"), REFUSED_UP_FRONT,
                         ids=lambda v: v if isinstance(v, str) and v in KINDS else None)
def test_known_bad_runs_are_refused_before_they_start(kind, overrides, expected, tmp_path):
    runs = [] if any(o.startswith("runs_dir") for o in overrides) else [f"runs_dir={tmp_path}"]
    plan, err = validate(None, kind, [*runs, *overrides])
    assert plan is None and err.count("\n") == 1 and ERROR.fullmatch(err.strip()), err
    assert expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_horovod_only_is_refused_when_horovod_does_not_import(tmp_path):
    from hpcml.nmt.peers import horovod_unavailable

    if horovod_unavailable() is None:
        pytest.skip("Horovod imports here (make horovod), so methods=['horovod'] can run")
    plan, err = validate(None, "bench-reduction", [f"runs_dir={tmp_path}",
                                                   'methods=["horovod", "horovod_sparse"]'])
    assert plan is None and "need Horovod, which does not import" in err, err


# --- end to end through the hpcml command (each a fresh process) -----------------------------

def one_error_line(res) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and ERROR.fullmatch(lines[0]) and "Traceback" not in res.stderr, \
        res.stderr
    return lines[0]


def test_hostile_name_and_runs_dir_end_to_end(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('kind = "bench-privacy"\nname = "../../escape"\n')
    line = one_error_line(hpcml_cli(1, "run", str(job), "--set", f"runs_dir={tmp_path}/runs",
                                    cwd=tmp_path))
    assert line.endswith("name: '../../escape' is not allowed (use 1 to 100 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit)")
    (tmp_path / "afile").write_text("x")
    line = one_error_line(hpcml_cli(1, "bench", "privacy", "--set", "runs_dir=afile/runs",
                                    cwd=tmp_path))
    assert f"ENOTDIR (Not a directory) at '{tmp_path}/afile'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "job.toml"]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a real read-only filesystem (a tmpfs mounted ro, holding one results
    file); skipped where mounting is not permitted."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(ro)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        (ro / "rows.jsonl").write_text('{"P": 1, "method": "ddp", "step_ms": 1, '
                                        '"tokens_per_s": 1}\n')
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_read_only_filesystem_is_refused_with_its_errno(read_only_dir):
    from hpcml.bench import results
    from hpcml.errors import UsageError
    from hpcml.nmt.bench import is_row
    from hpcml.rundir import check_runs_dir

    with pytest.raises(UsageError) as err:
        check_runs_dir(str(read_only_dir / "runs"))
    assert str(err.value) == (f"runs_dir: cannot create run directories under "
                              f"'{read_only_dir}/runs': EROFS (Read-only file system) at "
                              f"'{read_only_dir}' (choose a writable directory, e.g. runs_dir = "
                              '"runs")')
    for name, problem in [("new.jsonl", "cannot create"), ("rows.jsonl", "cannot append to")]:
        with pytest.raises(UsageError, match=f"results: {problem} .*Read-only file system"):
            results.check("results", str(read_only_dir / name), is_row, "bench reduction")
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["rows.jsonl"]


def test_unknown_bench_is_one_line_naming_the_benches(tmp_path):
    line = one_error_line(hpcml_cli(1, "bench", "nosuch", cwd=tmp_path))
    names = ", ".join(sorted(k.removeprefix("bench-") for k in KINDS if k.startswith("bench-")))
    assert line == (f"hpcml: error: NAME: unknown benchmark 'nosuch'; choose from {names} "
                    "(e.g. hpcml bench collectives)")
    assert one_error_line(hpcml_cli(1, "run", "--sett", "x", "y", cwd=tmp_path)).startswith(
        "hpcml: error: No such option '--sett'")


def test_damaged_json_in_sweep_and_report_is_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_bytes(b'{"points": [')
    line = one_error_line(hpcml_cli(1, "sweep", "status", str(sweep), cwd=tmp_path))
    assert line == f"hpcml: error: {sweep}/sweep.json: not valid JSON (line 1); not a file " \
                   "hpcml wrote, or a damaged one"
    run = tmp_path / "run"
    run.mkdir()
    for name, text in [("summary.json", "\xff garbage"), ("env.json", "{}"),
                       ("ledger.json", "{}")]:
        (run / name).write_text(text, encoding="latin-1")
    line = one_error_line(hpcml_cli(1, "report", "scaling", str(run), cwd=tmp_path))
    assert line == f"hpcml: error: {run}/summary.json: not UTF-8 text (byte 0); not a file " \
                   "hpcml wrote, or a damaged one"
    (run / "summary.json").write_text('{"ranks": 2, "seconds": "soon"}')
    (run / "ledger.json").write_text('{"ranks": [{}]}')
    line = one_error_line(hpcml_cli(1, "report", "scaling", str(run), cwd=tmp_path))
    assert "do not hold a finished run's records (TypeError:" in line
    assert not (tmp_path / "scaling-report").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
