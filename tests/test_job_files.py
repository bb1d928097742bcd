"""Every shipped job file validates against its kind's schema (so `hpcml run jobs/X.toml` never
fails on the file itself), and every Slurm submission file loads with its sweep/scaling points."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from hpcml.config import load_job_file, read_toml
from hpcml.jobs import KINDS, job_kind
from hpcml.slurm import spec

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))
RUN_FILES = [p for p in JOBS if "kind" in read_toml(p)]
SUBMIT_FILES = [p for p in JOBS if "kind" not in read_toml(p)]


def test_every_file_is_a_job_or_a_submission():
    assert RUN_FILES and SUBMIT_FILES
    assert all("job" in read_toml(p) for p in SUBMIT_FILES)


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_job_file_validates(path):
    data = read_toml(path)
    assert data["kind"] in KINDS
    size = 5 if data["kind"] in ("coded", "bench-coded") else 4
    job = job_kind(data["kind"])
    config = load_job_file(job.config, data, str(path), size)
    if job.validate_data is not None:  # the shipped data passes the pre-run checks on each rank
        for rank in range(size):
            job.validate_data(config, SimpleNamespace(rank=rank, size=size))


@pytest.mark.parametrize("path", SUBMIT_FILES, ids=lambda p: p.name)
def test_submission_file_loads(path):
    assert spec.load(path) is not None
