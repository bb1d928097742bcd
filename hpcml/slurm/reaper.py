"""Find and end every process a local cluster started, from its own records (no cgroups).

A process belongs to the cluster rooted at DIR when its pid is recorded there (daemon pid files),
when it runs in one of the cluster's recorded network namespaces, or when its environment (as
it was exec'ed: ``/proc/PID/environ``) carries ``SLURM_CONF=DIR/slurm.conf`` and it is a Slurm
job process (``SLURM_JOB_ID`` set: batch shells, job steps, ranks, Hydra proxies) or one of
the cluster's daemons or step daemons. The calling process and its ancestors are never chosen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

DAEMONS = {"slurmstepd", "slurmd", "slurmctld", "munged"}


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.partition(b"=")[::2] for item in raw.split(b"\0") if item)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _net_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def ancestors() -> set[int]:
    """This process and every process above it."""
    out, pid = set(), os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def cluster_pids(conf: Path, namespaces: Iterable[str] = ()) -> set[int]:
    """Pids of live processes that belong to the cluster whose ``slurm.conf`` is ``conf``."""
    want = f"{conf}".encode()
    ns_inodes = {i for i in (_net_inode(f"/run/netns/{ns}") for ns in namespaces) if i}
    mine = ancestors()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        pid = int(entry)
        if ns_inodes and _net_inode(f"/proc/{pid}/ns/net") in ns_inodes:
            found.add(pid)
            continue
        env = _environ(pid)
        if env.get(b"SLURM_CONF") == want and (b"SLURM_JOB_ID" in env or _comm(pid) in DAEMONS):
            found.add(pid)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def end(pids: Iterable[int], timeout: float) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever still lives after ``timeout`` seconds."""
    pids = set(pids) - ancestors()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5  # SIGKILL cannot be ignored; exiting takes a moment
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)


def end_all(conf: Path, namespaces: Iterable[str], timeout: float) -> list[int]:
    """End every process of the cluster (see :func:`cluster_pids`), again while new ones
    appear (a step daemon starting a task meanwhile), at most 3 rounds; returns the pids
    still alive after that (empty: all gone)."""
    for _ in range(3):
        pids = cluster_pids(conf, namespaces)
        if not pids:
            return []
        end(pids, timeout)
    return sorted(p for p in cluster_pids(conf, namespaces) if alive(p))
