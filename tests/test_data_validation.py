"""Input data is checked before the run directory exists: every damaged file gives one line
naming the file and the dataset, exit 2, printed once at any rank count, and no run directory.
The checks themselves are run in-process on each kind of damage; a few representative inputs go
through ``hpcml run`` at 1 and 4 ranks."""

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcml.errors import UsageError
from hpcml.nmt.corpus import generate
from hpcml.nmt.data import validate_corpus
from hpcml.qsparse.data import validate_digits
from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]
NMT_JOB = str(ROOT / "jobs" / "transformer-nmt.toml")
QSPARSE_JOB = str(ROOT / "jobs" / "qsparse-sync.toml")
DIGITS = ROOT / "data" / "qsparse" / "digits.h5"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus") / "c.h5", pairs=60, max_number=999)


def damaged(src: Path, dst: Path, edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        edit(f)
    return dst


def truncated(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    os.truncate(dst, src.stat().st_size // 2)
    return dst


def replace(name, data):
    def edit(f):
        del f[name]
        f[name] = data
    return edit


def one_line(exc: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text


def test_good_corpus_passes_and_reports_split_sizes(corpus):
    assert validate_corpus(corpus, 0, 1) == {"train": 54, "valid": 3, "test": 3}


@pytest.mark.parametrize("case,dataset,expected", [
    ("truncated", None, "not a readable HDF5 file"),
    ("float ids", "train/src_ids", "expected integers, got float64"),
    ("2-D ids", "valid/tgt_ids", "got shape (3, 4)"),
    ("no vocab", "vocab", "got nothing"),
    ("vocab of ints", "vocab", "UTF-8 strings"),
    ("vocab without specials", "vocab", "<pad>, <bos>, <eos>, <unk> first"),
    ("offsets past the ids", "test/src_offsets", "offsets from 0 to len(test/src_ids)"),
    ("decreasing offsets", "train/tgt_offsets", "non-decreasing offsets"),
    ("sentence counts differ", "train/tgt_offsets", "sentences like train/src_offsets"),
])
def test_damaged_corpus_one_line_naming_file_and_dataset(tmp_path, corpus, case, dataset,
                                                         expected):
    with h5py.File(corpus) as f:
        n_ids = f["train/tgt_ids"].shape[0]
        offsets = f["train/tgt_offsets"][:]
    bad = tmp_path / "bad.h5"
    edits = {
        "float ids": replace("train/src_ids", np.zeros(10)),
        "2-D ids": replace("valid/tgt_ids", np.zeros((3, 4), dtype=np.int32)),
        "no vocab": lambda f: f.__delitem__("vocab"),
        "vocab of ints": replace("vocab", np.arange(5)),
        "vocab without specials": replace("vocab", np.array(["a", "b", "c", "d", "e"],
                                                            dtype=object)),
        "offsets past the ids": replace("test/src_offsets", np.array([0, 1, 10**6])),
        "decreasing offsets": replace("train/tgt_offsets", np.concatenate(
            [offsets[:5], offsets[2:3], offsets[6:]])[:len(offsets)]),
        "sentence counts differ": replace("train/tgt_offsets", np.array([0, n_ids])),
    }
    path = truncated(corpus, bad) if case == "truncated" else damaged(corpus, bad, edits[case])
    with pytest.raises(UsageError) as exc:
        validate_corpus(path, 0, 1)
    one_line(exc, f"data.path: {path}", expected, *([f"dataset {dataset!r}"] if dataset else []))


def test_each_rank_checks_its_block_of_ids(tmp_path, corpus):
    """An out-of-vocabulary id is found by exactly the rank whose block holds it, so 4 ranks
    together check every id once (the launcher combines their outcomes)."""
    with h5py.File(corpus) as f:
        ids = f["train/src_ids"][:]
    position = int(len(ids) * 0.6)
    ids[position] = 10_000
    path = damaged(corpus, tmp_path / "oov.h5", replace("train/src_ids", ids))
    failing = []
    for rank in range(4):
        try:
            validate_corpus(path, rank, 4)
        except UsageError as exc:
            failing.append(rank)
            assert "dataset 'train/src_ids': expected ids in [0, " in str(exc)
    assert failing == [2]  # chunk_bounds: position 60 % lies in the third quarter


@pytest.mark.parametrize("case,expected", [
    ("missing", "not found"),
    ("truncated", "cannot read"),
    ("wrong width", "dataset 'train/x': expected numeric array of shape (n, 64) in [0, 16], "
                    "got shape (1437, 32)"),
    ("label out of range", "dataset 'test/y': expected integer array of shape (n,) in [0, 9], "
                           "got values in [0, 11]"),
    ("float labels", "dataset 'train/y': expected integer array of shape (n,) in [0, 9], got "
                     "dtype float64"),
    ("labels for other images", "dataset 'test/y'"),
])
def test_damaged_digits_one_line(tmp_path, case, expected):
    bad = tmp_path / "bad.h5"
    if case == "missing":
        path = bad
    elif case == "truncated":
        path = truncated(DIGITS, bad)
    else:
        path = damaged(DIGITS, bad, {
            "wrong width": replace("train/x", np.zeros((1437, 32), dtype=np.uint8)),
            "label out of range": replace("test/y", np.r_[np.zeros(359), 11].astype(np.uint8)),
            "float labels": replace("train/y", np.zeros(1437)),
            "labels for other images": replace("test/y", np.zeros(7, dtype=np.uint8)),
        }[case])
    with pytest.raises(UsageError) as exc:
        validate_digits(path)
    one_line(exc, "data.path:", str(path), expected)


def test_shipped_digits_pass():
    validate_digits(DIGITS)


@pytest.mark.parametrize("nranks,job,inputs,expected", [
    (4, NMT_JOB, "truncated", "not a readable HDF5 file"),
    (1, NMT_JOB, "digits", "dataset 'vocab': expected 1-D UTF-8 strings"),
    (4, QSPARSE_JOB, "wrong width", "dataset 'train/x': expected numeric array"),
    (1, QSPARSE_JOB, "nope.h5", "'nope.h5' not found"),
])
def test_bad_data_through_the_cli_prints_once_and_leaves_no_run_dir(tmp_path, corpus, nranks,
                                                                    job, inputs, expected):
    path = {"truncated": lambda: truncated(corpus, tmp_path / "t.h5"),
            "digits": lambda: DIGITS,
            "wrong width": lambda: damaged(DIGITS, tmp_path / "w.h5", replace(
                "train/x", np.zeros((1437, 32), dtype=np.uint8))),
            "nope.h5": lambda: "nope.h5"}[inputs]()
    res = hpcml_cli(nranks, "run", job, "--set", f"data.path={path}", "--set",
                    f"runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcml: error: data.path: "), res.stderr
    assert expected in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("nranks,what,expected", [
    (4, "junk", "not a UTF-8 text file"),
    (1, "directory", "is a directory"),
])
def test_job_file_not_toml_text_one_line(tmp_path, nranks, what, expected):
    path = tmp_path / "job.toml"
    if what == "junk":
        path.write_bytes(bytes(range(256)))
    else:
        path.mkdir()
    res = hpcml_cli(nranks, "run", str(path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], res.stderr
