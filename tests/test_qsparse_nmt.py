"""Qsparse-local-SGD training the hpcml.nmt transformer (``[qsparse]`` in a transformer-nmt job):
equivalence with data-parallel SGD at H = 1 with the identity compressor, exact bit counts of a
compressed run, exact resume from a checkpoint, and bad sections exiting 2."""

import json
import math
from pathlib import Path

import pytest
import torch

from hpcml import checkpoint
from hpcml.nmt.data import TrainStream, read_shard, read_vocab
from hpcml.nmt.model import Transformer
from hpcml.nmt.qsparse import QsparseSection, accounting, qsparse_optimizer
from hpcml.nmt.step import train_step
from hpcml.parallel import DistributedOptimizer
from hpcml.qsparse.train import CompressorConfig
from hpcml.testing import hpcml_cli, mpi_test

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "qsparse-transformer.toml")
CORPUS = str(ROOT / "data" / "nmt" / "numbers-en-fr.h5")
TINY = ["model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
        "train.batch_size=8", "train.warmup=4", "eval.batch_size=64", "eval.bleu=false",
        f"data.path='{CORPUS}'"]
# Hand count for TINY over the 63-token vocabulary: embedding 63*16 = 1008; encoder layer
# 4*16*16+4*16 (attention) + 16*32+32 + 32*16+16 (feed-forward) + 2*2*16 (norms) = 2224;
# decoder layer 2*(4*16*16+4*16) + 1072 + 3*2*16 = 3344; two final norms 2*2*16 = 64.
TINY_D = 1008 + 2224 + 3344 + 64


def _tiny_model(vocab: int, sparse: bool = True) -> Transformer:
    torch.manual_seed(0)
    return Transformer(vocab, 16, 2, 1, 32, dropout=0.1, sparse=sparse)


def _train(comm, model, optimizer, steps: int) -> None:
    stream = TrainStream(read_shard(CORPUS, "train", comm.rank, comm.size), 8 // comm.size,
                         comm.size, 0, comm.rank)
    torch.manual_seed(100 + comm.rank)
    for step in range(steps):
        train_step(comm, model, stream.batch(step), optimizer, 0.1, 0.5)


@mpi_test(ranks=[1, 2], in_process=True)
def test_identity_h1_equals_data_parallel_sgd(comm):
    vocab = len(read_vocab(CORPUS))
    dense = _tiny_model(vocab)
    _train(comm, dense, DistributedOptimizer(torch.optim.SGD(dense.parameters(), lr=1.0), dense,
                                             comm=comm), 3)
    qmodel = _tiny_model(vocab, sparse=False)  # as the trainer builds it for qsparse runs
    section = QsparseSection(enabled=True, H=1, compressor=CompressorConfig(name="identity"))
    qs = qsparse_optimizer(comm, qmodel, torch.optim.SGD(qmodel.parameters(), lr=1.0), section,
                           0)
    _train(comm, qmodel, qs, 3)
    assert qs.syncs == 3 and qs.bits_sent == 3 * 32 * TINY_D == \
        accounting(qs, 3)["dense_allreduce_bits_per_worker"]
    moved = 0.0
    for (name, a), b, x0 in zip(dense.named_parameters(), qmodel.parameters(),
                                _tiny_model(vocab).parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((a - x0).abs().max()))
    assert moved > 1e-2  # the runs trained: equality is not that of two untouched models


def test_compressed_run_bits_equal_the_hand_count(tmp_path):
    runs = tmp_path / "runs"
    k, s, H, steps = 50, 3, 2, 4
    args = [f"--set={kv}" for kv in [*TINY, f"runs_dir='{runs}'", f"train.steps={steps}",
                                      "eval.valid_every=2", f"qsparse.H={H}",
                                      "qsparse.compressor.name='qtopk'",
                                      f"qsparse.compressor.k={k}", f"qsparse.compressor.s={s}"]]
    res = hpcml_cli(2, "run", JOB, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (run,) = runs.iterdir()
    bits = json.loads((run / "summary.json").read_text())["qsparse"]
    # QTop-k: k indices of ceil(log2 d) bits, one float32 norm, k (sign + ceil(log2(s+1))) bits
    per_sync = k * math.ceil(math.log2(TINY_D)) + 32 + k * (1 + math.ceil(math.log2(s + 1)))
    assert per_sync == 50 * 13 + 32 + 50 * 3
    assert bits["d"] == TINY_D and bits["syncs"] == steps // H
    assert bits["bits_per_sync"] == per_sync
    assert bits["bits_per_worker"] == steps // H * per_sync
    assert bits["dense_allreduce_bits_per_worker"] == steps * 32 * TINY_D
    ledger = json.loads((run / "ledger.json").read_text())["ranks"]
    for rank in ledger:  # what moved is the payload: ceil(bits / 8) bytes per sync
        assert rank["Allgatherv"]["bytes_sent"] == steps // H * math.ceil(per_sync / 8)


def test_resume_equals_uninterrupted_run(tmp_path):
    """Per-rank Adam moments, error memories and Rand-k streams are checkpointed: 4 + 4 steps
    after --resume end bit-identical to 8 uninterrupted steps."""
    base = [*TINY, "eval.valid_every=2", "eval.checkpoint_every=0", "qsparse.H=2",
            "qsparse.compressor.name='qrandk'", "qsparse.compressor.k=50"]
    runs = {}
    for name, steps in (("full", 8), ("part", 4)):
        args = [f"--set={kv}" for kv in [*base, f"runs_dir='{tmp_path / name}'",
                                          f"train.steps={steps}"]]
        res = hpcml_cli(2, "run", JOB, *args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        (runs[name],) = (tmp_path / name).iterdir()
    args = [f"--set={kv}" for kv in [*base, f"runs_dir='{tmp_path / 'part'}'", "train.steps=8"]]
    res = hpcml_cli(2, "run", JOB, *args, "--resume", str(runs["part"]), "--allow-config-change",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resumed from step 4" in res.stdout
    for rank in (0, 1):
        a, b = (checkpoint.read(checkpoint.latest(runs[n]), rank).local["rank_state"]
                for n in ("full", "part"))
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (rank, key)
        qa, qb = a["optimizer"]["qsparse"], b["optimizer"]["qsparse"]
        assert torch.equal(qa["memory"], qb["memory"]) and qa["memory"].abs().sum() > 0
        assert qa["syncs"] == qb["syncs"] == 4


@pytest.mark.parametrize("override, message", [
    ("qsparse.H=3", "qsparse.H: H = 3 does not divide train.steps = 4"),
    ("qsparse.compressor.k=7000", f"qsparse.compressor.k: k = 7000 exceeds the model dimension "
                                  f"d = {TINY_D}"),
    ("qsparse.compressor.s=0", "qsparse.compressor.s: must be >= 1"),
])
def test_bad_qsparse_section_exits_2_with_one_line(tmp_path, override, message):
    runs = tmp_path / "runs"
    args = [f"--set={kv}" for kv in [*TINY, f"runs_dir='{runs}'", "train.steps=4",
                                      "eval.valid_every=4", override]]
    res = hpcml_cli(1, "run", JOB, *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not runs.exists()
