"""How MPI waits (hpcml.comm.progress): MPICH's progress throttle is on, and Request.wait tests
with short sleeps instead of spinning in MPI_Wait, exactly when the launcher puts more ranks on
the node than it has cores; a user's own setting always wins (a bad HPCML_WAIT_POLL is one line,
exit 2); the decision reaches MPI (it is in the environment MPI_Init reads) and every run's
env.json, and a rank waiting in poll mode gives its core away."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcml.comm.progress import POLL_SECONDS, THROTTLE, WAIT_POLL, configure, local_ranks
from hpcml.testing import hpcml_cli, launch


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
                        ("hpcml" if ranks > cores else None),
                        "wait_poll_s": POLL_SECONDS if ranks > cores else 0.0}


@given(poll=st.floats(0, 1), oversubscribed=st.booleans())
def test_a_users_wait_poll_wins(poll, oversubscribed):
    env = {"MPI_LOCALNRANKS": "4" if oversubscribed else "1", "SLURM_CPUS_ON_NODE": "2",
           WAIT_POLL: repr(poll)}
    assert configure(env)["wait_poll_s"] == poll


@pytest.mark.parametrize("value", ["-1", "abc", "inf", "nan"])
def test_a_bad_wait_poll_is_one_line_and_exit_2(value):
    assert "wait_poll_error" in configure({WAIT_POLL: value})
    proc = hpcml_cli(1, "info", env={WAIT_POLL: value})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"hpcml: error: {WAIT_POLL}={value!r}: expected seconds >= 0 between tests of a "
        "pending request (0: MPI_Wait); unset it for hpcml's choice"]


def test_without_a_launcher_nothing_is_set():
    env = {"SLURM_CPUS_ON_NODE": "1"}
    assert configure(env)["oversubscribed"] is False
    assert THROTTLE not in env


@pytest.mark.parametrize(("value", "expected"), [("4(x2),3", 4), ("2", 2), ("1,6(x3)", 6)])
def test_slurm_tasks_per_node(value, expected):
    assert local_ranks({"SLURM_STEP_TASKS_PER_NODE": value}) == expected


_PROBE = """
import json, os, sys, time
import numpy as np
from hpcml.comm import world
from hpcml.runtime import environment
comm = world()
env = environment(comm)
cpu = None
if comm.size > 1:  # rank 1 waits ~1 s for rank 0's message: CPU it burns meanwhile
    buf = np.zeros(1)
    if comm.rank == 0:
        time.sleep(1.0)
        comm.Send(buf, dest=1)
    elif comm.rank == 1:
        request = comm.Irecv(buf, source=0)
        start = time.process_time()
        request.wait()
        cpu = time.process_time() - start
cpu = comm.allgather(cpu)
if comm.rank == 0:
    print(json.dumps({"seen": os.environ.get("MPIR_CVAR_CH4_PROGRESS_THROTTLE"),
                      "recorded": env["mpi_progress"], "cpu": cpu[1] if comm.size > 1 else None}))
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
    assert out["recorded"]["wait_poll_s"] == (POLL_SECONDS if oversubscribed else 0.0)
    if oversubscribed:  # it slept between tests: far less than the second it waited
        assert out["cpu"] < 0.5, out
