"""Running a job: validate on every rank, then work, then save; any failure ends the job.

Order of events (all ranks):
1. read the job file and ``--set`` overrides, validate against the kind's schema and the number
   of ranks. Every rank validates; an allgather of the outcomes makes the decision collective,
   so a bad value prints one line on rank 0 and every rank exits 2 — before any work and before
   a run directory exists;
2. set torch threads and the straggler model, create the run directory (rank 0), save the
   resolved config and the environment;
3. run the job under abort-on-error;
4. gather the ledger of every rank and save ``ledger.json`` and ``summary.json`` (rank 0). A job
   whose summary names ``unresponsive_ranks`` (workers that stopped answering) skips the gather:
   rank 0 saves its own ledger and the summary, then aborts the job with exit code 3.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcml.comm import Communicator, abort_on_error, make_delay_model, world
from hpcml.comm.ledger import format_table
from hpcml.config import apply_overrides, load_job_file, read_toml, to_dict
from hpcml.errors import UsageError
from hpcml.jobs import JobKind, RunContext, job_kind
from hpcml.rundir import RunDir
from hpcml.runtime import configure_threads, environment


def _validate(comm: Communicator, job_path: str | None, kind: str | None,
              overrides: Sequence[str]) -> tuple[JobKind, Any, str]:
    data: dict[str, Any] = read_toml(job_path) if job_path else {}
    data = apply_overrides(data, overrides)
    source = job_path or "defaults"
    if kind is not None:
        if data.get("kind", kind) != kind:
            raise UsageError(f"{source}: kind: file is for {data['kind']!r}, not {kind!r}")
        data["kind"] = kind
    if not data.get("kind"):
        raise UsageError(f"{source}: kind: missing; add e.g. kind = \"bench-collectives\"")
    try:
        job = job_kind(data["kind"])
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None
    config = load_job_file(job.config, data, source, comm.size)
    if hasattr(config, "stragglers"):
        try:
            comm.set_delays(make_delay_model(config.stragglers, comm.size))
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None
    return job, config, data["kind"]


def validated(comm: Communicator, job_path: str | None, kind: str | None,
              overrides: Sequence[str]) -> tuple[JobKind, Any, str]:
    """Collective validation: returns on every rank or exits 2 on every rank."""
    error = None
    try:
        result = _validate(comm, job_path, kind, overrides)
    except UsageError as exc:
        error, result = str(exc), None
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        if comm.rank == 0:
            sys.stderr.write(f"hpcml: error: {errors[0]}\n")
        raise SystemExit(2)
    return result


UNRESPONSIVE_EXIT = 3


def end_without_unresponsive(comm: Communicator, run_dir: RunDir, kind_name: str,
                             elapsed: float, summary: dict[str, Any]) -> None:
    """Rank 0 only, when the job names ranks that stopped answering (a frozen or dead worker,
    ``summary["unresponsive_ranks"]``): write the results that exist (rank 0's ledger,
    ``summary.json`` with status complete), then end the job with MPI_Abort and exit code
    ``UNRESPONSIVE_EXIT`` (3), since no collective can complete and mpiexec waits for every
    process, a stopped one included. Never returns."""
    lost = summary["unresponsive_ranks"]
    run_dir.write_json("ledger.json", {"ranks": [comm.ledger.totals()],
                                       "missing_ranks": list(range(1, comm.size))})
    run_dir.write_json("summary.json", {"kind": kind_name, "status": "complete",
                                        "ranks": comm.size, "seconds": elapsed, **summary})
    print(f"\nresults in {run_dir.path}", flush=True)
    sys.stderr.write(f"hpcml: ranks {lost} never answered the end of the run; the results in "
                     f"{run_dir.path} are complete; aborting the job so that it ends (exit "
                     f"code {UNRESPONSIVE_EXIT})\n")
    sys.stderr.flush()
    time.sleep(0.5)  # mpiexec forwards output asynchronously; the abort would cut it off
    comm.abort(UNRESPONSIVE_EXIT)


def execute(job_path: str | None, kind: str | None = None, overrides: Sequence[str] = (),
            resume: str | None = None) -> dict[str, Any]:
    """Run one job on COMM_WORLD (collective). Returns the summary on every rank."""
    with abort_on_error():
        comm = world()
        job, config, kind_name = validated(comm, job_path, kind, overrides)
        if resume is not None and not Path(resume, "config.toml").is_file():
            raise UsageError(f"--resume {resume}: not a run directory (no config.toml in it)")
        threads = configure_threads(comm, config.threads)
        env = environment(comm)
        path = None
        if comm.rank == 0:
            run_dir = RunDir(Path(resume)) if resume else RunDir.create(
                config.runs_dir, config.name or kind_name)
            path = str(run_dir.path)
            run_dir.write_toml("config.toml", to_dict(config))
            run_dir.write_json("env.json", env)
        run_dir = RunDir(Path(comm.bcast(path)))
        ctx = RunContext(comm=comm, config=config, run_dir=run_dir,
                         resume=Path(resume) if resume else None)
        ctx.log(f"hpcml {kind_name}: {comm.size} ranks, {threads} torch threads/rank, "
                f"{env['mpi_library']}; run directory {run_dir.path}")
        start = time.perf_counter()
        summary = job.run(config, ctx)
        elapsed = time.perf_counter() - start
        if comm.rank == 0 and summary.get("unresponsive_ranks"):
            end_without_unresponsive(comm, run_dir, kind_name, elapsed, summary)
        per_rank = comm.gather(comm.ledger.totals())
        if comm.rank == 0:
            run_dir.write_json("ledger.json", {"ranks": per_rank})
            run_dir.write_json("summary.json", {"kind": kind_name, "status": "complete",
                                                "ranks": comm.size, "seconds": elapsed,
                                                **summary})
            print(f"\ncommunication ledger (all ranks):\n{format_table(per_rank)}")
            print(f"\nresults in {run_dir.path}", flush=True)
        return summary
