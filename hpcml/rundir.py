"""Run directories: ``runs/<job>-<timestamp>/`` with config, environment, metrics, ledger and
summary. Every whole-file write is atomic (temporary file in the same directory + rename), so a
killed job never leaves a half-written result; metrics are JSON lines appended one complete line
per write, and a reader drops a trailing partial line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl file (a torn last line is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


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
