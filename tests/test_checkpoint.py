"""The checkpoint format (:mod:`hpcml.checkpoint`): one atomic step directory per checkpoint,
payloads of plain values and tensors round-trip exactly, damage and foreign objects are refused
with one line, and nothing in a checkpoint can execute code."""

import hashlib
import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from one_rank import OneRank

from hpcml import checkpoint
from hpcml.comm import Communicator
from hpcml.errors import UsageError
from hpcml.testing import mpi_test


class Exploit:
    """Unpickling this object would create ``marker`` (if anything ran it)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload(rank: int) -> dict:
    torch.manual_seed(rank)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), betas=(0.9, 0.98))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rank": rank,
            "history": [{"step": 1, "loss": 0.5}], "name": "x", "pair": (1, 2.5), "none": None,
            "nested": {"a": {"b": torch.arange(rank + 1)}}}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@mpi_test(ranks=[4], in_process=True)  # one rank: the one-process tests below
def test_save_and_read_round_trip(comm: Communicator):
    """Every rank's own payload and rank 0's shared payload come back equal (dtypes, tuples,
    optimizer state); a newer checkpoint replaces the pointer and removes the older directory."""
    import tempfile
    from pathlib import Path

    root = Path(comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None))
    first = checkpoint.save(comm, root, 3, payload(0), payload(comm.rank), "h1")
    second = checkpoint.save(comm, root, 7, {"w": torch.ones(2)}, payload(comm.rank), "h2")
    comm.barrier()
    assert (first.name, second.name) == ("step-000000003", "step-000000007")
    manifest = checkpoint.latest(root)
    assert (manifest.step, manifest.ranks, manifest.config_hash) == (7, comm.size, "h2")
    assert sorted(manifest.files) == sorted(
        ["shared.pt", *(checkpoint.rank_file(r) for r in range(comm.size))])
    restored = checkpoint.read(manifest, comm.rank)
    assert same(restored.local, payload(comm.rank)) and same(restored.shared, {"w": torch.ones(2)})
    assert not first.exists()
    assert sorted(p.name for p in (root / "checkpoint").iterdir()) == ["latest", "step-000000007"]
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(root)


def make(tmp_path, step=5):
    return checkpoint.save(OneRank(), tmp_path, step, {"w": torch.arange(4.0)}, {"r": 1}, "abc")


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    """A kill before the rename leaves only a ``.tmp`` directory, which ``latest`` never names;
    the next save of that step removes it."""
    make(tmp_path, 5)
    partial = tmp_path / "checkpoint" / "step-000000009.tmp"
    partial.mkdir()
    (partial / "shared.pt").write_bytes(b"half")
    assert checkpoint.latest(tmp_path).step == 5
    make(tmp_path, 9)
    assert checkpoint.latest(tmp_path).step == 9 and not partial.exists()


def test_no_pointer_means_no_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path) is None


@pytest.mark.parametrize("damage,expected", [
    ("flip a byte", "sha256 differs from the manifest's"),
    ("remove a file", "missing from the checkpoint"),
    ("pointer to nowhere", "is not a complete checkpoint directory"),
    ("manifest not json", "unreadable checkpoint manifest"),
    ("manifest of another step", "says step 6, but it is in step-000000005"),
])
def test_damage_is_refused_with_one_line(tmp_path, damage, expected):
    step_dir = make(tmp_path)
    if damage == "flip a byte":
        data = bytearray((step_dir / "shared.pt").read_bytes())
        data[-10] ^= 0xFF
        (step_dir / "shared.pt").write_bytes(bytes(data))
    elif damage == "remove a file":
        (step_dir / "rank-00000.pt").unlink()
    elif damage == "pointer to nowhere":
        (tmp_path / "checkpoint" / "latest").write_text("step-000000099\n")
    elif damage == "manifest not json":
        (step_dir / "manifest.json").write_text("{")
    else:
        raw = json.loads((step_dir / "manifest.json").read_text())
        (step_dir / "manifest.json").write_text(json.dumps({**raw, "step": 6}))
    with pytest.raises(UsageError) as exc:
        checkpoint.read(checkpoint.latest(tmp_path), 0)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def forge(step_dir, name: str, data: bytes) -> None:
    """Replace a checkpoint file and fix the manifest's hash, as an attacker could."""
    (step_dir / name).write_bytes(data)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("via", ["pickle", "torch.save"])
def test_malicious_checkpoint_runs_nothing(tmp_path, via):
    step_dir = make(tmp_path)
    marker = tmp_path / "pwned"
    if via == "pickle":
        data = pickle.dumps({"w": Exploit(str(marker))}, protocol=2)
    else:
        path = tmp_path / "evil.pt"
        torch.save({"w": Exploit(str(marker))}, path)
        data = path.read_bytes()
    forge(step_dir, "shared.pt", data)
    with pytest.raises(UsageError) as exc:
        checkpoint.read(checkpoint.latest(tmp_path), 0)
    assert "refused to load" in str(exc.value) and "\n" not in str(exc.value)
    assert not marker.exists()
    # the exploit is real: the same bytes do run code when unpickled without weights_only
    if via == "pickle":
        pickle.loads(data)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    checkpoint.set_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_config_hash_is_order_independent_and_value_sensitive():
    a = {"train": {"lr": 0.1, "steps": 3}, "seed": 1}
    b = {"seed": 1, "train": {"steps": 3, "lr": 0.1}}
    assert checkpoint.config_hash(a) == checkpoint.config_hash(b)
    assert checkpoint.config_hash(a) != checkpoint.config_hash({**a, "seed": 2})
