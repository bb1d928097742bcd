"""Graphs and mixing matrices: pure functions, checked exhaustively in one process."""

import numpy as np
import pytest

from hpcml.consensus import mixing, topology
from hpcml.errors import UsageError

SIZES = [1, 2, 3, 4, 6, 9, 16]


def graphs(n):
    out = {"ring": topology.ring(n), "torus": topology.torus(n), "complete": topology.complete(n)}
    if n >= 4:
        out["regular"] = topology.random_regular(n, 3 if n % 2 == 0 else 2, seed=1)
    if n >= 2:
        out["erdos_renyi"] = topology.erdos_renyi(n, 0.5, seed=2)
    return out


@pytest.mark.parametrize("n", SIZES)
def test_graphs_are_simple_symmetric_connected(n):
    for name, adj in graphs(n).items():
        assert adj.shape == (n, n) and adj.dtype == bool, name
        assert np.array_equal(adj, adj.T), name
        assert not adj.diagonal().any(), name
        assert topology.is_connected(adj), name


def test_degrees():
    assert set(topology.ring(7).sum(axis=1)) == {2}
    assert set(topology.torus(16).sum(axis=1)) == {4}
    assert topology.torus_shape(12) == (3, 4) and topology.torus_shape(7) == (1, 7)
    assert set(topology.complete(5).sum(axis=1)) == {4}
    assert set(topology.random_regular(10, 3, seed=0).sum(axis=1)) == {3}
    assert not np.array_equal(topology.random_regular(10, 3, seed=0),
                              topology.random_regular(10, 3, seed=1))


@pytest.mark.parametrize("rule", mixing.RULES)
@pytest.mark.parametrize("n", SIZES)
def test_mixing_is_doubly_stochastic_on_every_graph(n, rule):
    for name, adj in graphs(n).items():
        w = mixing.mixing_matrix(adj, rule)
        np.testing.assert_allclose(w.sum(axis=0), 1, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(w.sum(axis=1), 1, atol=1e-14, err_msg=name)
        assert np.all(w >= 0) and np.array_equal(w, w.T), name
        assert np.all(w.diagonal() > 0), name
        assert np.all((w > 0) | np.eye(n, dtype=bool) | ~adj), name
        assert 0 < mixing.spectral_gap(w) <= 1, name
        if rule == "lazy":
            assert np.all(w.diagonal() >= 0.5), name


@pytest.mark.parametrize("n", [3, 5, 8, 11])
def test_ring_spectral_gap_closed_form(n):
    # Metropolis on a ring: W = (I + S + S^T) / 3, eigenvalues (1 + 2 cos(2 pi j / n)) / 3
    eig = (1 + 2 * np.cos(2 * np.pi * np.arange(1, n) / n)) / 3
    gap = mixing.spectral_gap(mixing.metropolis(topology.ring(n)))
    assert gap == pytest.approx(1 - np.abs(eig).max(), abs=1e-12)


def test_complete_metropolis_is_exact_average():
    w = mixing.metropolis(topology.complete(5))
    np.testing.assert_allclose(w, np.full((5, 5), 0.2), atol=1e-15)
    assert mixing.spectral_gap(w) == pytest.approx(1.0)


def test_check_mixing_rejects_bad_matrices():
    adj = topology.ring(4)
    w = mixing.metropolis(adj)
    for bad in (w * 1.1, w + np.triu(np.full((4, 4), 0.01), 1), np.where(adj, 0.0, w)):
        with pytest.raises(ValueError):
            mixing.check_mixing(bad, adj)


def test_edge_file(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("# a path\n0 1\n1 2  # middle\n\n2 3\n")
    adj = topology.build_graph("file", 4, edges=str(f))
    assert adj.sum() == 6 and adj[1, 2] and not adj[0, 3]
    f.write_text("0 1\n2 3\n")
    with pytest.raises(UsageError, match="disconnected"):
        topology.build_graph("file", 4, edges=str(f))
    f.write_text("0 9\n")
    with pytest.raises(UsageError, match="out of range"):
        topology.build_graph("file", 4, edges=str(f))
    f.write_text("0 1 2\n")
    with pytest.raises(UsageError, match="expected two node ids"):
        topology.build_graph("file", 4, edges=str(f))
    with pytest.raises(UsageError, match="not found"):
        topology.build_graph("file", 4, edges=str(tmp_path / "missing.txt"))


def test_impossible_random_graphs():
    with pytest.raises(UsageError, match="graph.degree"):
        topology.build_graph("regular", 5, degree=3)
    with pytest.raises(UsageError, match="graph.p"):
        topology.erdos_renyi(30, 1e-6, seed=0, tries=5)
    assert not topology.is_connected(np.zeros((3, 3), dtype=bool))
