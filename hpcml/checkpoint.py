"""Checkpoints: one step directory per checkpoint, complete or absent, loaded without running code.

Layout under a run directory::

    checkpoint/latest                      "step-000000120\\n", replaced atomically, last
    checkpoint/step-000000120/manifest.json  format, step, ranks, config hash, sha256 per file
    checkpoint/step-000000120/shared.pt      state every rank shares (e.g. model, optimizer)
    checkpoint/step-000000120/rank-00003.pt  rank 3's own state (its RNG streams, ...)

:func:`save` (collective) writes every file into ``step-....tmp``, fsyncs them, and rank 0 then
writes the manifest (with the files' sha256), renames the directory to its final name, replaces
``latest`` and removes older step directories. A job killed at any moment leaves ``latest``
naming a complete checkpoint, or the previous one, or none; never a mix of steps.

Payloads are nested dicts, lists and tuples of tensors, ints, floats, bools, strings and None
(e.g. ``model.state_dict()``, ``optimizer.state_dict()``, :func:`rng_state`). They are written
with ``torch.save`` and read with ``torch.load(weights_only=True)``, which rebuilds only those
types and refuses any other pickled object, so a crafted checkpoint cannot execute code.

Reading: :func:`latest` parses the pointer and manifest (JSON only); :func:`read` verifies the
hashes of ``shared.pt`` and this rank's file and loads them. Every problem is a one-line
``UsageError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from hpcml.comm import Communicator
from hpcml.errors import UsageError
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
    """A verified, loaded checkpoint: ``shared`` and this rank's ``local`` payload."""

    manifest: Manifest
    shared: dict[str, Any]
    local: dict[str, Any]

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


def save(comm: Communicator, run_dir: Path, step: int, shared: dict[str, Any],
         local: dict[str, Any], config_hash: str) -> Path:
    """Write the checkpoint of ``step``: ``shared`` from rank 0, ``local`` from every rank.
    Collective over ``comm`` (all ranks of the job). Returns the step directory on every rank."""
    root = Path(run_dir) / DIRNAME
    name = f"step-{step:09d}"
    tmp = root / f"{name}.tmp"
    if comm.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    comm.barrier()
    files = {rank_file(comm.rank): _write_payload(tmp / rank_file(comm.rank), local)}
    if comm.rank == 0:
        files[SHARED] = _write_payload(tmp / SHARED, shared)
    gathered = comm.gather(files)
    final = root / name
    if comm.rank == 0:
        manifest = {"format": FORMAT, "step": step, "ranks": comm.size,
                    "config_hash": config_hash,
                    "files": {k: v for part in gathered for k, v in sorted(part.items())}}
        atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        _fsync_dir(tmp)
        n = 0
        while final.exists():  # the same step saved twice (e.g. a resumed run that stops at once)
            n += 1
            final = root / f"{name}-{n}"
        os.rename(tmp, final)
        _fsync_dir(root)
        atomic_write(root / "latest", final.name + "\n")
        for old in root.iterdir():
            if old.is_dir() and old.name.startswith("step-") and old != final:
                shutil.rmtree(old, ignore_errors=True)
    return Path(comm.bcast(str(final)))


def latest(run_dir: Path) -> Manifest | None:
    """The manifest of the checkpoint ``run_dir/checkpoint/latest`` names; None when there is
    no pointer (no checkpoint completed). Not collective; reads JSON only."""
    root = Path(run_dir) / DIRNAME
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if "/" in name or not name.startswith("step-") or not (path / "manifest.json").is_file():
        raise UsageError(f"{pointer}: names {name!r}, which is not a complete checkpoint "
                         "directory (the checkpoint is damaged; start a new run)")
    try:
        raw = json.loads((path / "manifest.json").read_text())
        manifest = Manifest(path, int(raw["step"]), int(raw["ranks"]), str(raw["config_hash"]),
                            {str(k): str(v) for k, v in raw["files"].items()})
        fmt = raw["format"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path / 'manifest.json'}: unreadable checkpoint manifest "
                         f"({type(exc).__name__}: {exc})") from None
    if fmt != FORMAT:
        raise UsageError(f"{path / 'manifest.json'}: checkpoint format {fmt!r}, this hpcml "
                         f"reads format {FORMAT}")
    if not name.startswith(f"step-{manifest.step:09d}"):
        raise UsageError(f"{path / 'manifest.json'}: says step {manifest.step}, but it is in "
                         f"{name} (the checkpoint is damaged; start a new run)")
    return manifest


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
                    _load(manifest.path / rank_file(rank), manifest.files.get(rank_file(rank))))


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
