"""pytest-mpi's way: ``mpiexec -n 2 python -m pytest --with-mpi -m mpi`` runs an in-process
``mpi_test`` on every rank (only its 2-rank case; the 1- and 4-rank cases are skipped), and a
test not declared in-process is skipped there rather than launching nested mpiexec jobs. Under
plain pytest the in-process cases run batched, and a failing body still fails on its own."""

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


BATCH_PROBE = '''
from hpcml.testing import mpi_test


@mpi_test(ranks=[1], in_process=True)
def test_first(comm):
    comm.allreduce(1)


@mpi_test(ranks=[1], in_process=True)
def test_second_sees_a_fresh_ledger(comm):
    assert comm.ledger.totals() == {}


@mpi_test(ranks=[1], in_process=True)
def test_third_fails(comm):
    assert comm.allreduce(1) == 2, "fails on purpose"


@mpi_test(ranks=[1], in_process=True)
def test_fourth(comm):
    assert comm.allreduce(1) == 1
'''


def test_batch_reports_a_failing_body_alone_and_relaunches_the_rest(tmp_path):
    """Plain pytest runs the in-process cases in one batch: the two bodies before a failing one
    pass there (the second sees the ledger reset), the failing one still fails (relaunched on
    its own, with its own message), the one after it passes on its own, and a warning says the
    batch passed 2 of 4. 1 rank: no mpiexec."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(BATCH_PROBE)
    res = launch(1, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfw",
                     "test_probe.py"], cwd=tmp_path, timeout=120)
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-4000:]
    assert re.search(r"^1 failed, 3 passed, 1 warning", res.stdout, re.M), res.stdout[-4000:]
    assert "FAILED test_probe.py::test_third_fails[1]" in res.stdout
    assert "fails on purpose" in res.stdout
    assert "the 1-rank batch of in-process tests passed 2 of 4" in res.stdout, res.stdout[-4000:]
