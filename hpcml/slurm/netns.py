"""Namespaced "nodes" on one machine: a private bridge, one network namespace per node joined to
it by a veth pair, optional token-bucket shaping of each node's link, and a record of all of it.

Everything created is first written to a :class:`Records` file (``DIR/netns.json``) and removed
by :func:`teardown` from that file alone, never by matching names. Names carry a random tag, so
two clusters (or a cluster and anything else on the machine) never share one. Needs root and
``ip`` / ``tc`` (iproute2).

Layout for tag ``t`` and node ``k`` (1-based): bridge ``hpt<t>b`` holding ``10.X.Y.1/24``;
namespace ``hpcml-<t>-node<k>``; host end of the veth ``hpt<t>h<k>``, node end renamed ``eth0``
with ``10.X.Y.(10+k)/24``; hostname ``node<k>`` (set by whoever starts processes in the node's
own UTS namespace) resolved through ``/etc/netns/<namespace>/hosts``, which ``ip netns exec``
binds over ``/etc/hosts`` inside the node. With a link rate, ``tbf`` shapes both directions of
each node's link (the host end's egress is the node's ingress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")
MAX_NODES = 4


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be made; the message says which command failed."""


def rate_bits(rate: str) -> float:
    """Bits per second of a ``tc`` rate like ``1gbit``, ``500mbit`` (pure; ValueError if not)."""
    match = RATE.match(rate.strip().lower())
    if not match:
        raise ValueError(f"link rate {rate!r} is not like 1gbit, 500mbit or 100kbit")
    scale = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]
    return float(match.group(1)) * scale


def run(*cmd: str) -> None:
    """Run one iproute2 command; NetnsError names it with its stderr when it fails."""
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if res.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()[:200]}")


@dataclasses.dataclass
class Node:
    """One namespaced node (pure data)."""
    index: int
    hostname: str
    namespace: str
    address: str
    host_veth: str


@dataclasses.dataclass
class Records:
    """What :func:`setup` made, saved to ``path`` after every step."""
    path: Path
    tag: str
    subnet: str
    bridge: str = ""
    link_rate: str | None = None
    nodes: list[Node] = dataclasses.field(default_factory=list)
    namespaces: list[str] = dataclasses.field(default_factory=list)
    links: list[str] = dataclasses.field(default_factory=list)
    hosts_dirs: list[str] = dataclasses.field(default_factory=list)
    made_etc_netns: bool = False

    @property
    def gateway(self) -> str:
        """The bridge's (host side) address, where the controller listens."""
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    def save(self) -> None:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> Records | None:
        """The records at ``path``, or None when there are none (nothing was made)."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        data["path"] = Path(data["path"])
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return cls(**data)


def _free_subnet() -> str:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    nets = [ipaddress.ip_interface(m).network for m in re.findall(r"inet (\S+)", used)]
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{secrets.randbelow(200) + 50}."
                                   f"{secrets.randbelow(250) + 1}.0/24")
        if not any(net.overlaps(other) for other in nets):
            return str(net)
    raise NetnsError("no free 10.x.y.0/24 subnet for the cluster bridge")


def hosts_text(nodes: list[Node], host: str, gateway: str) -> str:
    """The node's ``/etc/hosts``: localhost, every node by its cluster address and the machine
    itself (``host``, where slurmctld and a host-side ``mpiexec`` run) at the bridge (pure)."""
    lines = ["127.0.0.1 localhost", f"{gateway} {host}"]
    lines += [f"{n.address} {n.hostname}" for n in nodes]
    return "\n".join(lines) + "\n"


def setup(path: Path, count: int, link_rate: str | None) -> Records:
    """Create ``count`` nodes (1..MAX_NODES) on a new bridge; records saved to ``path``.
    On failure everything made so far is removed again and NetnsError is raised."""
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"--nodes {count}: use 1 to {MAX_NODES}")
    if link_rate is not None:
        rate_bits(link_rate)
    tag = secrets.token_hex(2)
    rec = Records(path=path, tag=tag, subnet=_free_subnet(), link_rate=link_rate)
    rec.save()
    try:
        _build(rec, count)
    except NetnsError:
        teardown(path)
        raise
    return rec


def _shape(dev: str, rate: str, netns: str | None = None) -> None:
    """tbf at ``rate`` on ``dev``'s egress. The bucket holds 4 ms of traffic (at least 64 KiB,
    one GSO packet): with 1 ms, TCP through the bucket reached 40 % of 500 mbit on the loaded
    test machine (drops), with 4 ms 85 %; a message after an idle gap gains at most those
    4 ms."""
    burst = max(65536, int(rate_bits(rate) / 8 * 0.004))
    prefix = ["ip", "netns", "exec", netns] if netns else []
    run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
        "burst", str(burst), "latency", "100ms")


def _build(rec: Records, count: int) -> None:
    net = ipaddress.ip_network(rec.subnet)
    rec.bridge = f"hpt{rec.tag}b"
    rec.links.append(rec.bridge)
    rec.save()
    run("ip", "link", "add", rec.bridge, "type", "bridge")
    run("ip", "addr", "add", f"{rec.gateway}/{net.prefixlen}", "dev", rec.bridge)
    run("ip", "link", "set", rec.bridge, "up")
    nodes = [Node(index=k, hostname=f"node{k}", namespace=f"hpcml-{rec.tag}-node{k}",
                  address=str(net.network_address + 10 + k), host_veth=f"hpt{rec.tag}h{k}")
             for k in range(1, count + 1)]
    for node in nodes:
        ns = node.namespace
        rec.namespaces.append(ns)
        rec.links.append(node.host_veth)
        hosts_dir = Path("/etc/netns") / ns
        rec.hosts_dirs.append(str(hosts_dir))
        rec.save()
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", f"hpt{rec.tag}n",
            "netns", ns)
        run("ip", "-n", ns, "link", "set", f"hpt{rec.tag}n", "name", "eth0")
        run("ip", "-n", ns, "addr", "add", f"{node.address}/{net.prefixlen}", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "link", "set", node.host_veth, "master", rec.bridge, "up")
        if rec.link_rate:
            _shape(node.host_veth, rec.link_rate)
            _shape("eth0", rec.link_rate, ns)
        rec.nodes.append(node)
        rec.save()
    if not Path("/etc/netns").exists():
        rec.made_etc_netns = True
        rec.save()
    for hosts_dir in rec.hosts_dirs:
        Path(hosts_dir).mkdir(parents=True, exist_ok=True)
        (Path(hosts_dir) / "hosts").write_text(hosts_text(nodes, socket.gethostname(), rec.gateway))


def teardown(path: Path) -> list[str]:
    """Remove every namespace, link and hosts file listed in the records at ``path`` (those
    already gone are skipped); returns what could not be removed (empty when all is gone)."""
    rec = Records.load(path)
    if rec is None:
        return []
    left = []
    for ns in rec.namespaces:
        res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if res.returncode != 0 and ns in netns_names():
            left.append(f"namespace {ns}: {res.stderr.strip()}")
    for link in reversed(rec.links):
        if Path("/sys/class/net", link).exists():
            res = subprocess.run(["ip", "link", "del", link], capture_output=True, text=True)
            if res.returncode != 0 and Path("/sys/class/net", link).exists():
                left.append(f"link {link}: {res.stderr.strip()}")
    for hosts_dir in rec.hosts_dirs:
        shutil.rmtree(hosts_dir, ignore_errors=True)
        if os.path.exists(hosts_dir):
            left.append(f"hosts file {hosts_dir}")
    if rec.made_etc_netns:
        with contextlib.suppress(OSError):  # another user of /etc/netns appeared: theirs
            os.rmdir("/etc/netns")
    return left


def netns_names() -> set[str]:
    """Names ``ip netns list`` shows now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def in_node(node: Node, hostname_pid: int | None = None) -> list[str]:
    """Command prefix that runs a command inside ``node``: its network namespace, a private
    mount namespace with the node's hosts file over ``/etc/hosts``, and a UTS namespace with
    the node's hostname; given the pid of a process already started that way, its namespaces.
    (Not ``ip netns exec``: it remounts /sys without the cgroup mount slurmd needs.)"""
    if hostname_pid is None:
        hosts = Path("/etc/netns") / node.namespace / "hosts"
        return ["nsenter", f"--net=/run/netns/{node.namespace}", "--", "unshare", "--uts",
                "--mount", "--", "sh", "-c",
                f'mount --bind {hosts} /etc/hosts && hostname "$0" && exec "$@"', node.hostname]
    return ["nsenter", "-t", str(hostname_pid), "-n", "-u", "-m", "--"]
