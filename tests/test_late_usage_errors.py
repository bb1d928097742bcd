"""A usage error raised after validation (inside a job) prints one line, once, and every rank
exits 2: when all ranks raise it, without MPI_Abort; when only one rank does, that rank's line
(with its rank) and an abort, within seconds rather than a hang."""

import sys

from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.testing import launch


def raise_everywhere(comm: Communicator) -> None:
    comm.barrier()
    raise UsageError("train.thing: late problem (fix it)")


def raise_on_rank_2(comm: Communicator) -> None:
    if comm.rank == 2:
        raise UsageError("train.thing: rank-local problem")
    comm.barrier()


def run(name: str):
    return launch(4, [sys.executable, "-m", "hpcml.testing", __file__, name], timeout=90)


def test_all_ranks_print_once_and_exit_2_without_abort():
    res = run("raise_everywhere")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == ["hpcml: error: train.thing: late problem (fix it)"]
    assert "Abort" not in res.stdout + res.stderr
    assert "BAD TERMINATION" not in res.stdout + res.stderr


def test_one_rank_prints_its_line_once_and_aborts():
    res = run("raise_on_rank_2")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("hpcml:")]
    assert lines == ["hpcml: error (rank 2): train.thing: rank-local problem"], res.stderr
