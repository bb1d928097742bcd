"""Encoders, FWHT and ETF: frame properties checked in one process."""

import itertools

import numpy as np
import pytest
import scipy.linalg

from hpcml.coded.encoders import ENCODERS, make_encoder, subset_spectrum
from hpcml.coded.etf import coherence, is_prime, paley_conference, paley_etf, welch_bound
from hpcml.coded.fwht import fwht, next_power_of_two


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 256, 512, 1024])
def test_fwht_equals_scipy_hadamard(n):
    x = np.random.default_rng(n).standard_normal((n, 3))
    np.testing.assert_allclose(fwht(x), scipy.linalg.hadamard(n) @ x, atol=1e-10)
    np.testing.assert_allclose(fwht(x[:, 0]), scipy.linalg.hadamard(n) @ x[:, 0], atol=1e-10)
    np.testing.assert_allclose(fwht(fwht(x)) / n, x, atol=1e-10)


def test_fwht_cache_blocked_passes_match_the_unblocked_transform(monkeypatch):
    """Arrays larger than the cache chunk take the chunked + in-place schedule; shrinking the
    chunk must not change the result (H H = n I as the independent check)."""
    x = np.random.default_rng(1).standard_normal((1 << 12, 3))
    whole = fwht(x)
    monkeypatch.setattr("hpcml.coded.fwht.CACHE_BYTES", 1 << 9)
    np.testing.assert_allclose(fwht(x), whole, atol=1e-9)
    np.testing.assert_allclose(fwht(whole) / x.shape[0], x, atol=1e-10)


def test_fwht_rejects_non_power_of_two_and_pads():
    with pytest.raises(ValueError, match="power of two"):
        fwht(np.ones(6))
    assert [next_power_of_two(k) for k in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]


@pytest.mark.parametrize("q", [5, 13, 17, 29])
def test_paley_etf_meets_welch_bound(q):
    c = paley_conference(q)
    np.testing.assert_allclose(c @ c, q * np.eye(q + 1), atol=1e-9)
    f = paley_etf(q)
    d, n = f.shape
    assert (d, n) == ((q + 1) // 2, q + 1)
    np.testing.assert_allclose(f @ f.T, np.eye(d), atol=1e-9)
    gram = np.abs(f.T @ f)
    off = gram[~np.eye(n, dtype=bool)]
    np.testing.assert_allclose(off, off[0], atol=1e-9)
    assert coherence(f) == pytest.approx(welch_bound(n, d), abs=1e-9)
    assert coherence(f) == pytest.approx(1 / np.sqrt(q), abs=1e-9)


def test_paley_rejects_bad_q():
    assert not is_prime(9) and is_prime(13)
    for q in (7, 9, 11):
        with pytest.raises(ValueError, match="prime"):
            paley_conference(q)


EXACT = {"uncoded": 1.0, "replication": 2.0, "etf": 2.0}


@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("n", [30, 64])
def test_tight_frame(kind, n):
    beta = 1.0 if kind == "uncoded" else 2.0
    enc = make_encoder(kind, n, 4, beta, seed=1)
    s = enc.matrix()
    assert s.shape == (enc.rows, n)
    gram = s.T @ s / enc.beta
    if kind in EXACT:
        np.testing.assert_allclose(gram, np.eye(n), atol=1e-9)
    else:
        assert np.linalg.eigvalsh(gram)[-1] < 4.0
        assert abs(np.trace(gram) / n - 1) < 0.15
    blocks = np.sort(np.concatenate(enc.blocks))
    assert blocks.tolist() == list(range(enc.rows))
    x = np.random.default_rng(0).standard_normal((n, 2))
    np.testing.assert_allclose(enc.apply(x), s @ x, atol=1e-9)
    np.testing.assert_allclose(enc.apply_block(x, 2), s[enc.blocks[2]] @ x, atol=1e-9)


@pytest.mark.parametrize("n,beta,max_block", [(32, 2.0, 4096), (1, 2.0, 4096), (7, 3.0, 4096),
                                              (442, 2.0, 4096), (101, 2.0, 16)])
def test_hadamard_is_exact_tight_frame_at_any_n(monkeypatch, n, beta, max_block):
    """S.T S = beta I at every n (odd, diabetes' 442, several zero-padded blocks), every row
    goes to exactly one worker and the workers' shares of each block differ by at most one."""
    monkeypatch.setattr("hpcml.coded.encoders.Hadamard.max_block", max_block)
    enc = make_encoder("hadamard", n, 4, beta, seed=3)
    s = enc.matrix()
    np.testing.assert_allclose(s.T @ s, beta * np.eye(n), atol=1e-9)
    assert enc.beta == beta and enc.rows == beta * enc.nblocks * enc.block >= beta * n
    assert sorted(np.concatenate(enc.blocks).tolist()) == list(range(enc.rows))
    per = int(beta) * enc.block
    for b in range(enc.nblocks):
        shares = [np.sum((w // per) == b) for w in enc.blocks]
        assert max(shares) - min(shares) <= 1
    with pytest.raises(ValueError, match="whole number"):
        make_encoder("hadamard", n, 4, 1.5)


def test_hadamard_encodes_large_n_without_matrix():
    n = 1 << 15
    enc = make_encoder("hadamard", n, 4, 2.0, seed=0)
    x = np.random.default_rng(0).standard_normal((n, 2))
    y = enc.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=0) ** 2, 2.0 * np.linalg.norm(x, axis=0)
                               ** 2, rtol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "hadamard", "etf", "replication"])
@pytest.mark.parametrize("m,k", [(4, 3), (8, 6)])
def test_subset_eigenvalues_bounded_for_k_of_m(kind, m, k):
    """Random k-of-m worker subsets stay full rank (1 - eps > 0, the paper's condition) and,
    for tight frames, S_A.T S_A <= S.T S gives 1 + eps <= m / k; uncoded loses coordinates."""
    n = 64
    enc = make_encoder(kind, n, m, 2.0, seed=5)
    s = enc.matrix()
    rng = np.random.default_rng(m)
    subsets = [sorted(rng.choice(m, k, replace=False)) for _ in range(12)]
    if kind == "replication" and m == 8:
        subsets = [a for a in subsets if len({w % 4 for w in a}) == 4]
    for subset in subsets:
        lo, hi = subset_spectrum(s, enc.blocks, list(subset), enc.beta)
        assert lo > {"gaussian": 0.01, "hadamard": 0.05, "etf": 0.05, "replication": 0.5}[kind]
        if kind == "gaussian":
            assert hi < 4.0
        else:
            assert hi <= m / k + 1e-9
    unc = make_encoder("uncoded", n, m, 1.0)
    lo, hi = subset_spectrum(unc.matrix(), unc.blocks, list(range(k)), 1.0)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(m / k)


def test_sparse_never_loses_a_row_to_fewer_than_nnz_erasures():
    n, m, nnz = 50, 4, 2
    enc = make_encoder("sparse", n, m, 2.0, seed=2, sparse_nnz=nnz)
    s = enc.matrix()
    np.testing.assert_allclose((s**2).sum(axis=0), 2.0)
    assert ((s != 0).sum(axis=0) == nnz).all()
    for subset in itertools.combinations(range(m), m - nnz + 1):
        rows = np.concatenate([enc.blocks[i] for i in subset])
        assert (np.abs(s[rows]).sum(axis=0) > 0).all()


def test_etf_subsets_better_conditioned_than_gaussian_on_average():
    n, m = 70, 4
    widths = {}
    for kind in ("etf", "gaussian"):
        enc = make_encoder(kind, n, m, 2.0, seed=7)
        s = enc.matrix()
        spans = [subset_spectrum(s, enc.blocks, list(a), enc.beta)
                 for a in itertools.combinations(range(m), 3)]
        widths[kind] = np.mean([hi - lo for lo, hi in spans])
    assert widths["etf"] < widths["gaussian"]


def test_bad_combinations_raise():
    with pytest.raises(ValueError, match="beta"):
        make_encoder("gaussian", 10, 4, 0.5)
    with pytest.raises(ValueError, match="divides"):
        make_encoder("replication", 10, 3, 2.0)
    with pytest.raises(ValueError, match="beta = 2"):
        make_encoder("etf", 10, 4, 3.0)
    with pytest.raises(ValueError, match="beta must be 1"):
        make_encoder("uncoded", 10, 4, 2.0)
    with pytest.raises(ValueError, match="unknown encoder"):
        make_encoder("fourier", 10, 4, 2.0)
