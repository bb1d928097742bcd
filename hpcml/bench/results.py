"""Results files: JSON lines that a benchmark accumulates over runs (its ``results`` key).

A results file is the one file outside its run directory that a bench writes, so it is held to
rules that keep every other file of the user's safe and every row ever written:

- :func:`check` (before the run, nothing written): the path ends in ``.jsonl`` (so a typo
  cannot aim at ``notes.md`` or a run's ``summary.json``), is not a directory, and its
  directory takes a file (path and errno otherwise); an existing file must be one this bench
  wrote: every line that parses as JSON is one of its rows, and at least one line is;
- :func:`append` never rewrites: the new rows go out in one ``write`` on an ``O_APPEND``
  descriptor, so rows that runs at other rank counts append concurrently never interleave and
  no existing line is lost; a torn last line (a killed writer) is closed with a newline first,
  so it stays the one torn line instead of swallowing the first new row;
- :func:`read` returns every row, in file order; lines that are not JSON (torn or edited) are
  skipped, left in place, and reported in one line naming the file and the line numbers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcml.errors import ConfigError
from hpcml.rundir import directory_problem

SUFFIX = ".jsonl"


def _scan(path: Path) -> tuple[list[tuple[int, Any]], list[int]]:
    """(line number, parsed JSON) of every line that parses, and the numbers of those that do
    not (1-based; blank lines are neither)."""
    parsed, bad = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            parsed.append((number, json.loads(raw.decode("utf-8"))))
        except (UnicodeDecodeError, ValueError, RecursionError):
            bad.append(number)
    return parsed, bad


def check(key: str, path: str, is_row: Callable[[Any], bool], owner: str) -> None:
    """Raise ``ConfigError`` (one line, naming ``key``) unless ``path`` can be the results file
    of ``owner`` (e.g. ``"bench reduction"``), whose rows ``is_row`` recognizes; see the module
    docstring. Reads only; not collective."""
    fix = f"give a new {SUFFIX} file or one that {owner} wrote"
    target = Path(path)
    if target.is_dir():
        raise ConfigError(key, f"{path!r} is a directory", fix)
    real = Path(os.path.realpath(target))
    if target.suffix != SUFFIX or real.suffix != SUFFIX:
        named = f"{path!r}" + (f" (a link to {str(real)!r})" if real.suffix != target.suffix
                               else "")
        raise ConfigError(key, f"{named} is not named *{SUFFIX} (a results file is JSON "
                          "lines; no other file may be aimed at)", fix)
    if not target.exists():
        problem = directory_problem(target.parent)
        if problem:
            raise ConfigError(key, f"cannot create {path!r}: {problem}", fix)
        return
    if not target.is_file():
        raise ConfigError(key, f"{path!r} is not a regular file", fix)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_APPEND))  # opens only: nothing is written
        parsed, _ = _scan(target)
    except OSError as exc:
        raise ConfigError(key, f"cannot append to {path!r}: {exc.strerror}", fix) from None
    foreign = next((number for number, obj in parsed if not is_row(obj)), None)
    if foreign is not None:
        raise ConfigError(key, f"{path!r} line {foreign} is not a row of {owner}", fix)
    if not parsed and target.stat().st_size:
        raise ConfigError(key, f"{path!r} holds no row of {owner}", fix)


def read(path: str | Path) -> list[dict[str, Any]]:
    """Every row of results file ``path`` in file order ([] when it does not exist). Lines that
    are not JSON are skipped and reported on stderr in one line (file and line numbers); the file
    is not changed. Not collective."""
    path = Path(path)
    if not path.exists():
        return []
    parsed, bad = _scan(path)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10
                                                  else "")
        sys.stderr.write(f"hpcml: warning: {path}: line{'s' if len(bad) > 1 else ''} {shown} "
                         "not JSON (a torn write or an edit): skipped, left in place\n")
        sys.stderr.flush()
    return [obj for _, obj in parsed]


def append(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to ``path`` (created if missing) as JSON lines, in one ``write`` on an
    ``O_APPEND`` descriptor; existing lines are never rewritten. Raises ``OSError`` when the
    filesystem refuses or writes short (a full disk). Not collective."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: wrote {written} of {len(data)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
