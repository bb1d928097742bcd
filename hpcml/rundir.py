"""Run directories: ``runs/<job>-<timestamp>/`` with config, environment, metrics, ledger and
summary. Every whole-file write is atomic (temporary file in the same directory + rename), so a
killed job never leaves a half-written result; metrics are JSON lines appended one complete line
per write, and a reader drops a trailing partial line.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from hpcml.errors import UsageError

METRICS = "metrics.jsonl"

def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one. A
    refused write (e.g. a full disk) removes the temporary file and raises ``OSError`` whose
    ``filename`` is ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    return path


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=_default) + "\n"


def read_json(path: str | Path) -> Any:
    """The JSON value in file ``path``. A file that cannot be read, is not UTF-8 or is not one
    JSON document (empty, torn, edited) raises a one-line ``UsageError`` naming it. Not
    collective."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); not a file hpcml "
                         "wrote, or a damaged one") from None
    except (ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UsageError(f"{path}: not valid JSON{where}; not a file hpcml wrote, or a damaged "
                         "one") from None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl file (a torn last line is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _refusal(err: int, where: Path | str) -> str:
    return f"{errno.errorcode.get(err, err)} ({os.strerror(err)}) at {str(where)!r}"


def directory_problem(path: str | Path) -> str | None:
    """Why files could not be created in directory ``path`` (made first if it does not exist),
    as ``"ERRNO (message) at 'where'"``; None when they can. Checks the nearest existing
    ancestor by creating and removing an empty probe directory in it (nothing is left behind,
    ``path`` itself is not made), so a read-only filesystem, a missing permission or a pseudo
    filesystem such as /proc answers with the errno the real write would get; a file in the way
    gives ENOTDIR and a name too long for the filesystem ENAMETOOLONG. Not collective."""
    target = Path(os.path.abspath(path))
    existing = target
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        return _refusal(errno.ENOTDIR, existing)
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    missing = target.relative_to(existing).parts
    too_long = [part for part in missing if len(os.fsencode(part)) > name_max]
    if too_long or len(os.fsencode(str(target))) + 64 > os.pathconf(existing, "PC_PATH_MAX"):
        return _refusal(errno.ENAMETOOLONG, too_long[0][:40] + "..." if too_long else target)
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".hpcml-probe-"))
    except OSError as exc:
        return _refusal(exc.errno or errno.EIO, existing)
    return None


def check_runs_dir(runs_dir: str) -> None:
    """Raise a one-line ``UsageError`` naming the path and errno when no run directory can be
    created under ``runs_dir`` (see :func:`directory_problem`). Not collective."""
    problem = directory_problem(runs_dir)
    if problem:
        raise UsageError(f"runs_dir: cannot create run directories under {runs_dir!r}: {problem} "
                         "(choose a writable directory, e.g. runs_dir = \"runs\")")


class RunDir:
    """A run's output directory. Only rank 0 creates it and writes to it unless a method says
    otherwise; other ranks hold the same ``path`` so they may write rank-specific files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._metrics = path / METRICS

    @classmethod
    def create(cls, runs_dir: str, job_name: str) -> RunDir:
        """Make a fresh, uniquely named directory (not collective)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root = Path(runs_dir)
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = root / (f"{job_name}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a run directory under {root}")

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write(self.path / name, dumps(obj))

    def write_toml(self, name: str, obj: dict[str, Any]) -> Path:
        return atomic_write(self.path / name, tomli_w.dumps(obj))

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write(self.path / name, text)

    def log_metrics(self, **record: Any) -> None:
        """Append one JSON line (one ``write`` call, flushed). A refused write raises
        ``OSError`` whose ``filename`` is the metrics file."""
        line = json.dumps(record, default=_default) + "\n"
        try:
            with open(self._metrics, "a") as fh:
                fh.write(line)
                fh.flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self._metrics)) from None
