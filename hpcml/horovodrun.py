"""``hpcml horovodrun -np N [-H host:slots,...] COMMAND...``: Horovod's launcher line, run by the
MPI launcher beside this interpreter (the embedded MPICH's Hydra ``mpiexec``).

``-np N`` becomes ``-n N`` and ``-H a:2,b:2`` becomes Hydra's ``-hosts a:2,b:2`` (a host
without ``:slots`` counts one slot, as in Horovod). Nothing else of ``horovodrun`` (Gloo,
elastic ``--min-np``/``--host-discovery-script``, SSH options) is offered: an option not listed
here is refused by the command line. A module of its own (not in :mod:`hpcml.horovod`), so the
launcher process never imports MPI.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence

from hpcml.errors import UsageError
from hpcml.slurm.render import launcher

HOST = re.compile(r"[A-Za-z0-9_.\-\[\]]+(:[0-9]+)?")


def parse_hosts(hosts: str) -> list[tuple[str, int]]:
    """``"a:2,b"`` -> ``[("a", 2), ("b", 1)]``; a malformed entry is a ``UsageError``."""
    out = []
    for item in hosts.split(","):
        if not HOST.fullmatch(item):
            raise UsageError(f"-H: {item!r} is not HOST or HOST:SLOTS (e.g. -H node1:4,node2:4)")
        name, _, slots = item.partition(":")
        if slots and int(slots) < 1:
            raise UsageError(f"-H: {item!r} has no slots; give HOST:SLOTS with SLOTS >= 1")
        out.append((name, int(slots) if slots else 1))
    return out


def command(np: int, hosts: str | None, argv: Sequence[str]) -> list[str]:
    """The ``mpiexec`` command line for ``horovodrun -np np [-H hosts] argv`` (pure; checks
    every argument and raises ``UsageError`` naming the one that is wrong)."""
    if np < 1:
        raise UsageError(f"-np: {np} processes; give a number >= 1 (e.g. -np 4)")
    if not argv:
        raise UsageError("COMMAND: nothing to run; give the training command, e.g. "
                         "hpcml horovodrun -np 2 python train.py")
    cmd = [str(launcher()), "-n", str(np)]
    if hosts is not None:
        parsed = parse_hosts(hosts)
        slots = sum(s for _, s in parsed)
        if slots < np:
            raise UsageError(f"-H: {hosts!r} offers {slots} slots for -np {np}; list more "
                             "hosts or slots, or lower -np")
        cmd += ["-hosts", ",".join(f"{h}:{s}" for h, s in parsed)]
    return [*cmd, *argv]


def horovodrun(np: int, hosts: str | None, argv: Sequence[str], verbose: bool = False) -> int:
    """Run ``argv`` on ``np`` ranks through the MPI launcher; returns its exit code."""
    cmd = command(np, hosts, argv)
    if verbose:
        print(shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode
