"""Differentially private consensus-based distributed optimization (Showkatbakhsh, Karakus &
Diggavi; shared/PAPERS.md §4).

Every node i keeps an iterate x_i (``x_i^0 = 0``). In round t it broadcasts the noisy message
``m_i^t = x_i^t + n_i^t`` to its neighbours and updates

    x_i^{t+1} = sum_j W_ij m_j^t - alpha_t clip_C(grad f_i(x_i^t)),

with W the doubly stochastic mixing matrix (``W_ii`` weighs the node's own noisy message) and
``clip_C`` scaling a gradient onto the ball of radius C (the bound the privacy analysis of
:mod:`hpcml.consensus.accounting` uses). After T rounds each node releases ``x_i^T + n_i^T``.

The arithmetic of a round is :func:`consensus_update`, a pure function of the node's iterate
and the messages it received; the single-process simulation (:func:`simulate`) and the MPI
implementation (:func:`run_node`, one node per rank on a distributed-graph communicator, messages
by ``Neighbor_allgather``) both call it. Neither chooses where the noise comes from: the caller
passes node i's generator (:func:`hpcml.privacy.noise.noise_rng`: secret OS entropy for a private
run; given the same reproducible generators both produce the same iterates bit for bit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from hpcml.comm import Communicator
from hpcml.consensus.accounting import NoisePlan, sample_noise
from hpcml.consensus.tasks import Task
from hpcml.privacy.noise import node_rngs


def step_sizes(alpha0: float, decay: float, rounds: int) -> np.ndarray:
    """``alpha_t = alpha0 / (1 + t)^decay`` for t = 0..rounds-1 (decay 0: constant)."""
    return alpha0 / (1.0 + np.arange(rounds)) ** decay


def clip_norm(g: np.ndarray, bound: float) -> np.ndarray:
    """``g`` scaled onto the L2 ball of radius ``bound`` when outside it."""
    norm = float(np.linalg.norm(g))
    return g * (bound / norm) if norm > bound else g


def consensus_update(x: np.ndarray, messages: np.ndarray, weights: np.ndarray,
                     grad: np.ndarray, alpha: float, clip: float) -> np.ndarray:
    """One node's round: ``sum_k weights[k] messages[k] - alpha clip(grad)``.

    ``messages`` is ``(k, d)`` (the node's own message and its in-neighbours'), ``weights`` the
    matching row entries of W; ``x`` is the current iterate (unused except for shape checks)."""
    if messages.shape != (len(weights), x.shape[0]):
        raise ValueError(f"messages have shape {messages.shape}, expected "
                         f"{(len(weights), x.shape[0])}")
    return weights @ messages - alpha * clip_norm(grad, clip)


@dataclasses.dataclass
class Trajectory:
    """``states[t]``: the iterates of all nodes after t rounds, ``(T+1, n, d)``;
    ``released``: ``x^T + n^T``, ``(n, d)``; ``noise[t]``: the message noise of round t."""

    states: np.ndarray
    released: np.ndarray
    noise: np.ndarray


def simulate(task: Task, w: np.ndarray, plan: NoisePlan, steps: Sequence[float], clip: float,
             rngs: Sequence[np.random.Generator] | None = None) -> Trajectory:
    """All nodes of the graph in one process (the reference for the MPI path); node i's noise
    comes from ``rngs[i]`` (default: a fresh secret generator per node)."""
    n, d, rounds = task.nodes, task.dim, len(steps)
    rngs = node_rngs("secret", 0, n) if rngs is None else rngs
    x = np.zeros((n, d))
    states, noise = [x.copy()], []
    for t in range(rounds):
        nz = np.stack([sample_noise(rngs[i], plan.mechanism, plan.scale[t], d) for i in range(n)])
        noise.append(nz)
        msgs = x + nz
        x = np.stack([consensus_update(x[i], msgs[w[i] != 0], w[i][w[i] != 0], task.grad(i, x[i]),
                                       steps[t], clip) for i in range(n)])
        states.append(x.copy())
    final = np.stack([sample_noise(rngs[i], plan.mechanism, plan.scale[rounds], d)
                      for i in range(n)])
    noise.append(final)
    return Trajectory(np.stack(states), x + final, np.stack(noise))


def graph_comm(comm: Communicator, adj: np.ndarray) -> Communicator:
    """Collective: the distributed-graph communicator of ``adj`` (one node per rank)."""
    nbrs = np.flatnonzero(adj[comm.rank]).tolist()
    return comm.dist_graph(nbrs, nbrs, name="consensus")


def run_node(graph: Communicator, task: Task, w: np.ndarray, plan: NoisePlan,
             steps: Sequence[float], clip: float, rng: np.random.Generator,
             observe: Callable[[int, np.ndarray, np.ndarray], bool | None] | None = None,
             straggle: Callable[[int], float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Collective over ``graph``: run node ``graph.rank`` with its noise drawn from ``rng``;
    returns (x_i^T, released x_i^T + n_i^T).

    The only data this function sends is round t's message ``x_i^t + n_i^t`` (one
    ``Neighbor_allgather`` of ``d`` float64 per round t < T). ``observe(t, x, m)`` is called on
    every rank with the iterate ``x = x_i^t`` and the message ``m = x_i^t + n_i^t`` of round t,
    before it is sent (t = 0..T; round T's message is the release), and may itself be
    collective; when it returns True at a round t < T (it must return the same on every rank)
    the run ends there and the node releases ``m``, exactly round t's planned message, so the
    privacy spent is that of rounds 0..t of the plan and the result equals :func:`simulate` over
    ``steps[:t]`` with the same generators. ``straggle(t)`` injects the configured delay before
    each round's exchange."""
    i, d = graph.rank, task.dim
    sources = graph.neighbors()[0]
    order = np.argsort([i, *sources])  # node-id order, as in simulate(): same float sums
    weights = w[i, np.array([i, *sources])[order]]
    x = np.zeros(d)
    recv = np.empty(len(sources) * d)
    t = 0
    while True:
        msg = x + sample_noise(rng, plan.mechanism, plan.scale[t], d)
        stop = observe(t, x, msg) if observe else False
        if stop or t == len(steps):
            return x, msg
        if straggle:
            straggle(t)
        graph.Neighbor_allgather(msg, recv)
        messages = np.vstack([msg[None, :], recv.reshape(len(sources), d)])[order]
        x = consensus_update(x, messages, weights, task.grad(i, x), steps[t], clip)
        t += 1


def mse(states: np.ndarray, optimum: np.ndarray) -> float:
    """``1/n sum_i ||x_i - x*||^2`` of an ``(n, d)`` array of node iterates."""
    return float(((states - optimum) ** 2).sum(axis=1).mean())
