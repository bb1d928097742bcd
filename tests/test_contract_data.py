"""The input contract, property-tested: a damaged data file of any kind, or a damaged file that
``--resume`` reads, gives exit 2 and exactly one line ``hpcml: error: ...`` (no traceback)
before anything is written: no run directory appears, no existing file changes. Damage that
leaves a file valid may be accepted; no damage may crash.

The launcher's validation (:func:`hpcml.launch.validated`: schema, ``validate_data``,
``--resume`` checks incl. the kind's ``check_resume``) runs in-process at rank 0 of the job's
rank count, so Hypothesis can try many files quickly; a few cases go through ``hpcml run``."""

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcml import checkpoint
from hpcml.launch import validated
from hpcml.nmt.corpus import generate
from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
DIGITS = ROOT / "data" / "qsparse" / "digits.h5"
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Rank:
    """Rank ``rank`` of ``size`` as the launcher's validation sees it (no MPI): the outcome
    every rank shares is this rank's own."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size

    def set_delays(self, delays) -> None:
        pass

    def allgather(self, obj):
        return [obj]


def tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root counts as itself)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def contract(job: str, sets: list[str], watched: list[Path], size: int = 1,
             resume: Path | None = None) -> str | None:
    """Validate ``job`` with ``--set`` values ``sets`` (and ``--resume``); None when accepted,
    else the one line printed. Asserts the contract: exit 2, one ``hpcml: error:`` line, no
    other exception, the ``watched`` files and directories unchanged."""
    before = tree(*watched)
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err):
        try:
            validated(Rank(0, size), job, None, sets, None if resume is None else str(resume))
        except SystemExit as exc:
            code = exc.code
    assert tree(*watched) == before, "validation changed a file"
    if code is None:
        assert err.getvalue() == ""
        return None
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hpcml: error: "), err.getvalue()
    return lines[0]


# -- data files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A valid input of every kind of data file."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    with h5py.File(d / "lm.h5", "w") as f:
        f["train/tokens"] = rng.integers(1, 256, 4000).astype(np.uint8)
        f["valid/tokens"] = rng.integers(1, 256, 400).astype(np.uint8)
    with h5py.File(d / "coded.h5", "w") as f:
        f["X"] = np.c_[np.ones(40), rng.standard_normal((40, 3))]  # an intercept column
        f["y"] = rng.standard_normal(40)
    (d / "edges.txt").write_text("0 1\n1 2\n2 0  # a triangle\n")
    (d / "trace.csv").write_text("0.0,0.001,0,0,0\n0.002,0.0,0,0,0.001\n")  # 5 ranks
    return {"lm": d / "lm.h5", "coded": d / "coded.h5", "nmt": generate(d / "nmt.h5", pairs=60,
            max_number=999), "digits": DIGITS, "edges": d / "edges.txt",
            "trace": d / "trace.csv"}


# (job file, --set key of the input, extra --set values, ranks) per kind of input file
USERS = {
    "lm": [("bench-optimizers.toml", "data", ["model.context=16"], 2)],
    "coded": [("coded.toml", "problem.path", ["problem.data=hdf5"], 1),
              ("bench-coded.toml", "problem.path", ["problem.data=hdf5"], 1)],
    "nmt": [("transformer-nmt.toml", "data.path", ["train.batch_size=4"], 2),
            ("bench-reduction.toml", "data.path", ["batch_per_rank=2"], 2)],
    "digits": [("qsparse-sync.toml", "data.path", [], 4),
               ("bench-qsparse.toml", "data.path", [], 2)],
    "edges": [("consensus-mean.toml", "graph.edges", ["graph.kind=file"], 3),
              ("bench-consensus.toml", "graph.edges", ["graphs=[\"file\"]", "ranks=[3]"], 3)],
    "trace": [("qsparse-sync.toml", "stragglers.trace", ["stragglers.kind=trace"], 2),
              ("coded.toml", "stragglers.trace", ["stragglers.kind=trace"], 5)],
}


def check_all_users(kind: str, path: Path, runs: Path, keep: list[Path]) -> list[str | None]:
    """The contract for every job that reads this kind of file; the outcomes."""
    out = []
    for job, key, extra, size in USERS[kind]:
        out.append(contract(str(JOBS / job), [f"{key}={path}", f"runs_dir={runs}", *extra],
                            [path, *keep], size))
        assert not runs.exists()
    return out


@pytest.mark.parametrize("kind", sorted(USERS))
def test_valid_inputs_are_accepted(tmp_path, inputs, kind):
    assert check_all_users(kind, inputs[kind], tmp_path / "runs", []) == \
        [None] * len(USERS[kind])


@FAST
@given(kind=st.sampled_from(sorted(USERS)), cut=st.floats(0, 1, exclude_max=True),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      max_size=3))
def test_truncated_or_flipped_file_never_crashes(tmp_path_factory, inputs, kind, cut, flips):
    """Cut the file short at a random point (or not, when ``flips`` are given) and xor
    random bytes: one line and exit 2, or accepted; never a crash. A truncated file is
    always refused."""
    data = bytearray(inputs[kind].read_bytes())
    if not flips:
        data = data[:int(cut * len(data))]
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    tmp = tmp_path_factory.mktemp("damaged")
    path = tmp / f"damaged{inputs[kind].suffix}"
    path.write_bytes(bytes(data))
    outcomes = check_all_users(kind, path, tmp / "runs", [])
    if not flips and kind not in ("edges", "trace"):  # a text file cut at a line end is valid
        assert None not in outcomes


# what may be stored in a dataset instead of the right data, each wrong for every layout below
def wrong(value: np.ndarray, how: str) -> np.ndarray:
    flat = np.asarray(value, dtype=np.float64)
    return {"nan": np.where(np.arange(flat.size).reshape(flat.shape) == 1, np.nan, flat),
            "inf": np.where(np.arange(flat.size).reshape(flat.shape) == 1, -np.inf, flat),
            "3-D": np.zeros((2, 2, 2)),
            "empty": np.zeros((0,) + flat.shape[1:]),
            "one row": flat[:1],
            "strings": np.array([b"\xff\xfe"] * 3, dtype=object),
            "negative": flat - 1e6}[how]


# (kind, dataset, how) with the words the line must hold; every one is wrong data
EDITS = [("lm", "train/tokens", how, "dataset 'train/tokens'")
         for how in ("nan", "3-D", "empty", "one row", "strings", "negative")] + \
        [("nmt", "vocab", how, "dataset 'vocab'") for how in ("nan", "3-D", "strings")] + \
        [("nmt", "train/src_ids", how, "dataset 'train/src_ids'")
         for how in ("nan", "3-D", "negative")] + \
        [("coded", "X", how, "problem.x_key") for how in ("nan", "inf", "3-D", "empty",
                                                          "one row", "strings")] + \
        [("coded", "y", how, "problem.") for how in ("nan", "inf", "one row")] + \
        [("digits", "train/x", how, "dataset 'train/x'")
         for how in ("nan", "inf", "3-D", "negative", "strings")] + \
        [("digits", "train/y", how, "dataset 'train/y'") for how in ("nan", "one row")]


@pytest.mark.parametrize("kind,dataset,how,words", EDITS)
def test_wrong_dataset_is_one_line_naming_it(tmp_path, inputs, kind, dataset, how, words):
    path = tmp_path / "edited.h5"
    shutil.copy(inputs[kind], path)
    with h5py.File(path, "a") as f:
        value = wrong(f[dataset][...] if f[dataset].dtype.kind in "iuf" else
                      np.arange(f[dataset].shape[0]), how)
        del f[dataset]
        if value.dtype == object:
            f.create_dataset(dataset, data=value, dtype=h5py.string_dtype("ascii"))
        else:
            f[dataset] = value
    for line in check_all_users(kind, path, tmp_path / "runs", []):
        assert line is not None and words in line and str(path) in line, line


@pytest.mark.parametrize("dataset,edit,words", [
    ("subword_model", lambda m: m[:len(m) // 2], "SentencePiece cannot parse as a model"),
    ("test/tgt_text", lambda t: np.r_[t[:3], [b"\xff\xfe"], t[4:]], "sentence 3 = "),
    ("test/tgt_text", lambda t: t[:-1], "expected 500 UTF-8 strings (one per sentence)"),
])
def test_subword_corpus_extras_checked_before_the_run(tmp_path, dataset, edit, words):
    """The subword model and reference texts, read only by the end-of-run BLEU."""
    path = tmp_path / "catalogs.h5"
    shutil.copy(ROOT / "data" / "nmt" / "catalogs-en-fr.h5", path)
    with h5py.File(path, "a") as f:
        value = edit(f[dataset][:])
        del f[dataset]
        f.create_dataset(dataset, data=value, dtype=value.dtype if value.dtype != object
                         else h5py.string_dtype())
    line = contract(str(JOBS / "transformer-nmt-catalogs.toml"),
                    [f"data.path={path}", f"runs_dir={tmp_path / 'runs'}"], [path], 2)
    assert line is not None and f"dataset {dataset!r}" in line and words in line, line


@FAST
@given(text=st.one_of(st.binary(max_size=40), st.text(max_size=40)))
def test_any_edges_or_trace_text_is_refused_or_well_formed(tmp_path_factory, text):
    """Arbitrary bytes or text as an edge list and as a straggler trace: refused with one
    line, or accepted only when it parses as what it must be."""
    tmp = tmp_path_factory.mktemp("text")
    path = tmp / "input.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for kind in ("edges", "trace"):
        for line, (_, key, _, size) in zip(check_all_users(kind, path, tmp / "runs", []),
                                           USERS[kind], strict=True):
            if line is None and kind == "trace":
                table = np.loadtxt(path, delimiter=",", ndmin=2)
                assert np.isfinite(table).all() and table.min() >= 0
                assert table.shape[1] >= size
            elif line is not None:
                assert key in line


@pytest.mark.parametrize("content,words", [
    ("0 1\n1 \u00b2\n", "expected two node ids 'i j', got '1 \u00b2'"),
    (b"0 1\n\xff 2\n", "not a UTF-8 text file (byte 4 is not UTF-8"),
])
def test_edges_not_ascii_digits(tmp_path, content, words):
    path = tmp_path / "edges.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for line in check_all_users("edges", path, tmp_path / "runs", []):
        assert f"graph.edges: {path}" in line and words in line, line


@pytest.mark.parametrize("content,size,words", [
    ("0.1,nan\n0.2,0.1\n", 2, "got nan in row 1, column 2"),
    ("0.1\n0.2\n", 2, "has 1 columns but ranks 0..1 each need one"),
    ("0.1,0.1\n", 1, "has 2 columns but ranks 0..4 each need one"),  # coded: 4 simulated,
])
def test_trace_checked_before_the_first_delay(tmp_path, content, size, words):
    path = tmp_path / "trace.csv"
    path.write_text(content)
    job = "coded.toml" if size == 1 else "qsparse-sync.toml"
    line = contract(str(JOBS / job), ["stragglers.kind=trace", f"stragglers.trace={path}",
                                      f"runs_dir={tmp_path / 'runs'}"], [path], size)
    assert line is not None and "stragglers.trace: " in line and words in line, line


def test_qsparse_needs_an_example_per_worker(tmp_path):
    path = tmp_path / "three.h5"
    with h5py.File(DIGITS) as src, h5py.File(path, "w") as dst:
        for name in ("train/x", "train/y", "test/x", "test/y"):
            dst[name] = src[name][:3]
    sets = [f"data.path={path}", f"runs_dir={tmp_path / 'runs'}"]
    assert contract(str(JOBS / "qsparse-sync.toml"), sets, [path], 3) is None
    line = contract(str(JOBS / "qsparse-sync.toml"), sets, [path], 4)
    assert "expected at least one example for each of the 4 workers, got 3" in line


@pytest.mark.parametrize("x,y,words", [
    (np.ones((30, 3)), np.arange(30.0), "every column of X is constant"),
    (np.arange(60.0).reshape(30, 2), np.full(30, 2.0), "y is constant (2.0)"),
])
def test_coded_data_with_nothing_to_fit(tmp_path, x, y, words):
    path = tmp_path / "flat.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y
    line = contract(str(JOBS / "coded.toml"), ["problem.data=hdf5", f"problem.path={path}",
                                               f"runs_dir={tmp_path / 'runs'}"], [path])
    assert line is not None and words in line, line


# -- files that --resume reads ---------------------------------------------------------------

LSQ = str(JOBS / "slurm-lsq.toml")
LSQ_SETS = ["rows=16", "features=3", "steps=2", "checkpoint_every=1", 'mode="strong"']


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("lsq")
    res = hpcml_cli(1, "run", LSQ, *[a for s in LSQ_SETS for a in ("--set", s)], "--set",
                    f"runs_dir={runs}", cwd=runs)
    assert res.returncode == 0, res.stderr
    (run,) = runs.iterdir()
    return run


@pytest.fixture
def run_copy(tmp_path, lsq_run):
    run = tmp_path / lsq_run.name
    shutil.copytree(lsq_run, run)
    return run


def resume_lsq(run: Path) -> str | None:
    return contract(LSQ, [*LSQ_SETS, f"runs_dir={run.parent / 'runs'}"], [run], resume=run)


def rehash(step_dir: Path, name: str, payload) -> None:
    """Replace a payload file and its manifest digest (a hash-consistent forgery)."""
    torch.save(payload, step_dir / name)
    raw = json.loads((step_dir / "manifest.json").read_text())
    raw["files"][name] = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(raw))


def test_intact_run_resumes(run_copy):
    assert resume_lsq(run_copy) is None


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@FAST
@given(content=st.binary(max_size=30))
def test_any_latest_pointer_is_refused_or_names_the_checkpoint(tmp_path_factory, lsq_run,
                                                               content):
    run = tmp_path_factory.mktemp("latest") / lsq_run.name
    shutil.copytree(lsq_run, run)
    (run / "checkpoint" / "latest").write_bytes(content)
    if resume_lsq(run) is None:
        assert content.strip() == b"step-000000002"


@FAST
@given(field=st.sampled_from(["format", "step", "ranks", "config_hash", "files"]),
       value=JSON | st.sampled_from([1e400, -1, 2**64, "2", True]))  # 1e400: inf in JSON
def test_any_manifest_field_is_refused_unless_unchanged(tmp_path_factory, lsq_run, field,
                                                        value):
    run = tmp_path_factory.mktemp("manifest") / lsq_run.name
    shutil.copytree(lsq_run, run)
    path = checkpoint.latest(run).path / "manifest.json"
    raw = json.loads(path.read_text())
    original = raw[field]
    path.write_text(json.dumps({**raw, field: value}))
    if resume_lsq(run) is None:
        assert value == original and type(value) is type(original)


@FAST
@given(content=JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=30))
def test_any_segments_file_is_refused_or_well_formed(tmp_path_factory, lsq_run, content):
    run = tmp_path_factory.mktemp("segments") / lsq_run.name
    shutil.copytree(lsq_run, run)
    (run / "segments.json").write_bytes(content)
    if resume_lsq(run) is None:
        segments = json.loads(content)
        assert segments and all(s["segment"] == i for i, s in enumerate(segments))


@FAST
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.int64,
                              torch.bool]),
       shape=st.sampled_from([(3,), (4,), (3, 1), ()]),
       drop=st.booleans())
def test_hash_consistent_weights_must_fit(tmp_path_factory, lsq_run, dtype, shape, drop):
    run = tmp_path_factory.mktemp("weights") / lsq_run.name
    shutil.copytree(lsq_run, run)
    step_dir = checkpoint.latest(run).path
    rehash(step_dir, "shared.pt", {} if drop else {"w": torch.zeros(shape, dtype=dtype)})
    line = resume_lsq(run)
    fits = not drop and dtype == torch.float64 and shape == (3,)
    assert (line is None) == fits, line
    if line is not None:
        assert f"{step_dir}: holds weights" in line


NMT = str(JOBS / "transformer-nmt.toml")


@pytest.fixture(scope="module")
def nmt_run(tmp_path_factory, inputs):
    runs = tmp_path_factory.mktemp("nmt")
    sets = nmt_sets(inputs["nmt"], runs)
    res = hpcml_cli(1, "run", NMT, *[a for s in sets for a in ("--set", s)], cwd=runs)
    assert res.returncode == 0, res.stderr
    (run,) = runs.iterdir()
    return run


def nmt_sets(corpus: Path, runs: Path) -> list[str]:
    return ["model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
            "train.batch_size=8", "train.warmup=4", "train.steps=2", "eval.valid_every=1",
            "eval.checkpoint_every=0", "eval.bleu=false", f"data.path={corpus}",
            f"runs_dir={runs}"]


def forged(payload: dict, name: str) -> dict:
    """The NMT checkpoint payload with one hash-consistent defect ``name``."""
    first = next(iter(payload.get("model", {})), None)
    rng = payload.get("rng")
    return {
        "model dtype": lambda: {**payload, "model": {**payload["model"],
                                                     first: payload["model"][first].double()}},
        "no optimizer": lambda: {k: v for k, v in payload.items() if k != "optimizer"},
        "history of text": lambda: {**payload, "history": "step 1"},
        "state of another shape": lambda: {**payload, "optimizer": {
            **payload["optimizer"], "state": {0: {k: v.flatten()[:2] if v.numel() > 1 else v
                                                  for k, v in
                                                  payload["optimizer"]["state"][0].items()}}}},
        "no rng": lambda: {k: v for k, v in payload.items() if k != "rng"},
        "rng of floats": lambda: {**payload, "rng": {**rng, "torch": rng["torch"].float()}},
        "numpy position past its keys": lambda: {**payload, "rng": {**rng, "numpy": {
            **rng["numpy"], "pos": 10**6}}},
    }[name]()


@pytest.mark.parametrize("name,file,words", [
    ("model dtype", "shared.pt", "is torch.float64 of shape"),
    ("no optimizer", "shared.pt", "optimizer is missing"),
    ("history of text", "shared.pt", "history is str"),
    ("state of another shape", "shared.pt", "optimizer state 'exp_avg' has shape (2,)"),
    ("no rng", "rank-00000.pt", "rng is missing"),
    ("rng of floats", "rank-00000.pt", "rng.torch is torch.float32"),
    ("numpy position past its keys", "rank-00000.pt", "numpy RNG state has position 1000000"),
])
def test_nmt_checkpoint_payload_must_fit(tmp_path, inputs, nmt_run, name, file, words):
    run = tmp_path / nmt_run.name
    shutil.copytree(nmt_run, run)
    step_dir = checkpoint.latest(run).path
    rehash(step_dir, file, forged(torch.load(step_dir / file, weights_only=True), name))
    line = contract(NMT, nmt_sets(inputs["nmt"], tmp_path / "runs"), [run], resume=run)
    assert line is not None and f"{step_dir / file}: " in line and words in line, line


def test_forged_payload_through_the_cli_changes_nothing(tmp_path, inputs, nmt_run):
    """The launcher end to end at 2 ranks... of a 1-rank checkpoint is refused for the rank
    count; at 1 rank a forged RNG state is refused before the segment files are written."""
    run = tmp_path / nmt_run.name
    shutil.copytree(nmt_run, run)
    step_dir = checkpoint.latest(run).path
    rehash(step_dir, "rank-00000.pt", forged(torch.load(step_dir / "rank-00000.pt",
                                                        weights_only=True), "rng of floats"))
    before = tree(run)
    sets = nmt_sets(inputs["nmt"], tmp_path / "runs")
    res = hpcml_cli(1, "run", NMT, *[a for s in sets for a in ("--set", s)], "--resume",
                    str(run), cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("hpcml: error: ") and "rng.torch is torch.float32" in lines[0]
    assert tree(run) == before and sorted(p.name for p in tmp_path.iterdir()) == [run.name]
