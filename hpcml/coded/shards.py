"""Streaming encoding from HDF5 (or any sliceable array) into one encoded HDF5 shard per worker.

:func:`encode_to_shards` reads ``chunk`` columns of the (n, p) input at a time, encodes them
(``S @ X[:, cols]``), and writes each worker's rows ``S_i X[:, cols]`` into ``shard-<i>.h5``;
the label vector is encoded the same way. Peak memory is O(rows x chunk), so an input larger
than memory is encoded as long as one column chunk fits. Shards are written to temporary names
and renamed when complete, so a failed encoding leaves no partial shard.
For model parallelism (features encoded) pass ``transpose=True``: X S.T is formed as
(S X.T).T from row chunks of X, and worker i's shard holds X S_i.T (n x ``|block i|``).
Sparse encoded data (collaborative filtering, :mod:`hpcml.coded.cf`) are written by
:func:`write_sparse_shards`: one shard per worker, one HDF5 group per half step, CSR matrices
as ``data``/``indices``/``indptr``/``shape`` datasets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcml.coded.encoders import Encoder
from hpcml.errors import UsageError


def open_input(path: str, x_key: str, y_key: str) -> tuple[h5py.File, Any, Any]:
    """Open an HDF5 input and its X (n, p) and y (n,) datasets; a missing file or dataset, or
    datasets of the wrong shape or dtype, is a one-line ``UsageError`` naming the field."""
    if not Path(path).is_file():
        raise UsageError(f"problem.path: HDF5 file {path!r} not found (give an existing .h5 file)")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise UsageError(f"problem.path: {path} is not a readable HDF5 file ({exc})") from None
    for field, key in (("problem.x_key", x_key), ("problem.y_key", y_key)):
        if not isinstance(fh.get(key), h5py.Dataset):
            names = ", ".join(sorted(fh.keys())) or "none"
            fh.close()
            raise UsageError(f"{field}: dataset {key!r} not in {path} (datasets there: {names})")
    x, y = fh[x_key], fh[y_key]
    problem = None
    if x.ndim != 2 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        problem = (f"needs X of shape (n, p) and y of shape (n,), got {x.shape} and "
                   f"{y.shape}")
    elif x.dtype.kind not in "iuf" or y.dtype.kind not in "iuf":
        problem = f"needs numeric X and y, got {x.dtype} and {y.dtype}"
    if problem is not None:
        fh.close()
        raise UsageError(f"problem.x_key: {path} {problem}")
    return fh, x, y


ROWS_PER_READ = 1 << 14


def check_input(path: str, x_key: str, y_key: str, kind: str) -> None:
    """Everything :func:`~hpcml.coded.problems.load_data` needs of an HDF5 input, read in
    blocks of rows (memory O(block x p)): :func:`open_input`'s shapes and dtypes, n >= 2 rows,
    every value finite, at least one non-constant column of X, and a y that standardizes (not
    constant; two classes for ``kind = 'logistic'``). Constant columns are allowed: the loader
    centres X and y, which fits an unpenalized intercept, so a constant column (e.g. a column
    of ones) carries nothing more and is dropped without changing the solution. Raises a
    one-line ``UsageError`` naming the field, the file and the fix (not collective)."""
    fh, x, y = open_input(path, x_key, y_key)
    with fh:
        n, p = x.shape
        if n < 2 or p < 1:
            raise UsageError(f"problem.x_key: {path}: X has shape {x.shape}; a regression needs "
                             "n >= 2 rows and p >= 1 columns (give the full data set)")
        lo, hi = np.full(p, np.inf), np.full(p, -np.inf)
        labels: set[float] = set()
        for start in range(0, n, ROWS_PER_READ):
            stop = min(start + ROWS_PER_READ, n)
            for field, key, block in (("problem.x_key", x_key, x[start:stop]),
                                      ("problem.y_key", y_key, y[start:stop])):
                bad = np.argwhere(~np.isfinite(np.asarray(block, dtype=np.float64)))
                if len(bad):
                    row = int(bad[0][0]) + start
                    cell = f"row {row}" + (f", column {int(bad[0][1])}" if block.ndim == 2 else "")
                    raise UsageError(f"{field}: {path}: dataset {key!r} holds "
                                     f"{block[tuple(bad[0])]} in {cell} and {len(bad) - 1} more "
                                     f"non-finite values in rows {start}..{stop - 1} (the solver "
                                     "needs finite numbers: drop or impute those rows)")
            block = np.asarray(x[start:stop], dtype=np.float64)
            lo, hi = np.minimum(lo, block.min(axis=0)), np.maximum(hi, block.max(axis=0))
            labels.update(np.unique(np.asarray(y[start:stop], dtype=np.float64))[:3].tolist())
            labels = set(sorted(labels)[:3])
        if not (hi > lo).any():
            raise UsageError(f"problem.x_key: {path}: every column of X is constant, so no "
                             "feature is left once the data are centred (give data whose "
                             "features vary)")
        if kind == "logistic" and len(labels) != 2:
            raise UsageError(f"problem.y_key: {path}: logistic regression needs exactly two "
                             f"classes in y, got {len(labels) if len(labels) < 3 else '3 or more'}"
                             " (give binary labels)")
        if len(labels) < 2:
            raise UsageError(f"problem.y_key: {path}: y is constant ({labels.pop()}), so it "
                             "cannot be standardized and there is nothing to fit (give the "
                             "targets)")


def shard_path(out_dir: str | Path, worker: int) -> Path:
    return Path(out_dir) / f"shard-{worker}.h5"


def encode_to_shards(x: Any, y: Any, encoder: Encoder, out_dir: str | Path, chunk: int = 64,
                     transpose: bool = False) -> list[Path]:
    """Encode (x, y) for ``encoder.m`` workers; returns the shard paths (not collective: call
    on one rank). Data parallel: shard i holds X = S_i x (rows_i, p) and y = S_i y. Model
    parallel (``transpose``): shard i holds X = x S_i.T (n, rows_i) and y = y unchanged."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, p = x.shape
    tmp = [out / f".shard-{i}.h5.tmp" for i in range(encoder.m)]
    files = [h5py.File(t, "w") for t in tmp]
    try:
        for i, fh in enumerate(files):
            rows = len(encoder.blocks[i])
            shape = (n, rows) if transpose else (rows, p)
            fh.create_dataset("X", shape=shape, dtype="f8",
                              chunks=(min(shape[0], 1024), max(1, min(shape[1], chunk))))
            fh.attrs.update(encoder=encoder.kind, beta=encoder.beta, m=encoder.m, worker=i,
                            transpose=transpose)
        if transpose:
            _encode_features(x, encoder, files, chunk)
            for fh in files:
                fh.create_dataset("y", data=np.asarray(y[:], dtype=np.float64))
        else:
            _encode_rows(x, encoder, files, chunk)
            ey = encoder.apply(np.asarray(y[:], dtype=np.float64)[:, None])[:, 0]
            for i, fh in enumerate(files):
                fh.create_dataset("y", data=ey[encoder.blocks[i]])
    except BaseException:
        for fh, t in zip(files, tmp, strict=True):
            fh.close()
            t.unlink(missing_ok=True)
        raise
    paths = []
    for i, (fh, t) in enumerate(zip(files, tmp, strict=True)):
        fh.close()
        os.replace(t, shard_path(out, i))
        paths.append(shard_path(out, i))
    return paths


def _encode_rows(x: Any, encoder: Encoder, files: list[h5py.File], chunk: int) -> None:
    for start in range(0, x.shape[1], chunk):
        stop = min(start + chunk, x.shape[1])
        enc = encoder.apply(np.asarray(x[:, start:stop], dtype=np.float64))
        for i, fh in enumerate(files):
            fh["X"][:, start:stop] = enc[encoder.blocks[i]]


def _encode_features(x: Any, encoder: Encoder, files: list[h5py.File], chunk: int) -> None:
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        enc = encoder.apply(np.asarray(x[start:stop], dtype=np.float64).T)
        for i, fh in enumerate(files):
            fh["X"][start:stop, :] = enc[encoder.blocks[i]].T


def load_shard(out_dir: str | Path, worker: int) -> tuple[np.ndarray, np.ndarray]:
    """(X_i, y_i) of worker ``worker``'s shard."""
    path = shard_path(out_dir, worker)
    if not path.is_file():
        raise UsageError(f"shard {path} not found (encode the data first)")
    with h5py.File(path, "r") as fh:
        return fh["X"][...], fh["y"][...]


def write_sparse_shards(sides: list[dict[str, dict[str, np.ndarray]]], out_dir: str | Path,
                        attrs: dict[str, Any]) -> list[Path]:
    """Write worker i's encoded sparse data, ``sides[i]`` = {group: {name: array}} (a CSR
    matrix as its ``data``/``indices``/``indptr``/``shape`` arrays plus any vectors), into
    ``shard-<i>.h5`` with one HDF5 group per entry (not collective: call on one rank). Each
    shard is written under a temporary name and renamed when complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, groups in enumerate(sides):
        tmp = out / f".shard-{i}.h5.tmp"
        try:
            with h5py.File(tmp, "w") as fh:
                fh.attrs.update(attrs, worker=i)
                for name, arrays in groups.items():
                    grp = fh.create_group(name)
                    for key, value in arrays.items():
                        grp.create_dataset(key, data=value)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, shard_path(out, i))
        paths.append(shard_path(out, i))
    return paths


def load_sparse_shard(out_dir: str | Path, worker: int) -> dict[str, dict[str, np.ndarray]]:
    """The {group: {name: array}} that :func:`write_sparse_shards` wrote for ``worker``."""
    path = shard_path(out_dir, worker)
    if not path.is_file():
        raise UsageError(f"shard {path} not found (encode the data first)")
    with h5py.File(path, "r") as fh:
        return {name: {key: grp[key][...] for key in grp} for name, grp in fh.items()}
