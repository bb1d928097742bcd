"""A private single-node Slurm cluster (munged + slurmctld + slurmd) in a temporary directory.

Used by the test suite and by anyone who wants to try the templates on a laptop or CI runner:

    python -m hpcml.slurm.local_cluster up /tmp/hpcml-slurm     # prints `export SLURM_CONF=...`
    python -m hpcml.slurm.local_cluster down /tmp/hpcml-slurm

``up`` (needs root) installs Debian's ``slurm-wlm`` and ``munge`` with apt when ``slurmctld`` is
missing, writes a munge key and a ``slurm.conf`` whose state, spool, logs, pid files and munge
socket all live under DIR, picks a free private port pair (so it never collides with a site
Slurm or another test run), starts the three daemons and waits until ``sinfo`` reports the node
idle. Every client command must see ``SLURM_CONF=DIR/slurm.conf``. ``down`` stops the daemons
by the pids recorded in DIR (never by name).

Configuration choices (Slurm 22.05 as packaged by Debian 12): ``ProctrackType=proctrack/linuxproc``
and ``TaskPlugin=task/none`` (no cgroups needed), ``SelectType=select/cons_tres`` with
``CR_CPU``, one node with ``CPUs`` = ``nproc`` and one default partition ``debug``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PARTITION = "debug"
NODE = "hpcml-node"


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be brought up here; the message says why in one line."""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, ports: tuple[int, int], cpus: int, host: str) -> str:
    """The text of a single-node ``slurm.conf`` rooted at ``root`` (pure function)."""
    munge_socket = root / "munge" / "munge.socket"
    return "\n".join([
        "ClusterName=hpcml-local",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long Slurm holds a requeued job before restarting it (an
        # earlier start fails with "Job credential revoked"); 10 s instead of 120 s keeps the
        # preemption/requeue round trip short on a test node.
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "EnforcePartLimits=ALL",
        "MinJobAge=3600",
        "KillWait=5",
        "SchedulerParameters=sched_interval=2",
        f"NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _install_packages() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and installing it needs root "
                                 "(apt-get install slurm-wlm munge)")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm",
                 "munge"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {last}")


def env_for(root: Path) -> dict[str, str]:
    """The environment client commands (sbatch, srun, sinfo) need for this cluster."""
    return {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}


def _wait_idle(root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env_for(root),
                             capture_output=True, text=True)
        out = (res.stdout + res.stderr).strip()
        if res.returncode == 0 and out in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.5)
    log = (root / "log" / "slurmd.log")
    tail = log.read_text().splitlines()[-3:] if log.exists() else []
    raise ClusterUnavailable(f"node not idle after {timeout:.0f}s (sinfo: {out!r}; "
                             f"slurmd.log: {' | '.join(tail)})")


def up(root: str | Path, timeout: float = 60) -> dict[str, str]:
    """Start the cluster under ``root`` (created); returns the client environment.

    Raises ``ClusterUnavailable`` (one line) when not root or the packages cannot be had."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting munged/slurmctld/slurmd needs root (CI runs the "
                                 "tests as root)")
    _install_packages()
    root = Path(root).resolve()
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    ports = tuple(_free_ports(2))
    cpus = os.cpu_count() or 1
    (root / "slurm.conf").write_text(slurm_conf(root, ports, cpus, socket.gethostname()))
    munge = root / "munge"
    commands = [
        ["munged", "-f", f"--socket={munge}/munge.socket", f"--key-file={key}",
         f"--pid-file={munge}/munged.pid", f"--log-file={root}/log/munged.log",
         f"--seed-file={munge}/munged.seed"],
        ["slurmctld", "-i", "-f", str(root / "slurm.conf")],
        ["slurmd", "-N", NODE, "-f", str(root / "slurm.conf")],
    ]
    for cmd in commands:
        res = subprocess.run(cmd, env=env_for(root), capture_output=True, text=True)
        if res.returncode != 0:
            down(root)
            raise ClusterUnavailable(f"{cmd[0]} failed to start: "
                                     f"{(res.stderr or res.stdout).strip()[:300]}")
    try:
        _wait_idle(root, timeout)
    except ClusterUnavailable:
        down(root)
        raise
    return env_for(root)


def _pid_files(root: Path) -> list[Path]:
    return [root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid"]


def down(root: str | Path, timeout: float = 15) -> None:
    """Stop the daemons started by :func:`up` under ``root`` (by their recorded pids)."""
    root = Path(root).resolve()
    for pid_file in _pid_files(root):
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m hpcml.slurm.local_cluster up|down DIR", file=sys.stderr)
        return 2
    if argv[0] == "down":
        down(argv[1])
        return 0
    try:
        env = up(argv[1])
    except ClusterUnavailable as exc:
        print(f"hpcml: cannot start a local Slurm: {exc}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={env['SLURM_CONF']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
