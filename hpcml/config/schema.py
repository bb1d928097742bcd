"""Job files are TOML validated against dataclasses.

A schema is a dataclass whose fields are made with :func:`option` (default, help text, bounds,
allowed choices) and whose nested sections are dataclasses too. :func:`build` walks a TOML table
against it and raises :class:`~hpcml.errors.ConfigError` naming the dotted key at the first
unknown key, wrong type or out-of-range value. A schema may define ``check(self, size)`` for
rules that span fields or depend on the number of ranks; it raises ``ConfigError`` too.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from hpcml.errors import ConfigError, UsageError

T = TypeVar("T")

# the largest integer any key takes unless its option sets ``max``: counts, sizes and steps fit
# a C int (MPI counts, torch shapes and HDF5 offsets are checked against it downstream)
INT_MAX = 2**31 - 1


def option(
    default: Any,
    *,
    help: str = "",
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    choices: typing.Sequence[Any] | None = None,
) -> Any:
    """A schema field: ``default`` plus its validation rules (inclusive ``min``/``max``,
    exclusive ``gt``, allowed ``choices``); list defaults are copied per instance. Integers
    without ``max`` are bounded by :data:`INT_MAX`; floats must be finite."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "choices": choices}
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
    name: str = option("", help="run directory prefix; defaults to the kind")
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
            raise ConfigError(key, f"must be a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table [{key}], got {value!r}")
        return build(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp!r} of {key} is not supported")


def _check_bounds(key: str, meta: typing.Mapping[str, Any], value: Any) -> None:
    items = value if isinstance(value, list) else [value]
    choices = meta.get("choices")
    for item in items:
        if choices is not None and item not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(key, f"must be one of {allowed}, got {item!r}")
        if not isinstance(item, int | float) or isinstance(item, bool):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(key, f"must be a finite number, got {item!r}")
        if isinstance(item, int) and meta.get("max") is None and item > INT_MAX:
            raise ConfigError(key, f"must be <= {INT_MAX}, got {item!r}")
        if meta.get("min") is not None and item < meta["min"]:
            raise ConfigError(key, f"must be >= {meta['min']}, got {item!r}")
        if meta.get("max") is not None and item > meta["max"]:
            raise ConfigError(key, f"must be <= {meta['max']}, got {item!r}")
        if meta.get("gt") is not None and item <= meta["gt"]:
            raise ConfigError(key, f"must be > {meta['gt']}, got {item!r}")


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
            raise ConfigError(_join(prefix, key), f"unknown key in {where}; allowed: {allowed}")
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
    except tomllib.TOMLDecodeError:
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
