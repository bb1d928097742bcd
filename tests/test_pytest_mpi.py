"""pytest-mpi's way: ``mpiexec -n 2 python -m pytest --with-mpi -m mpi`` runs an in-process
``mpi_test`` on every rank (only its 2-rank case; the 1- and 4-rank cases are skipped), and a
test not declared in-process is skipped there rather than launching nested mpiexec jobs."""

import re
import sys
from pathlib import Path

from hpcml.testing import launch

ROOT = Path(__file__).resolve().parents[1]


def test_with_mpi_runs_in_process_cases_on_every_rank():
    res = launch(2, [sys.executable, "-m", "pytest", "--with-mpi", "-m", "mpi", "-q", "-rs",
                     "-p", "no:cacheprovider", "tests/test_comm_persistent.py",
                     "tests/test_comm_stragglers.py"], cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summaries = re.findall(r"^(\d+) passed, (\d+) skipped", res.stdout, re.M)
    assert summaries == [("1", "5")] * 2, res.stdout[-4000:]   # one line per rank
    assert "the 1-rank case (this job has 2 ranks)" in res.stdout
    assert "launches its own ranks" in res.stdout
