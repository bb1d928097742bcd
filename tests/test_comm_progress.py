"""How MPI waits (hpcml.comm.progress): MPICH's progress throttle is on exactly when the launcher
puts more ranks on the node than it has cores, a user's own setting always wins, and the
decision reaches MPI (it is in the environment MPI_Init reads) and every run's env.json."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcml.comm.progress import THROTTLE, configure, local_ranks
from hpcml.testing import launch


@given(ranks=st.integers(1, 64), cores=st.integers(1, 64),
       user=st.none() | st.sampled_from(["0", "1"]),
       launcher=st.sampled_from(["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"]))
def test_throttle_iff_oversubscribed_and_user_wins(ranks, cores, user, launcher):
    env = {launcher: str(ranks), "SLURM_CPUS_ON_NODE": str(cores)}
    if user is not None:
        env[THROTTLE] = user
    decision = configure(env)
    expected = user if user is not None else ("1" if ranks > cores else None)
    assert env.get(THROTTLE) == expected
    assert decision == {"local_ranks": ranks, "cores": cores, "oversubscribed": ranks > cores,
                        "progress_throttle": expected,
                        "set_by": "user" if user is not None else
                        ("hpcml" if ranks > cores else None)}


def test_without_a_launcher_nothing_is_set():
    env = {"SLURM_CPUS_ON_NODE": "1"}
    assert configure(env)["oversubscribed"] is False
    assert THROTTLE not in env


@pytest.mark.parametrize(("value", "expected"), [("4(x2),3", 4), ("2", 2), ("1,6(x3)", 6)])
def test_slurm_tasks_per_node(value, expected):
    assert local_ranks({"SLURM_STEP_TASKS_PER_NODE": value}) == expected


_PROBE = """
import json, os, sys
from hpcml.comm import world
from hpcml.runtime import environment
comm = world()
env = environment(comm)
if comm.rank == 0:
    print(json.dumps({"seen": os.environ.get("MPIR_CVAR_CH4_PROGRESS_THROTTLE"),
                      "recorded": env["mpi_progress"]}))
"""


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_real_launch_on_one_core(ranks, tmp_path):
    """Ranks pinned to one core by taskset: more than one rank is oversubscribed, and the run
    records it; a single rank is not."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    proc = launch(ranks, ["taskset", "-c", "0", sys.executable, str(script)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    oversubscribed = ranks > 1
    assert out["seen"] == ("1" if oversubscribed else None)
    assert out["recorded"]["oversubscribed"] is oversubscribed
    assert out["recorded"]["cores"] == 1
    assert out["recorded"]["local_ranks"] == (ranks if ranks > 1 else None)
