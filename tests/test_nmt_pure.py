"""Single-process tests of the NMT pieces that involve no communication."""

import os
import signal

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcml.errors import UsageError
from hpcml.nmt.corpus import generate, render, split_sizes
from hpcml.nmt.data import TrainStream, collate, read_shard, read_vocab
from hpcml.nmt.model import Transformer, noam_lr, smoothed_loss_sum
from hpcml.nmt.vocab import BOS, EOS, PAD, UNK, build_vocab, decode, detokenize, encode, tokenize
from hpcml.preemption import Preemption


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("nmt") / "c.h5", pairs=120, max_number=999, seed=5)


def test_tokenize_detokenize_roundtrip():
    for n in (0, 21, 71, 99, 1234, 80080, 99999):
        for text in (render(n)[0], render(n)[1]):
            assert tokenize(detokenize(text)) == text
    assert tokenize("Quatre-vingt-dix") == ["quatre", "-", "vingt", "-", "dix"]
    assert detokenize(["one", "thousand", ",", "two"]) == "one thousand, two"


def test_vocab_order_encode_decode():
    vocab = build_vocab([["b", "a", "b"], ["c", "a", "b"]])
    assert vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert vocab[4:] == ["b", "a", "c"]
    index = {t: i for i, t in enumerate(vocab)}
    assert encode(["a", "zz"], index) == [5, UNK]
    assert decode([BOS, 4, 5, PAD, EOS, 6], vocab) == ["b", "a"]


def test_corpus_deterministic_and_splits_disjoint(corpus, tmp_path):
    again = generate(tmp_path / "again.h5", pairs=120, max_number=999, seed=5)
    with h5py.File(corpus) as a, h5py.File(again) as b:
        for key in ("vocab", "train/src_ids", "train/tgt_offsets", "test/numbers"):
            assert np.array_equal(a[key][:], b[key][:])
        nums = [set(a[f"{s}/numbers"][:].tolist()) for s in ("train", "valid", "test")]
        assert sum(map(len, nums)) == 120 and len(set.union(*nums)) == 120
        vocab = [t.decode() for t in a["vocab"][:]]
        src, off = a["valid/src_ids"][:], a["valid/src_offsets"][:]
        first = int(a["valid/numbers"][0])
        toks = [vocab[i] for i in src[off[0]:off[1]]]
        assert toks == [t if t in vocab else "<unk>" for t in render(first)[0]]
    assert split_sizes(100, 0.05, 0.05) == {"train": 90, "valid": 5, "test": 5}
    with pytest.raises(UsageError):
        generate(tmp_path / "x.h5", pairs=50, max_number=10)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_partition_the_split(corpus, size):
    whole = read_shard(corpus, "train", 0, 1)
    parts = [read_shard(corpus, "train", r, size) for r in range(size)]
    assert sum(len(p) for p in parts) == len(whole) == whole.total
    joined = [s for p in parts for s in p.src]
    assert all(np.array_equal(a, b) for a, b in zip(joined, whole.src, strict=True))


def test_train_stream_positions(corpus):
    shard = read_shard(corpus, "train", 1, 2)
    s = TrainStream(shard, 8, 2, seed=3, rank=1)
    assert s.steps_per_epoch == (shard.total // 2) // 8
    first_epoch = np.concatenate([s.indices(k) for k in range(s.steps_per_epoch)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)
    fresh = TrainStream(shard, 8, 2, seed=3, rank=1)
    k = s.steps_per_epoch + 1
    assert np.array_equal(fresh.indices(k), s.indices(k))
    assert not np.array_equal(TrainStream(shard, 8, 2, 4, 1).indices(0), s.indices(0))
    with pytest.raises(UsageError, match="train.batch_size"):
        TrainStream(shard, 1000, 2, 0, 1)


def test_collate_layout():
    b = collate([np.array([5, 6]), np.array([7])], [np.array([8]), np.array([9, 10, 11])])
    assert b.src.tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 8, PAD, PAD], [BOS, 9, 10, 11]]
    assert b.tgt_out.tolist() == [[8, EOS, PAD, PAD], [9, 10, 11, EOS]]
    assert b.tokens == 6


def _tiny(sparse, dropout=0.0):
    torch.manual_seed(0)
    return Transformer(20, d_model=16, heads=2, layers=1, ff=32, dropout=dropout, sparse=sparse)


def test_sparse_model_gradient_equals_dense_model_gradient():
    rng = np.random.default_rng(0)
    b = collate([rng.integers(4, 20, n) for n in (3, 5)], [rng.integers(4, 20, n)
                                                            for n in (4, 2)])
    grads = {}
    for sparse in (True, False):
        model = _tiny(sparse)
        smoothed_loss_sum(model(b.src, b.tgt_in), b.tgt_out, 0.1).backward()
        grads[sparse] = {n: p.grad for n, p in model.named_parameters()}
    g = grads[True]["embed.weight"]
    assert g.is_sparse and g._nnz() > 20  # assumed sparse: covers every row, and more
    for name, dense in grads[False].items():
        got = grads[True][name]
        got = got.to_dense() if got.is_sparse else got
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)


def test_smoothed_loss_and_schedule():
    logits = torch.randn(2, 3, 7)
    target = torch.tensor([[4, 5, PAD], [6, PAD, PAD]])
    ref = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1), ignore_index=PAD,
                          reduction="sum")
    torch.testing.assert_close(smoothed_loss_sum(logits, target, 0.0), ref)
    assert smoothed_loss_sum(logits, target, 0.2) != ref
    peak = noam_lr(100, 64, 100)
    assert peak == pytest.approx(64 ** -0.5 * 100 ** -0.5)
    assert noam_lr(50, 64, 100) < peak and noam_lr(400, 64, 100) == pytest.approx(peak / 2)


def test_greedy_stops_and_pads():
    model = _tiny(True).eval()
    out = model.greedy(torch.tensor([[5, 6, EOS]]), max_len=4)
    assert out.shape[0] == 1 and out.shape[1] <= 4


def test_stop_flag_catches_sigusr1_and_sigterm():
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption() as flag:
        assert flag.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.received == "SIGTERM"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_read_vocab(corpus):
    vocab = read_vocab(corpus)
    assert vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and len(set(vocab)) == len(vocab)
