"""Session fixture: a private single-node Slurm for the tests, or one skip line saying why not.

``slurm_cluster`` starts munged + slurmctld + slurmd under a temporary directory with
:mod:`hpcml.slurm.local_cluster` (installing Debian's slurm-wlm and munge first when missing and
running as root), points ``SLURM_CONF`` at it for the session and stops the daemons afterwards.
Without root, packages or a working daemon, every test that uses it is skipped with the same
one-line reason (pytest groups them in its summary).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcml.slurm import local_cluster

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("slurm")
    try:
        env = local_cluster.up(root)
    except local_cluster.ClusterUnavailable as exc:
        pytest.skip(f"Slurm tests skipped: {exc}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    try:
        yield root
    finally:
        local_cluster.down(root)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def states(job_id: str) -> list[str]:
    """Slurm states of a job (one per array task)."""
    res = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%T"],
                         capture_output=True, text=True, check=True)
    return res.stdout.split()


def wait_for(job_id: str, timeout: float = 150) -> list[str]:
    """Block until every task of ``job_id`` is in a terminal state; returns the states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = states(job_id)
        if now and all(s in TERMINAL for s in now):
            return now
        time.sleep(0.5)
    raise TimeoutError(f"Slurm job {job_id} not finished after {timeout}s: {states(job_id)}")
