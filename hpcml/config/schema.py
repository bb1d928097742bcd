"""Job files are TOML validated against dataclasses.

A schema is a dataclass whose fields are made with :func:`option` (default, help text, bounds,
allowed choices) and whose nested sections are dataclasses too. :func:`build` walks a TOML table
against it and raises :class:`~hpcml.errors.ConfigError` naming the dotted key at the first
unknown key, wrong type or out-of-range value. A schema may define ``check(self, size)`` for
rules that span fields or depend on the number of ranks; it raises ``ConfigError`` too.

Rules every value obeys whatever its option says: integers fit :data:`INT_MAX` (unless the
option sets ``max``), numbers are finite floats, strings hold no control characters (a NUL, a
newline or an escape sequence is never a legitimate name, path or choice), and a value quoted in
an error message is cut to :data:`SHOWN_CHARS` characters, so every message stays one line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from hpcml.errors import CONTROL, ConfigError, UsageError

T = TypeVar("T")

# the largest integer any key takes unless its option sets ``max``: counts, sizes and steps fit
# a C int (MPI counts, torch shapes and HDF5 offsets are checked against it downstream)
INT_MAX = 2**31 - 1
# the longest quotation of a value in an error message
SHOWN_CHARS = 60


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A rule a string option must match in full: ``regex`` and, for the error message, what it
    ``says`` in words."""

    regex: str
    says: str


# a file or directory name made by hpcml from a user's value: no separators, no hidden or
# option-like names, short enough for any filesystem once a timestamp is appended
SAFE_NAME = Pattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}",
                    "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit")


def option(
    default: Any,
    *,
    help: str = "",
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    choices: typing.Sequence[Any] | None = None,
    nonempty: bool = False,
    pattern: Pattern | None = None,
) -> Any:
    """A schema field: ``default`` plus its validation rules (inclusive ``min``/``max``,
    exclusive ``gt``, allowed ``choices``, a list that must be ``nonempty``, a ``pattern`` a
    non-empty string must match); list defaults are copied per instance. Integers without
    ``max`` are bounded by :data:`INT_MAX`; floats must be finite."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "choices": choices,
            "nonempty": nonempty, "pattern": pattern}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default),
                                 metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class JobConfig:
    """Keys every job file has. Capability schemas subclass this and add their sections."""

    kind: str = option("", help="which job this file describes, e.g. 'bench-collectives'")
    name: str = option("", help="run directory prefix; defaults to the kind", pattern=SAFE_NAME)
    seed: int = option(0, help="base seed; every rank derives its own streams from it", min=0)
    threads: int = option(0, help="torch intra-op threads per rank; 0 = cores / ranks per node",
                          min=0)
    runs_dir: str = option("runs", help="where run directories are created")
    watchdog_timeout: float = option(600.0, min=0.0, help="seconds a rank may stay blocked in "
                                     "one communication call before the job is ended "
                                     "(hpcml.comm.watchdog; 0 = off; HPCML_WATCHDOG_TIMEOUT "
                                     "wins)")

    def check(self, size: int) -> None:
        """Cross-field validation that may depend on the number of ranks ``size``."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def shown(value: Any) -> str:
    """``repr(value)`` for an error message: one line, cut to :data:`SHOWN_CHARS` characters
    (a 400-digit integer is shown by its first digits and its length). Pure."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**SHOWN_CHARS:
        text = str(value)
        return f"{text[:12]}... ({len(text.lstrip('-'))} digits)"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


# a key quoted as it is in an error message; any other is shown by its repr
_PLAIN_KEY = re.compile(rf"[A-Za-z0-9_-]{{1,{SHOWN_CHARS}}}")


def _check_text(key: str, value: str) -> str:
    bad = CONTROL.search(value)
    if bad:
        raise ConfigError(key, f"contains the control character {bad.group()!r} at position "
                          f"{bad.start()}, got {shown(value)}", "remove it")
    return value


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list of {_type_name(inner)}, got {shown(value)}")
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {shown(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table [{key}], got {shown(value)}")
        return build(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {shown(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(key, f"must be a finite number, got {shown(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {shown(value)}")
        return _check_text(key, value)
    raise TypeError(f"schema type {tp!r} of {key} is not supported")


def _check_bounds(key: str, meta: typing.Mapping[str, Any], value: Any) -> None:
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value and meta.get("nonempty"):
        raise ConfigError(key, "must list at least one value, got []",
                          "list one or more, or leave the key out for the default")
    choices = meta.get("choices")
    pattern = meta.get("pattern")
    for item in items:
        if choices is not None and item not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(key, f"must be one of {allowed}, got {shown(item)}")
        if pattern is not None and item and not re.fullmatch(pattern.regex, item):
            raise ConfigError(key, f"{shown(item)} is not allowed", f"use {pattern.says}")
        if not isinstance(item, int | float) or isinstance(item, bool):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(key, f"must be a finite number, got {item!r}")
        if isinstance(item, int) and meta.get("max") is None and item > INT_MAX:
            raise ConfigError(key, f"must be <= {INT_MAX}, got {shown(item)}")
        if isinstance(item, int) and meta.get("min") is None and item < -INT_MAX - 1:
            raise ConfigError(key, f"must be >= {-INT_MAX - 1}, got {shown(item)}")
        if meta.get("min") is not None and item < meta["min"]:
            raise ConfigError(key, f"must be >= {meta['min']}, got {shown(item)}")
        if meta.get("max") is not None and item > meta["max"]:
            raise ConfigError(key, f"must be <= {meta['max']}, got {shown(item)}")
        if meta.get("gt") is not None and item <= meta["gt"]:
            raise ConfigError(key, f"must be > {meta['gt']}, got {shown(item)}")


def build(cls: type[T], data: typing.Mapping[str, Any], prefix: str = "") -> T:
    """Validate ``data`` against schema ``cls`` and return the instance.

    Raises ``ConfigError`` for an unknown key (listing the allowed ones), a value of the wrong
    type, or a value outside the field's bounds or choices."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            where = f"[{prefix}]" if prefix else "the top level"
            name = key if _PLAIN_KEY.fullmatch(key) else shown(key)
            raise ConfigError(_join(prefix, name), f"unknown key in {where}; allowed: {allowed}")
    values = {}
    for name, value in data.items():
        key = _join(prefix, name)
        coerced = _coerce(key, hints[name], value)
        _check_bounds(key, fields[name].metadata, coerced)
        values[name] = coerced
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain TOML-writable data (``None`` values dropped)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1). The value is read as TOML, and as a plain
    string when it is not valid TOML (so ``--set name=foo`` needs no quotes)."""
    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=0.1")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # not TOML, or an integer or nesting Python refuses
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``KEY=VALUE`` override set (dotted keys nest)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        table = out
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise UsageError(f"--set {text!r}: {part} is not a table")
        table[path[-1]] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a job file; a missing file or TOML syntax error becomes a one-line ``UsageError``."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"job file {str(p)!r} is a directory (give the path to a .toml file, "
                         "e.g. jobs/bench-collectives.toml)")
    if not p.is_file():
        raise UsageError(f"job file {str(p)!r} not found (give the path to a .toml file, e.g. "
                         "jobs/bench-collectives.toml)")
    try:
        return tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p}: not a UTF-8 text file (byte {exc.start} is not UTF-8); a job "
                         "file is TOML text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{p}: invalid TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # parsed as TOML, but Python refuses the value
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise UsageError(f"{p}: a value Python cannot hold: {what} (shorten it)") from None
    except OSError as exc:
        raise UsageError(f"job file {str(p)!r} cannot be read: {exc.strerror}") from None


def load_job_file(cls: type[T], data: typing.Mapping[str, Any], source: str, size: int) -> T:
    """Build and cross-check a job config; errors are prefixed with ``source`` (the file name)."""
    try:
        config = build(cls, data)
        config.check(size)  # type: ignore[attr-defined]
    except ConfigError as exc:
        raise UsageError(f"{source}: {exc}") from None
    return config
