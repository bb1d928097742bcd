"""Checkpoints: one step directory per checkpoint, complete or absent, loaded without running code.

Layout under a run directory::

    checkpoint/latest                      "step-000000120\\n", replaced atomically, last
    checkpoint/step-000000120/manifest.json  format, step, ranks, config hash, sha256 per file
    checkpoint/step-000000120/shared.pt      state every rank shares (e.g. model, optimizer)
    checkpoint/step-000000120/rank-00003.pt  rank 3's own state (its RNG streams, ...)

:func:`save` (collective) writes every file into ``step-....tmp``, fsyncs them, and rank 0 then
writes the manifest (with the files' sha256), renames the directory to its final name, replaces
``latest`` and removes older step directories. A job killed at any moment leaves ``latest``
naming a complete checkpoint, or the previous one, or none; never a mix of steps. A write the
filesystem refuses (full disk) removes the ``.tmp`` directory and raises ``StorageError`` on
every rank, leaving ``latest`` and the previous checkpoint as they were.

Payloads are nested dicts, lists and tuples of tensors, ints, floats, bools, strings and None
(e.g. ``model.state_dict()``, ``optimizer.state_dict()``, :func:`rng_state`). They are written
with ``torch.save`` and read with ``torch.load(weights_only=True)``, which rebuilds only those
types and refuses any other pickled object, so a crafted checkpoint cannot execute code.

Reading: :func:`latest` parses the pointer and manifest (JSON only, every field type- and
range-checked); :func:`read` verifies the hashes of ``shared.pt`` and this rank's file and loads
them; :func:`require` and :func:`check_rng_state` let a kind check that a payload has what it
will read. Every problem is a one-line ``UsageError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpcml.comm import Communicator
from hpcml.errors import STORAGE_ERRNOS, StorageError, UsageError, describe_os_error
from hpcml.rundir import atomic_write

DIRNAME = "checkpoint"
FORMAT = 1
SHARED = "shared.pt"


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys): equal configs, equal hashes (pure)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a checkpoint directory claims about itself (from ``manifest.json``)."""

    path: Path
    step: int
    ranks: int
    config_hash: str
    files: dict[str, str]  # file name -> sha256


@dataclasses.dataclass
class Restored:
    """A verified, loaded checkpoint: ``shared`` and rank ``rank``'s ``local`` payload."""

    manifest: Manifest
    shared: dict[str, Any]
    local: dict[str, Any]
    rank: int = 0

    @property
    def step(self) -> int:
        return self.manifest.step


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_payload(path: Path, payload: dict[str, Any]) -> str:
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _attempt(path: Path, action: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(action(), None)``, or ``(None, one line naming path)`` when the filesystem refuses
    the write (:data:`~hpcml.errors.STORAGE_ERRNOS`); other errors propagate."""
    try:
        return action(), None
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        return None, describe_os_error(path, exc)


def save(comm: Communicator, run_dir: Path, step: int, shared: dict[str, Any],
         local: dict[str, Any], config_hash: str) -> Path:
    """Write the checkpoint of ``step``: ``shared`` from rank 0, ``local`` from every rank.
    Collective over ``comm`` (all ranks of the job). Returns the step directory on every rank.

    When the filesystem refuses a write on any rank (full, read-only, over quota), the
    partial ``step-....tmp`` is removed, ``latest`` and the previous checkpoint are left as
    they were, and every rank raises :class:`~hpcml.errors.StorageError` with the same line."""
    root = Path(run_dir) / DIRNAME
    name = f"step-{step:09d}"
    tmp = root / f"{name}.tmp"
    error = None
    if comm.rank == 0:
        def start() -> None:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _, error = _attempt(tmp, start)
    error = comm.bcast(error)
    if error is None:
        files, error = _attempt(tmp / rank_file(comm.rank), lambda: {
            rank_file(comm.rank): _write_payload(tmp / rank_file(comm.rank), local)})
        if comm.rank == 0 and error is None:
            digest, error = _attempt(tmp / SHARED, lambda: _write_payload(tmp / SHARED, shared))
            files[SHARED] = digest
        gathered = comm.gather((files, error))
    final = root / name
    if comm.rank == 0:
        if error is None:
            error = next((e for _, e in gathered if e), None)
        if error is None:
            final, error = _attempt(tmp, lambda: _publish(comm.size, root, tmp, name, step,
                                                           config_hash, gathered))
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    outcome = comm.bcast((str(final), error))
    if outcome[1] is not None:
        raise StorageError(f"{outcome[1]} while saving the checkpoint of step {step}; the "
                           "partial checkpoint was removed and the previous one is untouched")
    return Path(outcome[0])


def _publish(size: int, root: Path, tmp: Path, name: str, step: int, config_hash: str,
             gathered: list[tuple[dict[str, str], str | None]]) -> Path:
    """Rank 0: manifest, rename to the final name, point ``latest`` at it, remove older step
    directories and stale temporary pointers. Returns the final directory."""
    manifest = {"format": FORMAT, "step": step, "ranks": size, "config_hash": config_hash,
                "files": {k: v for part, _ in gathered for k, v in sorted(part.items())}}
    atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    _fsync_dir(tmp)
    final, n = root / name, 0
    while final.exists():  # the same step saved twice (e.g. a resumed run that stops at once)
        n += 1
        final = root / f"{name}-{n}"
    os.rename(tmp, final)
    try:
        _fsync_dir(root)
        atomic_write(root / "latest", final.name + "\n")
    except OSError:
        shutil.rmtree(final, ignore_errors=True)  # never named by ``latest``
        raise
    for old in root.iterdir():
        if old.is_dir() and old.name.startswith("step-") and old != final:
            shutil.rmtree(old, ignore_errors=True)
        elif old.name.startswith(".latest.") and old.name.endswith(".tmp"):
            old.unlink(missing_ok=True)  # left by a job killed while replacing ``latest``
    return final


POINTER = re.compile(r"step-[0-9]{9}(-[0-9]{1,6})?")
SHA256 = re.compile(r"[0-9a-f]{64}")
PAYLOAD_FILE = re.compile(rf"{re.escape(SHARED)}|rank-[0-9]{{5}}\.pt")
LARGEST = 2**31 - 1  # steps and rank counts of a job fit a C int


def _damaged(path: Path, problem: str) -> UsageError:
    return UsageError(f"{path}: {problem} (the checkpoint is damaged; start a new run, or "
                      "restore the run directory from a copy)")


def _count(raw: dict[str, Any], key: str, low: int) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= LARGEST:
        raise ValueError(f"{key!r} is {value!r}, expected an integer in [{low}, {LARGEST}]")
    return value


def _parse_manifest(path: Path, name: str) -> Manifest:
    raw = json.loads(path.read_bytes())
    if not isinstance(raw, dict):
        raise ValueError(f"a JSON {type(raw).__name__}, expected an object")
    if isinstance(raw.get("format"), bool) or raw.get("format") != FORMAT:
        raise ValueError(f"format {raw.get('format')!r}, this hpcml reads format {FORMAT}")
    digest, files = raw.get("config_hash"), raw.get("files")
    if not isinstance(digest, str):
        raise ValueError(f"'config_hash' is {digest!r}, expected a string")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and PAYLOAD_FILE.fullmatch(k) and isinstance(v, str)
            and SHA256.fullmatch(v) for k, v in files.items()):
        raise ValueError("'files' is not a table of payload file names to sha256 digests")
    manifest = Manifest(path.parent, _count(raw, "step", 0), _count(raw, "ranks", 1), digest,
                        dict(files))
    if not name.startswith(f"step-{manifest.step:09d}"):
        raise ValueError(f"says step {manifest.step}, but it is in {name}")
    return manifest


def latest(run_dir: Path) -> Manifest | None:
    """The manifest of the checkpoint ``run_dir/checkpoint/latest`` names; None when there is
    no pointer (no checkpoint completed). Not collective; reads JSON only. Every field is
    checked (types, ranges, names): a damaged pointer or manifest is a one-line
    ``UsageError`` naming the file."""
    root = Path(run_dir) / DIRNAME
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    try:
        data = pointer.read_bytes()
    except OSError as exc:
        raise _damaged(pointer, f"cannot be read ({exc.strerror})") from None
    name = data.decode("ascii", errors="replace").strip()
    if not POINTER.fullmatch(name) or not (root / name / "manifest.json").is_file():
        raise _damaged(pointer, f"names {data[:80]!r}, which is not a complete checkpoint "
                                "directory")
    path = root / name / "manifest.json"
    try:
        return _parse_manifest(path, name)
    except (ValueError, RecursionError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0][:200]
        raise _damaged(path, f"unreadable checkpoint manifest ({why})") from None


def mismatch(value: Any, template: Any, key: str = "") -> str | None:
    """Where ``value`` (a loaded payload) does not have the structure of ``template`` (what
    this version would save): a missing key, another type, or a tensor of another dtype or
    shape; None when it has. Keys beyond the template's are allowed; an empty dict or list in
    the template accepts any dict or list, a None accepts None or a number. Pure."""
    import torch

    here = key or "the payload"
    if isinstance(template, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            return f"{here} is a {type(value).__name__}, expected a tensor"
        if value.dtype != template.dtype or value.shape != template.shape:
            return (f"{here} is {value.dtype} of shape {tuple(value.shape)}, expected "
                    f"{template.dtype} of shape {tuple(template.shape)}")
        return None
    if isinstance(template, dict):
        if not isinstance(value, dict):
            return f"{here} is a {type(value).__name__}, expected a dict"
        for k, sub in template.items():
            name = f"{key}.{k}" if key else str(k)
            if k not in value:
                return f"{name} is missing"
            found = mismatch(value[k], sub, name)
            if found:
                return found
        return None
    if isinstance(template, list | tuple):
        if not isinstance(value, list | tuple):
            return f"{here} is {type(value).__name__} {value!r:.40}, expected a list"
        if not template:
            return None
        if len(value) != len(template):
            return f"{here} has {len(value)} items, expected {len(template)}"
        return next((m for i, (v, t) in enumerate(zip(value, template, strict=True))
                     if (m := mismatch(v, t, f"{key}[{i}]"))), None)
    if template is None:
        ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool))
    elif isinstance(template, bool):
        ok = isinstance(value, bool)
    elif isinstance(template, int | float):
        ok = isinstance(value, type(template)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(template))
    return None if ok else (f"{here} is {type(value).__name__} {value!r:.40}, expected "
                            f"{type(template).__name__}")


def require(payload: Any, template: Any, where: Path) -> None:
    """:func:`mismatch` as a one-line ``UsageError`` naming the file ``where``."""
    found = mismatch(payload, template)
    if found:
        raise UsageError(f"{where}: {found} (it was written by another version or config of "
                         "this job; resume with the same job file, or start a new run)")


def _load(path: Path, expected: str | None) -> dict[str, Any]:
    import torch

    if expected is None or not path.is_file():
        raise UsageError(f"{path}: missing from the checkpoint (the checkpoint is damaged)")
    if _sha256(path) != expected:
        raise UsageError(f"{path}: sha256 differs from the manifest's (the file is damaged or "
                         "was changed after the checkpoint was written)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: refused to load (only tensors and plain values may be in a "
                         f"checkpoint): {first}") from None
    if not isinstance(payload, dict):
        raise UsageError(f"{path}: holds a {type(payload).__name__}, not a checkpoint dict")
    return payload


def read(manifest: Manifest, rank: int) -> Restored:
    """Verify and load ``shared.pt`` and rank ``rank``'s file (not collective)."""
    return Restored(manifest, _load(manifest.path / SHARED, manifest.files.get(SHARED)),
                    _load(manifest.path / rank_file(rank), manifest.files.get(rank_file(rank))),
                    rank)


def check_rng_state(payload: Any, where: Path, key: str = "rng") -> None:
    """``payload[key]`` is what :func:`rng_state` returns and :func:`set_rng_state` accepts:
    same structure, dtypes and shapes, and a trial :func:`set_rng_state` succeeds (this
    process's RNG states are put back afterwards). Raises a one-line ``UsageError`` naming
    ``where``."""
    mine = rng_state()
    require(payload, {key: mine}, where)
    state = payload[key]
    n = state["numpy"]
    if not (0 <= n["pos"] <= len(mine["numpy"]["keys"]) and n["has_gauss"] in (0, 1)):
        # numpy accepts a position past its key array and then reads out of bounds
        raise UsageError(f"{where}: its numpy RNG state has position {n['pos']} and has_gauss "
                         f"{n['has_gauss']}, expected 0..{len(mine['numpy']['keys'])} and 0 or "
                         "1 (start a new run)")
    try:
        set_rng_state(state)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise UsageError(f"{where}: its RNG state is not valid ({str(exc).splitlines()[0]}; "
                         "start a new run)") from None
    finally:
        set_rng_state(mine)


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy (global) and Python RNG states as tensors and plain values."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()),
                     p["gauss_next"]))
