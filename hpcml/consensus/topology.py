"""Communication graphs for consensus: pure functions that return a symmetric adjacency matrix.

Every builder returns an ``(n, n)`` boolean numpy array ``adj`` with ``adj == adj.T`` and a false
diagonal (self-loops are added by the mixing matrix, :mod:`hpcml.consensus.mixing`). Random
graphs take an integer ``seed`` and are identical on every rank that calls them with the same
arguments, so each rank can build the whole graph without communication.

:func:`build_graph` is the job-file entry point; it raises :class:`~hpcml.errors.UsageError`
(exit 2) for impossible parameters and for a disconnected graph, because consensus on a
disconnected graph cannot reach the network-wide average.
"""

from __future__ import annotations

import math
import re
from collections import deque
from pathlib import Path

import numpy as np

from hpcml.errors import UsageError

GRAPHS = ("ring", "torus", "complete", "regular", "erdos_renyi", "file")


def _from_edges(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    adj = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        if i != j:
            adj[i, j] = adj[j, i] = True
    return adj


def ring(n: int) -> np.ndarray:
    """Cycle 0-1-...-(n-1)-0 (a single edge for n = 2, no edge for n = 1)."""
    return _from_edges(n, [(i, (i + 1) % n) for i in range(n)] if n > 1 else [])


def torus_shape(n: int) -> tuple[int, int]:
    """The most nearly square factorization ``rows x cols = n`` with ``rows <= cols``."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def torus(n: int) -> np.ndarray:
    """2-D torus on a ``torus_shape(n)`` grid with wrap-around; node ``i`` sits at
    ``(i // cols, i % cols)``. Duplicate neighbours (a side of length <= 2) collapse to one edge."""
    rows, cols = torus_shape(n)
    edges = []
    for i in range(n):
        r, c = divmod(i, cols)
        edges.append((i, ((r + 1) % rows) * cols + c))
        edges.append((i, r * cols + (c + 1) % cols))
    return _from_edges(n, edges)


def complete(n: int) -> np.ndarray:
    """Every pair of nodes joined."""
    return ~np.eye(n, dtype=bool)


def random_regular(n: int, degree: int, seed: int, tries: int = 1000) -> np.ndarray:
    """A uniformly paired random ``degree``-regular simple graph (configuration model with
    rejection of self-loops and multi-edges), conditioned on being connected."""
    if not 0 < degree < n or (n * degree) % 2:
        raise UsageError(f"graph.degree: no {degree}-regular graph on {n} nodes (need "
                         f"0 < degree < nodes and nodes x degree even)")
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        stubs = rng.permutation(np.repeat(np.arange(n), degree)).reshape(-1, 2)
        if np.any(stubs[:, 0] == stubs[:, 1]):
            continue
        pairs = {tuple(sorted(p)) for p in stubs.tolist()}
        if len(pairs) == len(stubs):
            adj = _from_edges(n, list(pairs))
            if is_connected(adj):
                return adj
    raise UsageError(f"graph.degree: found no connected simple {degree}-regular graph on {n} "
                     f"nodes in {tries} tries (raise the degree)")


def erdos_renyi(n: int, p: float, seed: int, tries: int = 1000) -> np.ndarray:
    """G(n, p) conditioned on being connected (rejection sampling)."""
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        upper = np.triu(rng.random((n, n)) < p, 1)
        adj = upper | upper.T
        if is_connected(adj):
            return adj
    raise UsageError(f"graph.p: G({n}, {p}) was disconnected in all {tries} draws (raise p)")


NODE_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also accepts '²'


def read_edges(path: str | Path, n: int) -> np.ndarray:
    """Undirected edge list: one ``i j`` pair of 0-based node ids per line, ``#`` comments."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"graph.edges: file {str(p)!r} not found (give a text file of 'i j' "
                         "lines)")
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"graph.edges: {p}: not a UTF-8 text file (byte {exc.start} is not "
                         "UTF-8; give a text file of 'i j' lines)") from None
    except OSError as exc:
        raise UsageError(f"graph.edges: {p}: cannot be read ({exc.strerror})") from None
    edges = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or not all(NODE_ID.fullmatch(s) for s in parts):
            raise UsageError(f"graph.edges: {p}:{number}: expected two node ids 'i j', got "
                             f"{text!r}")
        i, j = int(parts[0]), int(parts[1])
        if not (0 <= i < n and 0 <= j < n):
            raise UsageError(f"graph.edges: {p}:{number}: node id out of range 0..{n - 1} for "
                             f"{n} nodes (launch with more ranks or fix the file)")
        edges.append((i, j))
    return _from_edges(n, edges)


def is_connected(adj: np.ndarray) -> bool:
    """Breadth-first search from node 0 reaches every node."""
    n = adj.shape[0]
    if n == 0:
        return False
    seen, queue = {0}, deque([0])
    while queue:
        for j in np.flatnonzero(adj[queue.popleft()]).tolist():
            if j not in seen:
                seen.add(j)
                queue.append(j)
    return len(seen) == n


def build_graph(kind: str, n: int, *, degree: int = 3, p: float = 0.5, seed: int = 0,
                edges: str = "") -> np.ndarray:
    """The adjacency of graph ``kind`` on ``n`` nodes; ``UsageError`` if it is disconnected."""
    builders = {
        "ring": lambda: ring(n),
        "torus": lambda: torus(n),
        "complete": lambda: complete(n),
        "regular": lambda: random_regular(n, degree, seed),
        "erdos_renyi": lambda: erdos_renyi(n, p, seed),
        "file": lambda: read_edges(edges, n),
    }
    if kind not in builders:
        raise UsageError(f"graph.kind: unknown graph {kind!r}; choose from {', '.join(GRAPHS)}")
    adj = builders[kind]()
    if not is_connected(adj):
        field = f"graph.edges: {edges}: the" if kind == "file" else f"graph: the {kind}"
        raise UsageError(f"{field} graph on {n} nodes is disconnected, so consensus cannot "
                         "reach the network average (add edges so every node is reachable)")
    return adj
