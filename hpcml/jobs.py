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

from hpcml import checkpoint, extras
from hpcml.comm import Communicator
from hpcml.config import JobConfig
from hpcml.errors import UsageError
from hpcml.preemption import Preemption
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
    "bench-model-parallel": "hpcml.parallel.bench_model_parallel",
}


@dataclasses.dataclass
class RunContext:
    """Everything a job's ``run`` gets. ``run_dir`` has the same path on every rank; by
    convention rank 0 writes the shared files. ``resume`` is the run directory to continue
    from (``--resume``), which is then also ``run_dir``; ``restored`` is its verified, loaded
    last checkpoint (step, rank count and config already checked against this job).
    ``preemption`` has been catching SIGUSR1/SIGTERM since before validation; a job that stops
    early because of it returns ``stopped_by`` (the signal) in its summary, and the run's
    status is then ``preempted``."""

    comm: Communicator
    config: Any
    run_dir: RunDir
    resume: Path | None = None
    restored: checkpoint.Restored | None = None
    preemption: Preemption = dataclasses.field(default_factory=Preemption)
    config_hash: str = ""

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.is_root:
            print(message, flush=True)

    def stop_requested(self) -> str | None:
        """The reason to stop now (a signal name) on every rank when any rank has received
        SIGUSR1/SIGTERM, else None. Collective over ``comm`` (one small allreduce)."""
        return self.preemption.agreed(self.comm)

    def save_checkpoint(self, step: int, shared: dict[str, Any],
                        local: dict[str, Any]) -> Path:
        """Write this run's checkpoint of ``step`` (see :mod:`hpcml.checkpoint`); collective."""
        return checkpoint.save(self.comm, self.run_dir.path, step, shared, local,
                               self.config_hash)


@dataclasses.dataclass(frozen=True)
class JobKind:
    """A runnable job: its schema and its entry point. ``run`` is collective over
    ``ctx.comm`` and returns the summary (JSON-serializable) that rank 0 saves.

    ``validate_data(config, comm)``, when given, checks the job's input data on every rank
    before the run directory exists (each rank may check its own part; no communication) and
    raises a one-line ``UsageError`` naming the file, the dataset and what was expected.
    ``check_resume(config, restored)``, when given, makes the kind resumable (``--resume``);
    it receives the verified, loaded checkpoint before anything is written and raises
    ``UsageError`` when this config cannot continue from it (e.g. shapes that do not fit)."""

    config: type[JobConfig]
    run: Callable[[Any, RunContext], dict[str, Any]]
    description: str
    validate_data: Callable[[Any, Communicator], None] | None = None
    check_resume: Callable[[Any, checkpoint.Restored], None] | None = None


def job_kind(name: str) -> JobKind:
    """The registered kind ``name``; a ``UsageError`` listing the kinds otherwise."""
    if name not in KINDS:
        known = ", ".join(sorted(KINDS))
        raise UsageError(f"kind: unknown job kind {name!r}; known kinds: {known}")
    extras.require(*extras.KIND_EXTRAS.get(name, ()), what=f"kind {name!r}")
    module = importlib.import_module(KINDS[name])
    return module.JOB


def bench_names() -> list[str]:
    return sorted(k.removeprefix("bench-") for k in KINDS if k.startswith("bench-"))


def describe() -> str:
    """One line per job kind (imports every installed capability; a kind whose extra is
    missing says which ``pip install`` adds it)."""
    lines = []
    for name in sorted(KINDS):
        try:
            text = job_kind(name).description
        except UsageError as exc:
            text = f"(not installed) {str(exc).split(': ', 1)[-1]}"
        lines.append(f"  {name:<22} {text}")
    return "\n".join(lines)
