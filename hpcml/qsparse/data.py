"""The data and model of the Qsparse jobs: scikit-learn's bundled *digits* set in HDF5, and a
small MLP.

``data/qsparse/digits.h5`` holds the 1,797 8x8 digit images (pixel values 0..16, uint8) split
once, deterministically (seeded permutation, 360 test images), into ``train/x``, ``train/y``,
``test/x``, ``test/y``. Recreate it (byte-identical arrays) with::

    python -m hpcml.qsparse.data data/qsparse/digits.h5

Workers read the same file; :func:`shard` gives worker ``w`` of ``W`` its contiguous block of
the training set and :func:`batch_indices` its minibatch at step ``t`` as a pure function of
``(seed, w, t)``, so any rank (and a single-process reference) can recompute any batch.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from hpcml.comm import chunk_bounds
from hpcml.errors import UsageError
from hpcml.rundir import atomic_write

TEST_SIZE = 360
SPLIT_SEED = 20190606


@dataclasses.dataclass
class Split:
    """Features scaled to [0, 1] (float32, shape (n, 64)) and int64 labels 0..9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def write_digits(path: str | Path) -> Path:
    """Write the deterministic digits split to ``path`` (HDF5, atomically)."""
    import io

    import h5py
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = bunch.data.astype(np.uint8), bunch.target.astype(np.uint8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        h5.attrs["source"] = "sklearn.datasets.load_digits (UCI optical digits, 8x8)"
        h5.attrs["split_seed"] = SPLIT_SEED
        for name, idx in (("train", train), ("test", test)):
            h5.create_dataset(f"{name}/x", data=x[idx], compression="gzip")
            h5.create_dataset(f"{name}/y", data=y[idx], compression="gzip")
    return atomic_write(path, buf.getvalue())


# dataset -> (shape after the first axis, lowest value, highest value)
LAYOUT = {"train/x": ((64,), 0, 16), "train/y": ((), 0, 9), "test/x": ((64,), 0, 16),
          "test/y": ((), 0, 9)}


def validate_digits(path: str | Path, workers: int = 1) -> None:
    """Check a digits file as :func:`write_digits` writes it: every dataset of :data:`LAYOUT`
    present, numeric (labels integer), of shape (n, 64) / (n,) with matching n >= 1 per split
    (n >= ``workers`` for the training split, so that every worker's shard has an example),
    values inside the layout's range. Raises a one-line ``UsageError`` naming the file and the
    dataset (not collective; the file is small, so every rank checks all of it)."""
    import h5py

    p = Path(path)
    fix = f"recreate it with `python -m hpcml.qsparse.data {p}`"
    if not p.is_file():
        raise UsageError(f"data.path: {str(p)!r} not found ({fix})")
    name = "the file"
    try:
        with h5py.File(p, "r") as h5:
            for name, (tail, lo, hi) in LAYOUT.items():
                ds = h5.get(name)
                integer = name.endswith("/y")
                what = (f"{'integer' if integer else 'numeric'} array of shape "
                        f"{f'(n, {tail[0]})' if tail else '(n,)'} in [{lo}, {hi}]")
                if not isinstance(ds, h5py.Dataset):
                    got = "nothing" if ds is None else "a group"
                elif ds.dtype.kind not in ("iu" if integer else "iuf"):
                    got = f"dtype {ds.dtype}"
                elif ds.shape[1:] != tail or ds.shape[0] < 1:
                    got = f"shape {ds.shape}"
                elif name.startswith("train/") and ds.shape[0] < workers:
                    what = f"at least one example for each of the {workers} workers"
                    got = f"{ds.shape[0]} examples"
                elif integer and ds.shape[0] != h5[name.replace("/y", "/x")].shape[0]:
                    images = h5[name.replace("/y", "/x")].shape[0]
                    got = f"{ds.shape[0]} labels for {images} images"
                else:
                    values = np.asarray(ds)
                    if values.min() >= lo and values.max() <= hi and np.isfinite(values).all():
                        continue
                    got = f"values in [{values.min()}, {values.max()}]"
                raise UsageError(f"data.path: {p}: dataset {name!r}: expected {what}, got {got} "
                                 f"({fix})")
    except OSError as exc:
        raise UsageError(f"data.path: {p}: cannot read {name} ({exc}); {fix}") from None


def load_digits_h5(path: str | Path) -> Split:
    """Read a file written by :func:`write_digits`; ``UsageError`` naming the fix otherwise."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"data.path: {str(p)!r} not found (create it with `python -m "
                         f"hpcml.qsparse.data {p}`)")
    try:
        with h5py.File(p, "r") as h5:
            arrays = [np.asarray(h5[k]) for k in ("train/x", "train/y", "test/x", "test/y")]
    except (OSError, KeyError) as exc:
        raise UsageError(f"data.path: {p} is not a digits HDF5 file ({exc}); recreate it with "
                         f"`python -m hpcml.qsparse.data {p}`") from None
    xt, yt, xs, ys = arrays
    return Split(torch.from_numpy(xt.astype(np.float32) / 16.0), torch.from_numpy(yt.astype(
        np.int64)), torch.from_numpy(xs.astype(np.float32) / 16.0),
        torch.from_numpy(ys.astype(np.int64)))


def shard(n: int, workers: int, worker: int) -> tuple[int, int]:
    """[start, stop) of worker ``worker``'s block of ``n`` training examples."""
    return chunk_bounds(n, workers, worker)


def batch_indices(seed: int, worker: int, step: int, shard_size: int, batch: int) -> np.ndarray:
    """Worker ``worker``'s minibatch at ``step``: ``batch`` indices into its shard, drawn with
    replacement from a stream seeded by ``(seed, worker, step)``."""
    return np.random.default_rng([seed, worker, step]).integers(0, shard_size, size=batch)


def mlp(hidden: list[int], seed: int, inputs: int = 64, classes: int = 10,
        dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """``inputs -> hidden... -> classes`` with ReLU, initialized from ``seed``."""
    torch.manual_seed(seed)
    sizes = [inputs, *hidden, classes]
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(dtype)


def mlp_dimension(hidden: list[int], inputs: int = 64, classes: int = 10) -> int:
    """Number of parameters ``d`` of :func:`mlp` (no torch needed)."""
    sizes = [inputs, *hidden, classes]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``(x, y)``."""
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    return float((logits.argmax(dim=1) == y).float().mean().item()), loss


if __name__ == "__main__":
    print(write_digits(sys.argv[1] if len(sys.argv) > 1 else "data/qsparse/digits.h5"))
