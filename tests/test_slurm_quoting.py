"""What reaches the sbatch script from a submission file: hostile values are refused in one line
or rendered as one shell-quoted word each, and a rendered script, run by bash with srun, scontrol,
python and mpiexec replaced by stubs, passes every value through verbatim and runs nothing else
(no sentinel file appears). Pure: no Slurm, no MPI."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slurm_stubs import run_script, stubs  # noqa: F401 (the fixture)

from hpcml.config.schema import parse_override
from hpcml.errors import UsageError
from hpcml.slurm import render, spec
from hpcml.slurm.sweep import toml_value
from hpcml.testing import hpcml_cli

INJECTIONS = ["$(touch SENTINEL)", "`touch SENTINEL`", '"; touch SENTINEL; "',
              "'; touch SENTINEL; '", "x && touch SENTINEL #", "${IFS}$(touch${IFS}SENTINEL)",
              "a b\t", "a\nb", "a\rb", "a\x00b", "a\u2028b", "a\u2029b", "a\x1bb", "back\\slash",
              "*", "-x", "=", "%j", ""]
# characters that mean something to bash, sbatch or TOML, mixed into every generated value
SPECIAL = list(" \t\n\r\x00\x0b\x0c\x1b\x7f\u0085\u2028\u2029\u200b\ufeff"
               "$`'\"\\;&|<>()#%*?~{}[]=/-!")
TEXT = st.text(st.one_of(st.sampled_from(SPECIAL), st.characters(exclude_categories=["Cs"])),
               max_size=12)
FIELDS = ("slurm.job_name", "slurm.partition", "slurm.extra[0]", "set[0]", "name")
# the job file's own name (run directory prefix) is one safe word before Slurm ever sees it
SAFE_JOB_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


def _job(tmp_path: Path, name: str = "lsq") -> None:
    (tmp_path / "job.toml").write_text(f'kind = "scaling"\nname = {toml_value(name)}\n'
                                       "rows = 64\nfeatures = 8\n")


def _load(tmp_path: Path, *, job_name: str = "", partition: str = "", account: str = "",
          extra: tuple[str, ...] = (), sets: tuple[str, ...] = (), sweep: str | None = None,
          name: str = "lsq", template: str = "single") -> spec.Spec:
    """A submission built from Python values (no TOML quoting in the way), loaded."""
    import tomli_w

    _job(tmp_path, name)
    data = {"job": "job.toml", "set": list(sets),
            "slurm": {"template": template, "runs_dir": str(tmp_path / "runs")}}
    if sweep is not None:
        data["sweep"] = {"name": [sweep, "b"]}
        data["slurm"]["template"] = "array"
    path = tmp_path / "sub.toml"
    path.write_text(tomli_w.dumps(data))
    return spec.load(path, {"job_name": job_name or None, "partition": partition or None,
                            "account": account or None, "extra": list(extra) or None})


def _sbatch_words(text: str) -> list[str]:
    """Every ``#SBATCH`` line read back as shell words (sbatch reads quotes the same way)."""
    return [word for line in text.splitlines() if line.startswith("#SBATCH ")
            for word in shlex.split(line[len("#SBATCH "):])]


def _assignment(text: str, var: str) -> list[str]:
    """The words of ``VAR=...`` or ``VAR=(...)`` in the script, as bash reads them."""
    (line,) = [line for line in text.splitlines() if line.startswith(f"{var}=")]
    value = line[len(var) + 1:]
    return shlex.split(value[1:-1] if value.startswith("(") else value)


def _bash_n(text: str) -> None:
    res = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert res.returncode == 0, res.stderr


def _one_line(exc: UsageError, field: str) -> None:
    assert "\n" not in str(exc) and "\r" not in str(exc) and field in str(exc), str(exc)


def _run_script(text: str, workdir: Path) -> list[list[str]]:
    """Run the script with the stubs; it must succeed and no sentinel may appear."""
    res, calls = run_script(text, workdir)
    assert res.returncode == 0, res.stderr
    assert not list(workdir.rglob("SENTINEL")), res.stdout
    return calls


def _hpcml_runs(calls: list[list[str]]) -> list[list[str]]:
    return [c[4:] for c in calls if c[:4] == ["python", "-m", "hpcml", "run"]]


# --- hostile values through every field, executed ---------------------------------------------

def _refusal(field: str, value: str) -> str | None:
    """The field a value must be refused under, or None when it must render (the contract).
    ``set[0]`` is ``--set runs_dir=VALUE``; ``name`` is the job file's name ("" = the kind)."""
    if field == "name":
        return None if value == "" or re.fullmatch(SAFE_JOB_NAME, value) else field
    header = field in ("slurm.job_name", "slurm.partition", "slurm.extra[0]")
    if any(not ch.isprintable() for ch in value) or (header and "\\" in value):
        return field
    if field == "slurm.job_name" and ("/" in value or value in (".", "..")):
        return field
    if field == "set[0]" and not isinstance(parse_override(f"runs_dir={value}")[1], str):
        return "runs_dir"  # TOML read it as a number, a date, an array...: the job's own check
    return None


def _kwargs(field: str, value: str) -> dict:
    return {"slurm.job_name": {"job_name": value}, "slurm.partition": {"partition": value},
            "slurm.extra[0]": {"extra": (f"--comment={value}",)},
            "set[0]": {"sets": (f"runs_dir={value}",)}, "name": {"name": value}}[field]


def _check_round_trip(text: str, field: str, value: str) -> None:
    """The value comes back from the rendered script as the words bash and sbatch read."""
    words = _sbatch_words(text)
    if field in ("slurm.job_name", "name"):
        name = value or "scaling"
        assert f"--job-name={name}" in words and _assignment(text, "NAME") == [name]
    elif field == "slurm.partition":
        assert (f"--partition={value}" in words) == bool(value)
    elif field == "slurm.extra[0]":
        assert f"--comment={value}" in words
    else:
        assert _assignment(text, "SETS") == ["--set", f"runs_dir={value}"]


def _rendered_or_refused(tmp_path: Path, field: str, value: str) -> str | None:
    """Load a submission with ``value`` in ``field``: None when it is refused (in one line,
    under the field the contract names), else the rendered script, which passes ``bash -n``
    and gives the value back (both asserted)."""
    expected = _refusal(field, value)
    try:
        s = _load(tmp_path, **_kwargs(field, value))
    except UsageError as exc:
        assert expected, f"{field}={value!r} refused: {exc}"
        _one_line(exc, expected)
        return None
    assert not expected, f"{field}={value!r} accepted"
    text = render.render(s, tmp_path)
    _bash_n(text)
    _check_round_trip(text, field, value)
    return text


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.usefixtures("stubs")
def test_hostile_values_are_refused_or_reach_the_job_verbatim(tmp_path, field, value):
    if field == "slurm.job_name" and not value:
        value = "-"  # an empty job_name means "the job's name"
    text = _rendered_or_refused(tmp_path, field, value)
    if text is None:
        return
    (run,) = _hpcml_runs(_run_script(text, tmp_path))
    assert run[0] == str((tmp_path / "job.toml").resolve())
    name = {"slurm.job_name": value, "name": value or "scaling"}.get(field, "lsq")
    runs = (tmp_path / "runs").resolve()
    assert run[1:] == [*_assignment(text, "SETS"), "--set", f"runs_dir={runs}/{name}-7"]
    if field == "set[0]":
        assert run[1:3] == ["--set", f"runs_dir={value}"]


@pytest.mark.parametrize("value", ["lr", "a b", "$(touch SENTINEL)", 'q"uote', "x\ny",
                                   "x\u2028y", "back\\slash"])
@pytest.mark.usefixtures("stubs")
def test_sweep_string_values_render_as_toml_or_are_refused(tmp_path, value):
    """The swept key is the job's ``name``: a point whose value is not a safe name is refused
    in one line when the submission is loaded (each point is validated as the job it runs)."""
    try:
        s = _load(tmp_path, sweep=value)
    except UsageError as exc:
        assert not re.fullmatch(SAFE_JOB_NAME, value), exc
        _one_line(exc, "name")
        return
    assert re.fullmatch(SAFE_JOB_NAME, value)
    text = render.render(s, tmp_path)
    _bash_n(text)
    (run,) = _hpcml_runs(_run_script(text, tmp_path))
    assert run[-2:] == ["--set", f"name={toml_value(value)}"]
    assert parse_override(run[-1]) == (["name"], value)


@pytest.mark.parametrize("template, extra, dirs", [
    ("single", "", ["{name}-7"]),
    ("multi-node", "nodes = 2\n", ["{name}-7"]),
    ("array", "[sweep]\nlr = [0.1, 0.2]\n", ["{name}-7/point-0"]),
    ("scaling", "ntasks_per_node = 2\n[scaling]\nranks = [1, 2]\n",
     ["{name}-7/p1", "{name}-7/p2"]),
])
@pytest.mark.usefixtures("stubs")
def test_every_template_runs_the_hostile_name_verbatim(tmp_path, template, extra, dirs):
    name = "n $(touch SENTINEL) `touch SENTINEL` \"; touch SENTINEL; ' *"
    _job(tmp_path)
    path = tmp_path / "sub.toml"
    path.write_text(f'job = "job.toml"\n[slurm]\ntemplate = "{template}"\n'
                    f'job_name = {toml_value(name)}\n'
                    f'runs_dir = "{tmp_path / "runs"}"\n{extra}')
    text = render.render(spec.load(path), tmp_path)
    calls = _run_script(text, tmp_path)
    runs = (tmp_path / "runs").resolve()
    assert [run[run.index("--set", 1) + 1] for run in _hpcml_runs(calls)] == [
        f"runs_dir={runs}/{d.format(name=name)}" for d in dirs]
    if template == "scaling":
        assert f"runs_dir={runs}/{name}-7/bench" in calls[1]
        assert calls[-1][:4] == ["python", "-m", "hpcml", "report"]


# --- property: any text is refused in one line or round-trips ----------------------------------

@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=TEXT)
def test_any_text_is_refused_in_one_line_or_round_trips(tmp_path, field, value):
    if field == "slurm.job_name" and not value:
        return  # an empty job_name means "the job's name"
    _rendered_or_refused(tmp_path, field, value)


# --- the other checks --------------------------------------------------------------------------

@pytest.mark.parametrize("time", ["00:10:00\n", "10\n", " 10", "10 ", "1-\n00:00:00",
                                  "10;touch x"])
def test_time_must_match_whole(tmp_path, time):
    _job(tmp_path)
    path = tmp_path / "sub.toml"
    path.write_text('job = "job.toml"\n')
    with pytest.raises(UsageError, match="slurm.time") as info:
        spec.load(path, {"time": time})
    _one_line(info.value, "slurm.time")


@pytest.mark.parametrize("grid", ["lr = [{x = 1}]", "lr = [[{x = 1}], [{x = 2}]]",
                                  "lr = [0.1, {x = 1}]"])
def test_a_table_is_not_a_sweep_value(tmp_path, grid):
    _job(tmp_path)
    path = tmp_path / "sub.toml"
    path.write_text(f'job = "job.toml"\n[sweep]\n{grid}\n')
    with pytest.raises(UsageError, match=r"sweep\.lr: a table is not a sweep value") as info:
        spec.load(path)
    _one_line(info.value, "sweep.lr")


def test_array_sweep_values_render_on_one_line(tmp_path):
    _job(tmp_path)
    path = tmp_path / "sub.toml"
    path.write_text('job = "job.toml"\n[sweep]\nfeatures = [8, 16]\n')
    s = spec.load(path)
    assert toml_value([[1, 2], ["a"]]) == '[[1, 2], ["a"]]'
    assert "  1) POINT=(--set features=16) ;;" in render.render(s, tmp_path)


@pytest.mark.parametrize("item, message", [
    ("-p gpu", "is not a long sbatch option"),
    ("qos=debug", "is not a long sbatch option"),
    ("--QOS=debug", "is not a long sbatch option"),
    ("--time=5", "--time is written by hpcml (use slurm.time instead)"),
    ("--signal=B:USR2@60", "use slurm.signal_seconds"),
    ("--array=0-9", "use [sweep]"),
    ("--output=/tmp/x", "use slurm.runs_dir"),
    ("--qos=debug\n#SBATCH --x", "control character"),
    ("--comment=a\u2028b", "non-printing"),
])
def test_extra_contract_refusals(tmp_path, item, message):
    with pytest.raises(UsageError, match=r"slurm\.extra\[0\]") as info:
        _load(tmp_path, extra=(item,))
    assert message in str(info.value)
    _one_line(info.value, "slurm.extra[0]")


def test_extra_values_are_quoted_and_flags_kept(tmp_path):
    s = _load(tmp_path, extra=("--qos=debug", "--exclusive", "--comment=a b'c", "--mail-type="))
    lines = [line for line in render.render(s, tmp_path).splitlines() if line.startswith("#SB")]
    assert lines[-4:] == ["#SBATCH --qos=debug", "#SBATCH --exclusive",
                          "#SBATCH --comment='a b'\"'\"'c'", "#SBATCH --mail-type=''"]


@pytest.mark.parametrize("runs_dir, message", [("runs/%j", "'%'"), ("a\nb", "control character"),
                                               ("a\u2028b", "non-printing"),
                                               ("a\\b", "backslash")])
def test_runs_dir_refusals(tmp_path, runs_dir, message):
    _job(tmp_path)
    path = tmp_path / "sub.toml"
    path.write_text('job = "job.toml"\n')
    with pytest.raises(UsageError, match="slurm.runs_dir") as info:
        spec.load(path, {"runs_dir": runs_dir})
    assert message in str(info.value)


def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path):
    _job(tmp_path)
    (tmp_path / "sub.toml").write_text(
        'job = "job.toml"\n[slurm]\nruns_dir = "out"\njob_name = "x\\n$(touch SENTINEL)"\n')
    for command in ("render", "submit"):
        res = hpcml_cli(1, "slurm", command, "sub.toml", cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        assert res.stderr.startswith("hpcml: error: ") and "slurm.job_name" in res.stderr
        assert res.stdout == ""
    (tmp_path / "sub.toml").write_text('job = "job.toml"\n[slurm]\nruns_dir = "out"\n')
    res = hpcml_cli(1, "slurm", "render", "sub.toml", "--partition", "a\nb", cwd=tmp_path)
    assert res.returncode == 2 and "slurm.partition" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "sub.toml"]


def test_render_refuses_a_working_directory_it_cannot_quote(tmp_path, monkeypatch):
    s = _load(tmp_path)
    with pytest.raises(UsageError, match="working directory: contains the non-printing") as info:
        render.render(s, tmp_path / "a\nb")
    _one_line(info.value, "working directory")
    odd = tmp_path / "50%"
    odd.mkdir()
    monkeypatch.chdir(odd)
    s.slurm.runs_dir = "runs"  # relative: resolved against the submit directory, with its '%'
    with pytest.raises(UsageError, match=r"slurm\.runs_dir: .*50%.* contains '%'"):
        render.render(s, odd)
