"""The example scripts against one process. examples/train_mlp.py, the plain-PyTorch use of
hpcml.parallel: at 2 ranks with 2 accumulated micro-batches it takes the same steps as one process
on the same global batches (parameter checksum equal up to float rounding), learns, and writes a
weights_only checkpoint. examples/heat_halo.py, bound halo exchanges: bit-for-bit the one-process
result."""

import re
import sys
from pathlib import Path

import pytest
import torch

from hpcml.testing import launch

SCRIPT = str(Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py")
LINE = re.compile(r"(\d+) ranks, (\d+) steps: test accuracy ([\d.]+), parameter checksum "
                  r"(-?[\d.]+)")


def _run(ranks, *args, cwd):
    res = launch(ranks, [sys.executable, SCRIPT, "--steps", "40", *args], timeout=180, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    match = LINE.search(res.stdout)
    assert match, res.stdout
    return float(match.group(3)), float(match.group(4))


def test_train_mlp_two_ranks_equal_one_process(tmp_path):
    ckpt = tmp_path / "mlp.pt"
    acc1, sum1 = _run(1, cwd=tmp_path)
    acc2, sum2 = _run(2, "--micro", "2", "--checkpoint", str(ckpt), cwd=tmp_path)
    assert sum2 == pytest.approx(sum1, rel=1e-4)
    assert acc1 > 0.8 and acc2 == pytest.approx(acc1, abs=0.01)  # chance is 0.1
    state = torch.load(ckpt, weights_only=True)
    assert state["model"]["0.weight"].shape == (128, 64) and state["optimizer"]["state"]


HEAT = str(Path(__file__).resolve().parents[1] / "examples" / "heat_halo.py")
HEAT_LINE = re.compile(r"(\d+) ranks, .*: max \|difference\| from one process ([\d.e+-]+); "
                       r"(\d+) bound sends, (\d+) bytes")


@pytest.mark.parametrize("ranks", [1, 3])
def test_heat_halo_exchange_equals_one_process_bit_for_bit(tmp_path, ranks):
    """examples/heat_halo.py: the rod split unevenly (100 cells over 3 ranks), ghost cells
    swapped through bound sends and receives for 300 steps, ends identical to the
    one-process computation; the ledger counts one 8-byte send per link and step."""
    res = launch(ranks, [sys.executable, HEAT, "--cells", "100", "--steps", "300"],
                 timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    match = HEAT_LINE.search(res.stdout)
    assert match, res.stdout
    links = 2 * (ranks - 1)
    assert (int(match.group(1)), float(match.group(2))) == (ranks, 0.0)
    assert (int(match.group(3)), int(match.group(4))) == (300 * links, 8 * 300 * links)
