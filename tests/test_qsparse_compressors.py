"""Qsparse compressors, bit packing and error feedback: pure functions, one process."""

import math

import numpy as np
import pytest
import torch

from hpcml.qsparse import compensate, learning_rate, make_compressor, qsgd_beta
from hpcml.qsparse.bitpack import float_field, index_bits, pack, unpack
from hpcml.qsparse.compressors import NAMES, Quantizer, Sparsifier


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_index_bits_is_ceil_log2():
    assert [index_bits(d) for d in (1, 2, 3, 4, 5, 1024, 1025, 4810)] == [0, 1, 2, 2, 3, 10, 11,
                                                                          13]
    with pytest.raises(ValueError):
        index_bits(0)


def test_pack_unpack_round_trip_and_exact_size():
    rng = np.random.default_rng(1)
    widths = [0, 1, 3, 13, 32, 64]
    counts = [5, 7, 3, 11, 2, 4]
    fields = [(rng.integers(0, 2**min(w, 62), size=n, dtype=np.uint64), w)
              for n, w in zip(counts, widths, strict=True)]
    buf, bits = pack(fields)
    assert bits == 5 * 0 + 7 * 1 + 3 * 3 + 11 * 13 + 2 * 32 + 4 * 64
    assert buf.dtype == np.uint8 and buf.size == math.ceil(bits / 8)
    out = unpack(buf, [(v.size, w) for v, w in fields])
    for (v, _), got in zip(fields, out, strict=True):
        assert got.tolist() == v.tolist()
    # a byte-wide field right after bit fields that end on a byte boundary is copied as bytes
    mixed = [(np.arange(8) % 2, 1), (np.array([2**31 + 5, 7]), 32), (np.array([5]), 3),
             (np.array([2**40 + 1]), 64)]
    buf, bits = pack(mixed)
    assert bits == 8 + 64 + 3 + 64 and buf[1:5].view("<u4")[0] == 2**31 + 5
    assert [a.tolist() for a in unpack(buf, [(8, 1), (2, 32), (1, 3), (1, 64)])] == \
        [list(np.arange(8) % 2), [2**31 + 5, 7], [5], [2**40 + 1]]
    x = np.array([1.5, -2.25, np.pi], dtype=np.float32)
    words, w = float_field(x)
    assert w == 32 and unpack(pack([(words, w)])[0], [(3, 32)])[0].astype(np.uint32).view(
        np.float32).tolist() == x.tolist()
    with pytest.raises(ValueError, match="does not fit"):
        pack([(np.array([8], dtype=np.uint64), 3)])
    with pytest.raises(ValueError, match="layout needs"):
        unpack(buf[:-1], [(v.size, w) for v, w in fields])


# d = 1000: ceil(log2 d) = 10; s = 3: ceil(log2 4) = 2 level bits; k = 10.
HAND_BITS = {"identity": 32 * 1000, "topk": 10 * (10 + 32), "randk": 10 * (10 + 32),
             "qsgd": 32 + 1000 * (1 + 2), "sign": 32 + 1000, "qtopk": 10 * 10 + 32 + 10 * 3,
             "qrandk": 10 * 10 + 32 + 10 * 3, "signtopk": 10 * 10 + 32 + 10,
             "signrandk": 10 * 10 + 32 + 10}


@pytest.mark.parametrize("name", NAMES)
def test_bit_counts_equal_hand_computed_values(name):
    c = make_compressor(name, k=10, s=3)
    assert c.name == name
    assert c.bits(1000) == HAND_BITS[name]
    p = c.encode(torch.randn(1000, generator=gen()), gen(1))
    assert p.bits == HAND_BITS[name] and p.data.size == math.ceil(p.bits / 8)
    doubles = c.encode(torch.randn(1000, dtype=torch.float64, generator=gen()), gen(1))
    raw = {"identity": 1000, "topk": 10, "randk": 10}.get(name, 1)  # float words sent
    assert doubles.bits == HAND_BITS[name] + 32 * raw


def test_level_bits_and_index_bits_edges():
    assert make_compressor("qsgd", s=15).bits(1024) == 32 + 1024 * (1 + 4)
    assert make_compressor("qsgd", s=16).bits(1024) == 32 + 1024 * (1 + 5)
    assert make_compressor("qtopk", k=7, s=1).bits(1025) == 7 * 11 + 32 + 7 * 2
    assert make_compressor("topk", k=1).bits(1) == 32


def test_identity_topk_randk_decode_encode_round_trip():
    x = torch.randn(300, generator=gen())
    assert torch.equal(make_compressor("identity")(x), x)
    top = make_compressor("topk", k=20)(x)
    kept = top != 0
    assert kept.sum() == 20 and torch.equal(top[kept], x[kept])
    assert x[kept].abs().min() >= x[~kept].abs().max()
    rand = make_compressor("randk", k=20)(x, gen(3))
    kept = rand != 0
    assert kept.sum() == 20 and torch.equal(rand[kept], x[kept])
    assert not torch.equal(kept, top != 0)


def test_qsgd_and_sign_values_lie_on_their_grids():
    x = torch.randn(200, generator=gen())
    q = make_compressor("qsgd", s=4, contractive=False)(x, gen(5))
    norm = x.norm()
    levels = q.abs() * 4 / norm
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    assert ((levels - x.abs() * 4 / norm).abs() < 1 + 1e-5).all()
    assert (torch.sign(q) * torch.sign(x) >= 0).all()
    sg = make_compressor("sign")(x)
    assert torch.allclose(sg, x.abs().mean() * torch.where(x < 0, -1.0, 1.0))
    st = make_compressor("signtopk", k=10)(x)
    top = make_compressor("topk", k=10)(x)
    assert torch.allclose(st, top.abs().sum() / 10 * torch.sign(top))
    assert torch.equal(make_compressor("qsgd", s=2)(torch.zeros(5), gen()), torch.zeros(5))


def mean_of(c, x, n, seed=0):
    g = gen(seed)
    samples = torch.stack([c(x, g) for _ in range(n)])
    return samples.mean(0), samples.std(0) / math.sqrt(n)


def test_qsgd_and_scaled_randk_are_unbiased():
    x = torch.randn(40, generator=gen(2), dtype=torch.float64)
    mean, err = mean_of(make_compressor("qsgd", s=2, contractive=False), x, 3000)
    assert ((mean - x).abs() <= 5 * err + 1e-12).all()
    mean, err = mean_of(make_compressor("randk", k=8), x, 3000)
    assert (((40 / 8) * mean - x).abs() <= 5 * (40 / 8) * err + 1e-12).all()
    # Lemma 1's scaled quantizer is biased by exactly 1 / (1 + beta): the test can tell.
    scaled = make_compressor("qsgd", s=2)
    mean, err = mean_of(scaled, x, 3000)
    assert ((mean - x / (1 + qsgd_beta(40, 2))).abs() <= 5 * err + 1e-12).all()
    assert (mean - x).abs().max() > 10 * err.max()


VECTORS = {"gaussian": torch.randn(500, generator=gen(7), dtype=torch.float64),
           "heavy": torch.distributions.StudentT(1.5).sample((500,)).double(),
           "spike": torch.cat([torch.tensor([50.0]), 0.01 * torch.ones(499)]).double()}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_contraction_property_holds_empirically(name, vector):
    x = VECTORS[vector]
    c = make_compressor(name, k=25, s=3)
    g = gen(11)
    errors = torch.tensor([float((x - c(x, g)).pow(2).sum()) for _ in range(400)])
    bound = (1 - c.gamma(500)) * float(x.pow(2).sum())
    assert errors.mean() <= bound + 4 * errors.std() / math.sqrt(400) + 1e-9


def test_unscaled_quantized_topk_is_not_a_contraction():
    """Negative control: without Lemma 1's 1/(1+beta) the composition expands the vector."""
    x = VECTORS["gaussian"]
    c = make_compressor("qtopk", k=100, s=1, contractive=False)
    g = gen(0)
    err = np.mean([float((x - c(x, g)).pow(2).sum()) for _ in range(200)])
    assert err > float(x.pow(2).sum())
    assert c.gamma(500) > 0 and make_compressor("qtopk", k=100, s=1).gamma(500) == pytest.approx(
        100 / 500 / (1 + qsgd_beta(100, 1)))


def test_bad_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="k = 11 exceeds the dimension d = 10"):
        make_compressor("topk", k=11).encode(torch.zeros(10))
    with pytest.raises(ValueError, match="k must be >= 1"):
        Sparsifier("randk", 0)
    with pytest.raises(ValueError, match="s must be >= 1"):
        Quantizer("qsgd", 0)
    with pytest.raises(ValueError, match="unknown name"):
        make_compressor("topq")
    with pytest.raises(ValueError, match="1-D"):
        make_compressor("identity").encode(torch.zeros(2, 2))


@pytest.mark.parametrize("name", ["identity", "topk", "qtopk", "signrandk"])
def test_error_compensation_keeps_what_was_not_sent(name):
    c = make_compressor(name, k=5, s=3)
    memory = torch.randn(50, generator=gen(1), dtype=torch.float64)
    x_sync = torch.randn(50, generator=gen(2), dtype=torch.float64)
    x_local = torch.randn(50, generator=gen(3), dtype=torch.float64)
    payload, update, new_memory = compensate(c, memory, x_sync, x_local, gen(4))
    assert torch.allclose(update + new_memory, memory + x_sync - x_local, atol=1e-12)
    assert torch.equal(update, c.decode(payload.data, 50, torch.float64))
    assert payload.bits == c.bits(50, torch.float64)


def test_learning_rate_schedules():
    assert learning_rate(0, 0.5) == learning_rate(99, 0.5) == 0.5
    assert learning_rate(0, 0.5, "decay", 10) == 0.5
    assert learning_rate(10, 0.5, "decay", 10) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        learning_rate(0, 0.1, "cosine")
