"""Which transport MPI used between hosts, observed rather than assumed.

Two "nodes" with different hostnames may still be one machine (containers, network namespaces,
hpcml's own :mod:`hpcml.slurm.local_cluster`): then MPI's network layer (MPICH over UCX or
libfabric) sees the same boot id and /dev/shm on both and silently moves data through shared
memory, never touching the link whose speed a scaling model assumes. :func:`inter_node` finds
out: rank 0 and the first rank on another hostname exchange :data:`PROBE_BYTES`, and rank 0
reads its IP interfaces' byte counters (``/proc/net/dev``, all but loopback) around it.

* ``"ip network"``: at least the probe's bytes crossed rank 0's IP interfaces (TCP sockets);
* ``"shared memory"``: nothing crossed them and both hosts share boot id and /dev/shm;
* ``"network, not IP"``: nothing crossed them and the hosts are distinct machines (RDMA:
  InfiniBand, Slingshot, whose traffic bypasses the IP counters);
* ``"one host"``: every rank has the same hostname (nothing to observe).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

from hpcml.comm.communicator import Communicator

PROBE_BYTES = 1 << 20
TAG = 28_028
# settings that choose MPICH's network layer and its transports, recorded when set
SETTINGS = ("MPIR_CVAR_CH4_NETMOD", "MPIR_CVAR_NOLOCAL", "UCX_TLS", "UCX_NET_DEVICES",
            "FI_PROVIDER")


def identity() -> dict[str, Any]:
    """This process's hostname, boot id and /dev/shm (device, inode) (no communication)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    try:
        st = os.stat("/dev/shm")
        shm = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm = ""
    return {"host": platform.node(), "boot_id": boot, "shm": shm}


def ip_bytes() -> int:
    """Bytes received plus sent on every non-loopback interface of this network namespace."""
    total = 0
    try:
        with open("/proc/net/dev") as fh:
            for line in fh.readlines()[2:]:
                name, _, fields = line.partition(":")
                if name.strip() != "lo":
                    values = fields.split()
                    total += int(values[0]) + int(values[8])
    except (OSError, ValueError, IndexError):
        return -1
    return total


def shared_machines(ids: list[dict[str, Any]]) -> list[str]:
    """Hostnames (sorted) that share a boot id and /dev/shm with another hostname (pure)."""
    seen: dict[tuple[str, str], set[str]] = {}
    for item in ids:
        if item["boot_id"] and item["shm"]:
            seen.setdefault((item["boot_id"], item["shm"]), set()).add(item["host"])
    return sorted(h for hosts in seen.values() if len(hosts) > 1 for h in hosts)


def classify(crossed: int, shared: bool) -> str:
    """The transport name for ``crossed`` IP bytes during the probe (pure; see module doc)."""
    if crossed >= PROBE_BYTES:
        return "ip network"
    return "shared memory" if shared else "network, not IP"


def inter_node(comm: Communicator) -> dict[str, Any]:
    """Collective over ``comm``: every rank gets ``{"inter_node": name, "shared_memory_hosts":
    [...], "settings": {...}}`` (see the module doc for the names). With more than one hostname
    rank 0 exchanges :data:`PROBE_BYTES` with the first rank on another hostname."""
    ids = comm.allgather(identity())
    settings = {k: os.environ[k] for k in SETTINGS if k in os.environ}
    shared = shared_machines(ids)
    peer = next((r for r, item in enumerate(ids) if item["host"] != ids[0]["host"]), None)
    if peer is None:
        return {"inter_node": "one host", "shared_memory_hosts": [], "settings": settings}
    buf = np.zeros(PROBE_BYTES, dtype=np.uint8)
    crossed = 0
    comm.barrier()
    if comm.rank == 0:
        before = ip_bytes()
        comm.Send(buf, peer, TAG)
        comm.Recv(buf, peer, TAG)
        crossed = ip_bytes() - before if before >= 0 else 0
    elif comm.rank == peer:
        comm.Recv(buf, 0, TAG)
        comm.Send(buf, 0, TAG)
    crossed = comm.bcast(crossed)
    both_shared = ids[0]["host"] in shared and ids[peer]["host"] in shared
    return {"inter_node": classify(crossed, both_shared), "shared_memory_hosts": shared,
            "settings": settings}


def warning(found: dict[str, Any]) -> str | None:
    """One line when ranks on different hostnames share one machine's memory, else None."""
    hosts = found["shared_memory_hosts"]
    if not hosts:
        return None
    via = found["inter_node"]
    fix = ("; to send it over the network set UCX_TLS=tcp (MPICH over UCX) or FI_PROVIDER=tcp "
           "(over libfabric)" if via == "shared memory" else "")
    return (f"hpcml: warning: hosts {', '.join(hosts)} share one machine's memory (same boot id "
            f"and /dev/shm); data between them went through {via}{fix}")
