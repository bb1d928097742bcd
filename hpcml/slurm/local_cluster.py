"""A private Slurm cluster (munged + slurmctld + slurmd) in a temporary directory: one node, or
up to four namespaced nodes on this machine with shaped links.

Used by the test suite and by anyone who wants to try the templates on a laptop or CI runner:

    python -m hpcml.slurm.local_cluster up /tmp/hpcml-slurm     # prints `export SLURM_CONF=...`
    python -m hpcml.slurm.local_cluster up /tmp/c2 --nodes 2 --link-rate 1gbit
    python -m hpcml.slurm.local_cluster down /tmp/hpcml-slurm

With ``--nodes N`` every node is a network namespace with its own address on a private bridge,
its own hostname (``node1``..``nodeN``) and its own ``slurmd``; ``--link-rate`` shapes each
node's link with ``tbf`` (see :mod:`hpcml.slurm.netns`); slurmctld listens on the bridge.
``DIR/node-exec`` is an ssh stand-in for Hydra (``mpiexec -launcher ssh -launcher-exec
DIR/node-exec -hosts node1,node2``). ``down`` ends every process of the cluster (daemons, and
job steps and ranks still running, see :mod:`hpcml.slurm.reaper`) and removes what ``up``
made, by the records in DIR.

``up`` (needs root) installs Debian's ``slurm-wlm`` and ``munge`` with apt when ``slurmctld`` is
missing, writes a munge key and a ``slurm.conf`` whose state, spool, logs, pid files and munge
socket all live under DIR, picks a free private port pair (so it never collides with a site
Slurm or another test run), starts the three daemons and waits until ``sinfo`` reports the node
idle. Every client command must see ``SLURM_CONF=DIR/slurm.conf``.

Configuration choices (Slurm 22.05 as packaged by Debian 12): ``ProctrackType=proctrack/linuxproc``
and ``TaskPlugin=task/none`` (no cgroups needed), ``SelectType=select/cons_tres`` with
``CR_CPU``, one node with ``CPUs`` = ``nproc`` and one default partition ``debug``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from hpcml.slurm import netns, reaper

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


def slurm_conf(root: Path, ports: tuple[int, int], cpus: int, host: str,
               nodes: list[tuple[str, str, str]] | None = None,
               controller_addr: str = "127.0.0.1") -> str:
    """The text of a ``slurm.conf`` rooted at ``root`` (pure function). ``nodes`` lists
    (name, hostname, address) per node; by default the single node ``hpcml-node`` on ``host``
    at 127.0.0.1. Several nodes get one pid file and one log per node (``%n``)."""
    munge_socket = root / "munge" / "munge.socket"
    nodes = nodes or [(NODE, host, "127.0.0.1")]
    per_node = "" if len(nodes) == 1 else ".%n"
    return "\n".join([
        "ClusterName=hpcml-local",
        f"SlurmctldHost={host}({controller_addr})",
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
        f"SlurmdPidFile={root}/slurmd{per_node}.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd{per_node}.log",
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
        *(f"NodeName={name} NodeHostname={hostname} NodeAddr={addr} CPUs={cpus} State=UNKNOWN"
          for name, hostname, addr in nodes),
        f"PartitionName={PARTITION} Nodes={','.join(n[0] for n in nodes)} Default=YES "
        "MaxTime=INFINITE State=UP",
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


def wait_idle(root: Path, timeout: float, count: int = 1) -> None:
    """Block until sinfo shows ``count`` nodes, each idle, mixed or allocated; raises
    ``ClusterUnavailable`` (one line, with the tail of a slurmd log) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env_for(root),
                             capture_output=True, text=True)
        out = (res.stdout + res.stderr).strip()
        node_states = out.split()
        if res.returncode == 0 and len(node_states) == count and all(
                state in ("idle", "mixed", "allocated") for state in node_states):
            return
        time.sleep(0.5)
    logs = sorted((root / "log").glob("slurmd*.log"))
    tail = logs[-1].read_text().splitlines()[-3:] if logs else []
    raise ClusterUnavailable(f"nodes not idle after {timeout:.0f}s (sinfo: {out!r}; "
                             f"slurmd.log: {' | '.join(tail)})")


def up(root: str | Path, timeout: float = 60, nodes: int | None = None,
       link_rate: str | None = None) -> dict[str, str]:
    """Start the cluster under ``root`` (created); returns the client environment.

    Without ``nodes``: one node ``hpcml-node`` on this host. With ``nodes`` = N (1..4): N
    namespaced nodes ``node1``..``nodeN`` (see :mod:`hpcml.slurm.netns`), each running its own
    ``slurmd`` under its own hostname, links shaped to ``link_rate`` (``1gbit``, ``500mbit``)
    when given; slurmctld listens on the cluster bridge. Raises ``ClusterUnavailable`` (one
    line) when not root or the packages, namespaces or daemons cannot be had; whatever was
    started by then is stopped and removed again."""
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
    host = socket.gethostname()
    munge = root / "munge"
    daemons = [
        ["munged", "-f", f"--socket={munge}/munge.socket", f"--key-file={key}",
         f"--pid-file={munge}/munged.pid", f"--log-file={root}/log/munged.log",
         f"--seed-file={munge}/munged.seed"],
        ["slurmctld", "-i", "-f", str(root / "slurm.conf")],
    ]
    try:
        if nodes is None:
            (root / "slurm.conf").write_text(slurm_conf(root, ports, cpus, host))
            daemons.append(["slurmd", "-N", NODE, "-f", str(root / "slurm.conf")])
            _start(root, daemons)
        else:
            tools = ["ip", "nsenter", "unshare", "mount", "hostname"] + ["tc"] * bool(link_rate)
            missing = [t for t in tools if not shutil.which(t)]
            if missing:
                raise ClusterUnavailable(f"namespaced nodes need {', '.join(missing)} "
                                         "(apt-get install iproute2 util-linux)")
            try:
                rec = netns.setup(root / RECORDS, nodes, link_rate)
            except (netns.NetnsError, ValueError) as exc:
                raise ClusterUnavailable(str(exc)) from None
            table = [(n.hostname, n.hostname, n.address) for n in rec.nodes]
            (root / "slurm.conf").write_text(
                slurm_conf(root, ports, cpus, host, table, rec.gateway))
            _start(root, daemons)
            _start_nodes(root, rec)
        wait_idle(root, timeout, nodes or 1)
    except ClusterUnavailable:
        down(root)
        raise
    return env_for(root)


RECORDS = "netns.json"


def _start(root: Path, commands: list[list[str]]) -> None:
    for cmd in commands:
        res = subprocess.run(cmd, env=env_for(root), capture_output=True, text=True)
        if res.returncode != 0:
            raise ClusterUnavailable(f"{cmd[0]} failed to start: "
                                     f"{(res.stderr or res.stdout).strip()[:300]}")


def _start_nodes(root: Path, rec: netns.Records) -> None:
    """One foreground ``slurmd`` per node in the node's namespaces; pids go to DIR/nodes/."""
    (root / "nodes").mkdir(exist_ok=True)
    for node in rec.nodes:
        cmd = [*netns.in_node(node), "slurmd", "-D", "-N", node.hostname,
               "-f", str(root / "slurm.conf")]
        with open(root / "log" / f"slurmd-console.{node.hostname}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env_for(root), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        (root / "nodes" / f"{node.hostname}.pid").write_text(f"{proc.pid}\n")
    launcher = root / "node-exec"
    launcher.write_text(NODE_EXEC.replace("DIR", shlex.quote(str(root / "nodes"))))
    launcher.chmod(0o755)


# Hydra's ssh-less launcher: `mpiexec -launcher ssh -launcher-exec DIR/node-exec -hosts
# node1,node2 ...` runs each proxy inside its node (the namespaces of the node's slurmd).
NODE_EXEC = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done  # the ssh options Hydra passes (-x)
host=$1; shift
exec nsenter -t "$(cat DIR/"$host".pid)" -n -u -m -- sh -c "$*"
"""


def node_pid(root: str | Path, hostname: str) -> int:
    """Pid of the slurmd of node ``hostname`` (in the node's network and UTS namespaces)."""
    return int((Path(root).resolve() / "nodes" / f"{hostname}.pid").read_text())


def down(root: str | Path, timeout: float = 15) -> list[str]:
    """Stop everything :func:`up` started under ``root`` and remove what it made, by its
    records in ``root``: the daemons, every process of the cluster's jobs still running
    (slurmstepd, ranks, proxies; see :mod:`hpcml.slurm.reaper`), and with several nodes the
    namespaces, links and hosts files. Returns what could not be removed (empty: all gone)."""
    root = Path(root).resolve()
    rec = netns.Records.load(root / RECORDS)
    namespaces = rec.namespaces if rec else []
    left = [f"process {pid}" for pid in reaper.end_all(root / "slurm.conf", namespaces, timeout)]
    return left + netns.teardown(root / RECORDS)


USAGE = ("usage: python -m hpcml.slurm.local_cluster up DIR [--nodes N] [--link-rate RATE] | "
         "down DIR")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, nothing written
        self.exit(2, f"hpcml: {message} ({USAGE})\n")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m hpcml.slurm.local_cluster", usage=USAGE)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("dir")
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--link-rate", default=None)
    args = parser.parse_args(argv)
    if args.nodes is not None and not 1 <= args.nodes <= netns.MAX_NODES:
        parser.error(f"--nodes {args.nodes}: use 1 to {netns.MAX_NODES}")
    if args.link_rate is not None:
        if args.nodes is None:
            parser.error("--link-rate needs --nodes (the single node has no link to shape)")
        try:
            netns.rate_bits(args.link_rate)
        except ValueError as exc:
            parser.error(f"--link-rate: {exc}")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.action == "down":
        left = down(args.dir)
        for thing in left:
            print(f"hpcml: left behind: {thing}", file=sys.stderr)
        return 1 if left else 0
    try:
        env = up(args.dir, nodes=args.nodes, link_rate=args.link_rate)
    except ClusterUnavailable as exc:
        print(f"hpcml: cannot start a local Slurm: {exc}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={env['SLURM_CONF']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
