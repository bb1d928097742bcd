"""Running a job: validate on every rank, then work, then save; any failure ends the job.

Order of events (all ranks):
1. catch SIGUSR1/SIGTERM for the whole run (:mod:`hpcml.preemption`), so a signal at any point
   is honoured instead of killing a rank;
2. read the job file and ``--set`` overrides, validate against the kind's schema and the number
   of ranks, check the input data (the kind's ``validate_data``) and, with ``--resume``, the run
   directory and its last checkpoint (rank count, config hash, file hashes; loaded with
   ``weights_only``); the hash covers every key but :data:`PLACEMENT_KEYS`. A new run's
   ``runs_dir`` must take a directory (rank 0 probes it: path and errno otherwise). Every rank
   validates; an allgather of the outcomes makes the decision collective, so a problem prints
   one line on rank 0 and every rank exits 2 — before any work and before a run directory is
   created or changed;
3. set torch threads, the heap policy (:mod:`hpcml.heap`), the straggler model and the collective
   watchdog's timeout
   (``watchdog_timeout``, unless ``HPCML_WATCHDOG_TIMEOUT`` is set, :mod:`hpcml.comm.watchdog`);
   rank 0 creates the run directory and saves the resolved config and the environment
   (``config.toml``, ``env.json`` with the timeout in force: segment 0). A resumed run
   never rewrites them: it appends a segment to ``segments.json`` with its own
   ``config.segment-N.toml`` and ``env.segment-N.json`` (and the length of ``metrics.jsonl``,
   so that :func:`run_metrics` can leave out steps the segment redoes). When the filesystem
   refuses these writes, what was created is removed and every rank exits 2 (one line);
4. run the job under abort-on-error; a write the filesystem refuses mid-run ends the job with
   exit code 1, one line and a ``failed`` summary where it can still be written
   (:func:`end_on_storage_failure`);
5. gather the ledger of every rank and save ``ledger.json`` and ``summary.json`` (rank 0), whose
   ``status`` is ``failed`` when the job could not go on (``failed_by``), ``preempted`` when it
   stopped early, else ``complete``. A job whose summary
   names ``unresponsive_ranks`` (workers that stopped answering) skips the gather: rank 0 saves
   its own ledger and the summary, then aborts the job with exit code 3.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hpcml import checkpoint, heap
from hpcml.comm import Communicator, abort_on_error, make_delay_model, watchdog, world
from hpcml.comm.ledger import format_table
from hpcml.config import apply_overrides, load_job_file, read_toml, to_dict
from hpcml.config.schema import shown
from hpcml.errors import STORAGE_ERRNOS, StorageError, UsageError, describe_os_error
from hpcml.jobs import JobKind, RunContext, job_kind
from hpcml.preemption import Preemption, run_status
from hpcml.rundir import METRICS, RunDir, check_runs_dir
from hpcml.runtime import configure_threads, environment

SEGMENTS = "segments.json"


@dataclasses.dataclass
class Plan:
    """What validation decided: the job, its config, and (with ``--resume``) where to go on."""

    job: JobKind
    config: Any
    kind: str
    config_hash: str
    resume: Path | None = None
    restored: checkpoint.Restored | None = None
    segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _validate(comm: Communicator, job_path: str | None, kind: str | None,
              overrides: Sequence[str]) -> tuple[JobKind, Any, str]:
    data: dict[str, Any] = read_toml(job_path) if job_path else {}
    data = apply_overrides(data, overrides)
    source = job_path or "defaults"
    if kind is not None:
        if data.get("kind", kind) != kind:
            raise UsageError(f"{source}: kind: file is for {data['kind']!r}, not {kind!r}")
        data["kind"] = kind
    if not isinstance(data.get("kind", ""), str):
        raise UsageError(f"{source}: kind: must be a string, got {shown(data['kind'])} (e.g. "
                         "kind = \"bench-collectives\")")
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
    if job.validate_data is not None:
        job.validate_data(config, comm)
    return job, config, data["kind"]


# keys that say where a run's directory goes or when a hung job is ended, not what it
# computes: free to differ on --resume
PLACEMENT_KEYS = ("runs_dir", "name", "watchdog_timeout")


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config (as TOML data) that a checkpoint's config hash covers (pure)."""
    return {k: v for k, v in config.items() if k not in PLACEMENT_KEYS}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"train.lr_scale: 1.0 -> 5.0, model.dropout: 0.1 -> 0.3"`` (pure; '' when equal)."""
    a, b = _flatten(old), _flatten(new)
    missing = "(unset)"
    return ", ".join(f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing))


SEGMENT_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # a plain file in the run dir


def _segment_problem(run_dir: Path, index: int, entry: Any) -> str | None:
    """What is wrong with entry ``index`` of a segments list, or None (pure but for
    checking that the config file it names exists)."""
    if not isinstance(entry, dict):
        return f"entry {index} is a {type(entry).__name__}, not a table"
    if entry.get("segment") != index or isinstance(entry.get("segment"), bool):
        return f"entry {index} has segment {entry.get('segment')!r}"
    for key in ("config", "env"):
        name = entry.get(key)
        if not isinstance(name, str) or not SEGMENT_FILE.fullmatch(name):
            return f"entry {index} names {key} {name!r}, not a file of the run directory"
    if not (run_dir / entry["config"]).is_file():
        return f"entry {index} names {entry['config']}, which is not in the run directory"
    start = entry.get("start_step")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= 2**31 - 1:
        return f"entry {index} has start_step {start!r}"
    return None


def read_segments(run_dir: Path) -> list[dict[str, Any]]:
    """The segments a run directory records (segment 0 = ``config.toml`` when the file is
    absent, as in run directories of older versions), each checked: a table numbered by its
    position, naming a config file of the run directory and a start step. Not collective;
    raises a one-line ``UsageError``."""
    path = run_dir / SEGMENTS
    if not path.is_file():
        return [{"segment": 0, "config": "config.toml", "env": "env.json", "start_step": 0}]
    problem = None
    try:
        segments = json.loads(path.read_bytes())
        if not isinstance(segments, list) or not segments:
            problem = "not a non-empty JSON list"
        else:
            problem = next((p for i, entry in enumerate(segments)
                            if (p := _segment_problem(run_dir, i, entry))), None)
    except (ValueError, RecursionError) as exc:
        problem = f"not JSON ({str(exc).splitlines()[0][:120]})"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror})"
    if problem:
        raise UsageError(f"{path}: {problem}; the run directory is damaged (restore it from a "
                         "copy, or start a new run)")
    return segments


def _check_resume(comm: Communicator, job: JobKind, config: Any, kind: str, new_hash: str,
                  resume: str, allow_config_change: bool) -> Plan:
    """Every check of a ``--resume`` before anything is written (raises UsageError)."""
    where = Path(resume)
    flag = f"--resume {resume}"
    if not where.is_dir() or not (where / "config.toml").is_file():
        raise UsageError(f"{flag}: not a run directory (no config.toml in it)")
    if job.check_resume is None:
        raise UsageError(f"{flag}: job kind {kind!r} does not checkpoint, so it cannot resume "
                         "(start a new run)")
    recorded = read_toml(where / "config.toml").get("kind")
    if recorded != kind:
        raise UsageError(f"{flag}: the run directory is a {recorded!r} run, this job is {kind!r}")
    segments = read_segments(where)
    last = read_toml(where / segments[-1]["config"])
    manifest = checkpoint.latest(where)
    if manifest is None:
        raise UsageError(f"{flag}: no complete checkpoint in it (nothing to resume; start a new "
                         "run)")
    if manifest.ranks != comm.size:
        raise UsageError(f"{flag}: checkpoint written by {manifest.ranks} ranks, this job has "
                         f"{comm.size} (resume with mpiexec -n {manifest.ranks})")
    if manifest.config_hash != checkpoint.config_hash(identity(last)):
        raise UsageError(f"{manifest.path}: config hash differs from the run's recorded config "
                         f"{segments[-1]['config']} (the run directory was edited; start a new "
                         "run)")
    if new_hash != manifest.config_hash and not allow_config_change:
        diff = config_diff(identity(last), identity(to_dict(config)))
        raise UsageError(f"{flag}: the config differs from the checkpoint's: {diff} (resume with "
                         "the same job file and --set values, or pass --allow-config-change to "
                         "record a new segment)")
    restored = checkpoint.read(manifest, comm.rank)
    job.check_resume(config, restored)
    return Plan(job, config, kind, new_hash, where, restored, segments)


def _plan(comm: Communicator, job_path: str | None, kind: str | None,
          overrides: Sequence[str], resume: str | None, allow_config_change: bool) -> Plan:
    job, config, kind_name = _validate(comm, job_path, kind, overrides)
    new_hash = checkpoint.config_hash(identity(to_dict(config)))
    if resume is None:
        if allow_config_change:
            raise UsageError("--allow-config-change: only meaningful with --resume RUN_DIR")
        if comm.rank == 0:  # the rank that creates the run directory
            check_runs_dir(config.runs_dir)
        return Plan(job, config, kind_name, new_hash)
    return _check_resume(comm, job, config, kind_name, new_hash, resume, allow_config_change)


def validated(comm: Communicator, job_path: str | None, kind: str | None,
              overrides: Sequence[str], resume: str | None = None,
              allow_config_change: bool = False) -> Plan:
    """Collective validation: returns on every rank or exits 2 on every rank (one line, from
    rank 0, naming the first rank's problem)."""
    error = None
    try:
        result = _plan(comm, job_path, kind, overrides, resume, allow_config_change)
    except UsageError as exc:
        error, result = str(exc), None
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        if comm.rank == 0:
            sys.stderr.write(f"hpcml: error: {errors[0]}\n")
        raise SystemExit(2)
    return result


def _open_run_dir(plan: Plan, env: dict[str, Any], size: int) -> RunDir:
    """Rank 0: a new run directory, or the resumed one with a new segment recorded. When the
    filesystem refuses a write, everything this call created is removed again (a resumed run
    directory is left byte for byte as it was: ``segments.json`` is replaced last, atomically)
    and a one-line ``UsageError`` names the path and the errno."""
    config = to_dict(plan.config)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    created: list[Path] = []
    target: Path | None = None
    try:
        if plan.resume is None:
            root = Path(plan.config.runs_dir)
            target = root
            created += [p for p in (root, *root.parents) if not p.exists()][::-1]
            run_dir = RunDir.create(plan.config.runs_dir, plan.config.name or plan.kind)
            created.append(run_dir.path)
            names = {"config": "config.toml", "env": "env.json"}
            segments = [{"segment": 0, **names, "start_step": 0, "ranks": size,
                         "config_hash": plan.config_hash, "started": stamp}]
        else:
            run_dir = RunDir(plan.resume)
            n = len(plan.segments)
            names = {"config": f"config.segment-{n}.toml", "env": f"env.segment-{n}.json"}
            created += [run_dir.path / f for f in names.values()
                        if not (run_dir.path / f).exists()]
            metrics = run_dir.path / METRICS
            segments = [*plan.segments, {
                "segment": n, **names, "start_step": plan.restored.step, "ranks": size,
                "config_hash": plan.config_hash,
                "resumed_from": plan.restored.manifest.path.name, "started": stamp,
                "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0}]
        for write, name, data in ((run_dir.write_toml, names["config"], config),
                                  (run_dir.write_json, names["env"], env),
                                  (run_dir.write_json, SEGMENTS, segments)):
            target = run_dir.path / name
            write(name, data)
    except OSError as exc:
        for path in reversed(created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if plan.resume is None:
            raise UsageError(f"runs_dir: {describe_os_error(target, exc)} (free space or "
                             "choose another runs_dir; nothing was left behind)") from None
        raise UsageError(f"--resume {plan.resume}: {describe_os_error(target, exc)} (free "
                         "space and resume again; the run directory is unchanged)") from None
    return run_dir


def _opened(comm: Communicator, plan: Plan, env: dict[str, Any]) -> RunDir:
    """Collective: rank 0 opens the run directory (:func:`_open_run_dir`); every rank gets
    its path, or exits 2 with rank 0's one line when the filesystem refused."""
    outcome: tuple[str | None, str | None] = (None, None)
    if comm.rank == 0:
        try:
            outcome = (str(_open_run_dir(plan, env, comm.size).path), None)
        except UsageError as exc:
            outcome = (None, str(exc))
    path, error = comm.bcast(outcome)
    if error is not None:
        if comm.rank == 0:
            sys.stderr.write(f"hpcml: error: {error}\n")
        raise SystemExit(2)
    return RunDir(Path(path))


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics records of a run directory without the steps a resumed segment redid:
    ``metrics.jsonl`` is append-only (nothing is ever deleted), and each resumed segment in
    ``segments.json`` records the file's length when it started (``metrics_bytes``) and the
    checkpoint step it continued from (``start_step``). A record of an earlier segment whose
    ``step`` is past a later segment's start step was redone by that segment (the job was
    killed after it, before the next checkpoint) and is left out; records without a ``step``
    are kept. A torn line (a job killed mid-write) is skipped. Not collective."""
    data = (run_dir / METRICS).read_bytes() if (run_dir / METRICS).is_file() else b""
    segments = read_segments(run_dir)
    bounds = [min(s.get("metrics_bytes", 0), len(data)) for s in segments[1:]]
    records = []
    for i, (lo, hi) in enumerate(zip([0, *bounds], [*bounds, len(data)], strict=True)):
        later = [s["start_step"] for s in segments[i + 1:]]
        limit = min(later) if later else None
        for line in data[lo:hi].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if limit is None or not isinstance(step, int | float) or step <= limit:
                records.append(record)
    return records


UNRESPONSIVE_EXIT = 3


def end_without_unresponsive(comm: Communicator, run_dir: RunDir, kind_name: str,
                             elapsed: float, summary: dict[str, Any]) -> None:
    """Rank 0 only, when the job names ranks that stopped answering (a frozen or dead worker,
    ``summary["unresponsive_ranks"]``): write the results that exist (rank 0's ledger,
    ``summary.json``), then end the job with MPI_Abort and exit code ``UNRESPONSIVE_EXIT`` (3),
    since no collective can complete and mpiexec waits for every process, a stopped one
    included. Never returns."""
    lost = summary["unresponsive_ranks"]
    run_dir.write_json("ledger.json", {"ranks": [comm.ledger.totals()],
                                       "missing_ranks": list(range(1, comm.size))})
    run_dir.write_json("summary.json", {"kind": kind_name, "status": run_status(summary),
                                        "ranks": comm.size, "seconds": elapsed, **summary})
    print(f"\nresults in {run_dir.path}", flush=True)
    done = ("are complete" if not summary.get("failed_by")
            else f"cover the work done before it failed ({summary['failed_by']})")
    sys.stderr.write(f"hpcml: ranks {lost} never answered the end of the run; the results in "
                     f"{run_dir.path} {done}; aborting the job so that it ends (exit "
                     f"code {UNRESPONSIVE_EXIT})\n")
    sys.stderr.flush()
    time.sleep(0.5)  # mpiexec forwards output asynchronously; the abort would cut it off
    comm.abort(UNRESPONSIVE_EXIT)


def execute(job_path: str | None, kind: str | None = None, overrides: Sequence[str] = (),
            resume: str | None = None, allow_config_change: bool = False) -> dict[str, Any]:
    """Run one job on COMM_WORLD (collective). Returns the summary on every rank."""
    with abort_on_error(), Preemption() as preemption:
        comm = world()
        plan = validated(comm, job_path, kind, overrides, resume, allow_config_change)
        config = plan.config
        threads = configure_threads(comm, config.threads)
        heap.configure()
        env = {**environment(comm), "watchdog_timeout": watchdog.set_timeout(
            config.watchdog_timeout)}
        run_dir = _opened(comm, plan, env)
        ctx = RunContext(comm=comm, config=config, run_dir=run_dir, resume=plan.resume,
                         restored=plan.restored, preemption=preemption,
                         config_hash=plan.config_hash)
        ctx.log(f"hpcml {plan.kind}: {comm.size} ranks, {threads} torch threads/rank, "
                f"{env['mpi_library']}; run directory {run_dir.path}")
        try:
            return _run_and_save(comm, plan, ctx)
        except StorageError as exc:  # raised on every rank together (a checkpoint)
            end_on_storage_failure(comm, run_dir, plan.kind, str(exc), collective=True)
        except OSError as exc:  # one rank's own write
            if exc.errno not in STORAGE_ERRNOS:
                raise
            end_on_storage_failure(comm, run_dir, plan.kind,
                                   describe_os_error(exc.filename or run_dir.path, exc),
                                   collective=False)


def _run_and_save(comm: Communicator, plan: Plan, ctx: RunContext) -> dict[str, Any]:
    """Steps 4 and 5 of the module docstring; returns the summary on every rank."""
    run_dir = ctx.run_dir
    start = time.perf_counter()
    summary = plan.job.run(plan.config, ctx)
    elapsed = time.perf_counter() - start
    if comm.rank == 0 and summary.get("unresponsive_ranks"):
        end_without_unresponsive(comm, run_dir, plan.kind, elapsed, summary)
    per_rank = comm.gather(comm.ledger.totals())
    if comm.rank == 0:
        run_dir.write_json("ledger.json", {"ranks": per_rank})
        run_dir.write_json("summary.json", {"kind": plan.kind, "status": run_status(summary),
                                            "ranks": comm.size, "seconds": elapsed,
                                            **summary})
        print(f"\ncommunication ledger (all ranks):\n{format_table(per_rank)}")
        print(f"\nresults in {run_dir.path}", flush=True)
    return summary


STORAGE_EXIT = 1


def end_on_storage_failure(comm: Communicator, run_dir: RunDir, kind_name: str, problem: str,
                           collective: bool) -> NoReturn:
    """End a run whose write the filesystem refused mid-run (exit code ``STORAGE_EXIT``, 1):
    rank 0 saves ``summary.json`` with status ``failed`` where it still can, and one line
    names the path, the errno and how to go on (``--resume`` when a checkpoint exists; a
    failed checkpoint has already removed its partial files and left the previous one as it
    was). ``collective``: every rank is here (the line is printed once and every rank exits);
    otherwise only this rank is, and it aborts the job (MPI_Abort), since the others may wait
    in a collective."""
    note = ""
    if comm.rank == 0:
        try:
            run_dir.write_json("summary.json", {"kind": kind_name, "status": "failed",
                                                "ranks": comm.size,
                                                "failed_by": f"storage: {problem}"})
        except OSError:
            note = "; summary.json could not be written either"
    if comm.rank == 0 or not collective:
        has_checkpoint = (run_dir.path / checkpoint.DIRNAME / "latest").is_file()
        then = (f"then continue with --resume {run_dir.path}" if has_checkpoint
                else "then run the job again")
        who = "" if comm.rank == 0 or comm.size == 1 else f" (rank {comm.rank})"
        sys.stdout.flush()
        sys.stderr.write(f"hpcml: error{who}: {problem}{note} (free space or fix the "
                         f"filesystem, {then})\n")
        sys.stderr.flush()
    if collective or comm.size == 1:
        raise SystemExit(STORAGE_EXIT)
    time.sleep(0.5)  # mpiexec forwards output asynchronously; the abort would cut it off
    comm.abort(STORAGE_EXIT)
    raise SystemExit(STORAGE_EXIT)
