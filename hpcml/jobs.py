"""The job kinds hpcml can run, and what a job's ``run`` function receives.

A capability exposes one module-level ``JOB = JobKind(...)`` and is listed in :data:`KINDS`
(imported lazily, so ``hpcml --help`` does not import torch). ``hpcml run FILE.toml`` picks the
kind from the file's ``kind`` key; ``hpcml bench NAME`` runs kind ``bench-NAME``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcml.comm import Communicator
from hpcml.config import JobConfig
from hpcml.errors import UsageError
from hpcml.rundir import RunDir

KINDS: dict[str, str] = {
    "bench-collectives": "hpcml.bench.collectives",
    "qsparse": "hpcml.qsparse.train",
    "bench-qsparse": "hpcml.qsparse.bench",
    "consensus": "hpcml.consensus.job",
    "bench-consensus": "hpcml.consensus.bench",
    "bench-privacy": "hpcml.privacy.bench",
    "scaling": "hpcml.slurm.scaling",
    "bench-reduction": "hpcml.nmt.bench",
    "transformer-nmt": "hpcml.nmt.train",
    "bench-coded": "hpcml.coded.bench",
    "coded": "hpcml.coded.job",
    "bench-cf": "hpcml.coded.cf_bench",
    "bench-optimizers": "hpcml.optim.bench",
}


@dataclasses.dataclass
class RunContext:
    """Everything a job's ``run`` gets. ``run_dir`` has the same path on every rank; by
    convention rank 0 writes the shared files. ``resume`` is the run directory to continue
    from (``--resume``), which is then also ``run_dir``."""

    comm: Communicator
    config: Any
    run_dir: RunDir
    resume: Path | None = None

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.is_root:
            print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class JobKind:
    """A runnable job: its schema and its entry point. ``run`` is collective over
    ``ctx.comm`` and returns the summary (JSON-serializable) that rank 0 saves."""

    config: type[JobConfig]
    run: Callable[[Any, RunContext], dict[str, Any]]
    description: str


def job_kind(name: str) -> JobKind:
    """The registered kind ``name``; a ``UsageError`` listing the kinds otherwise."""
    if name not in KINDS:
        known = ", ".join(sorted(KINDS))
        raise UsageError(f"kind: unknown job kind {name!r}; known kinds: {known}")
    module = importlib.import_module(KINDS[name])
    return module.JOB


def bench_names() -> list[str]:
    return sorted(k.removeprefix("bench-") for k in KINDS if k.startswith("bench-"))


def describe() -> str:
    """One line per job kind (imports every capability)."""
    return "\n".join(f"  {name:<22} {job_kind(name).description}" for name in sorted(KINDS))
