"""Encoded optimization on the master, oblivious to the encoding (Karakus et al., JMLR 2019).

Data parallelism: worker i stores (S_i X, S_i y) and answers an iterate w with
(X_i.T (X_i w - y_i), ||X_i w - y_i||^2). With A_t the k workers that answered first and
eta = k / m, the master forms the gradient of the encoded objective restricted to A_t::

    g_t = 1 / (eta beta n) sum_{i in A_t} X_i.T (X_i w - y_i)

and takes a step of

* ``gd``: w <- w - alpha (g_t + lam w)                   (encoded gradient descent)
* ``lbfgs``: the two-loop L-BFGS direction with curvature pairs from the workers in
  A_t and A_{t-1} only: ``r_t = sum_{i in A_t & A_{t-1}} (grad_i(w_t) - grad_i(w_{t-1})) /
  (eta' beta n) + lam s_t``, ``eta' = |A_t & A_{t-1}| / m``, and a constant step (the paper's
  encoded L-BFGS);
* ``prox``: proximal gradient for LASSO, w <- soft(w - alpha g_t, alpha l1)
* ``fista``: the accelerated proximal gradient (Beck and Teboulle) on the same oracle;
* ``async``: the asynchronous baseline: each reply updates w at once with that worker's share,
  w <- w - alpha (grad_i / (beta n) + lam w / m), and the worker gets the new w back.

Model parallelism (the paper's encoded block coordinate descent): features are encoded, worker i
stores X S_i.T and its coordinate block v_i of v, w = S.T v. The master holds z = X S.T v and
sends grad phi(z) with v_i; worker i returns dv_i = -alpha (X_i.T grad phi(z) + lam beta v_i)
and X_i dv_i; the master applies the blocks of the first k workers. For a tight frame,
min_v phi(X S.T v) + lam beta / 2 ||v||^2 equals the original minimum, so encoded BCD converges
to the exact solution under any erasure pattern.

Every solver records (elapsed seconds, iterate) after each iteration into ``trace`` and ends
early when the runtime says so (:meth:`~hpcml.coded.runtime.Runtime.stop_after`, or a round /
reply of None: a stop signal or too few workers while waiting; the trace may then be empty).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hpcml.coded.runtime import Runtime

Trace = list[tuple[float, np.ndarray]]
DATA_PARALLEL = ("gd", "lbfgs", "prox", "fista", "async")


def least_squares_worker(x: np.ndarray, y: np.ndarray) -> Callable[[int, np.ndarray],
                                                                   np.ndarray]:
    """Worker task for data parallelism: w -> (X.T (Xw - y), ||Xw - y||^2)."""

    def compute(t: int, w: np.ndarray) -> np.ndarray:
        r = x @ w - y
        return np.concatenate([x.T @ r, [r @ r]])

    return compute


def bcd_worker(x: np.ndarray, step: float, lam_beta: float) -> Callable[[int, np.ndarray],
                                                                        np.ndarray]:
    """Worker task for encoded BCD: (grad phi(z), v_i) -> (dv_i, X_i dv_i)."""
    n = x.shape[0]

    def compute(t: int, msg: np.ndarray) -> np.ndarray:
        gz, v = msg[:n], msg[n:]
        dv = -step * (x.T @ gz + lam_beta * v)
        return np.concatenate([dv, x @ dv])

    return compute


def soft_threshold(w: np.ndarray, tau: float) -> np.ndarray:
    return np.sign(w) * np.maximum(np.abs(w) - tau, 0.0)


def _gradient(replies: dict[int, np.ndarray], m: int, beta: float, n: int) -> np.ndarray:
    eta = len(replies) / m
    return sum(r[:-1] for r in replies.values()) / (eta * beta * n)


def data_parallel(rt: Runtime, algorithm: str, p: int, *, n: int, beta: float, k: int,
                  step: float, iterations: int, lam: float = 0.0, l1: float = 0.0,
                  history: int = 10) -> Trace:
    """Run ``algorithm`` (one of ``DATA_PARALLEL``) for ``iterations`` rounds; master only."""
    if algorithm == "async":
        return _asynchronous(rt, p, n=n, beta=beta, step=step, iterations=iterations, lam=lam)
    m = rt.m
    w = np.zeros(p)
    trace: Trace = []
    momentum, theta = w.copy(), 1.0
    prev: dict[int, np.ndarray] = {}
    w_prev: np.ndarray | None = None
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for t in range(iterations):
        point = momentum if algorithm == "fista" else w
        replies = rt.round(t, [point] * m, k)
        if replies is None:
            break
        g = _gradient(replies, m, beta, n) + lam * point
        if algorithm == "gd":
            w = w - step * g
        elif algorithm == "prox":
            w = soft_threshold(w - step * g, step * l1)
        elif algorithm == "fista":
            w_new = soft_threshold(momentum - step * g, step * l1)
            theta_new = (1 + np.sqrt(1 + 4 * theta**2)) / 2
            momentum = w_new + (theta - 1) / theta_new * (w_new - w)
            w, theta = w_new, theta_new
        else:
            both = sorted(set(replies) & set(prev))
            if w_prev is not None and both:
                s = w - w_prev
                diff = sum(replies[i][:-1] - prev[i][:-1] for i in both)
                r = diff / (len(both) / m * beta * n) + lam * s
                if s @ r > 1e-12 * (s @ s):
                    pairs = (pairs + [(s, r)])[-history:]
            w_prev, prev = w.copy(), replies
            w = w + step * _lbfgs_direction(g, pairs)
        trace.append((rt.elapsed(), w.copy()))
        if rt.stop_after(t + 1, iterations):
            break
    return trace


def _lbfgs_direction(g: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """-H g by the two-loop recursion (Nocedal and Wright, Algorithm 7.4)."""
    q = g.copy()
    alphas = []
    for s, r in reversed(pairs):
        a = (s @ q) / (r @ s)
        alphas.append(a)
        q -= a * r
    if pairs:
        s, r = pairs[-1]
        q *= (s @ r) / (r @ r)
    for (s, r), a in zip(pairs, reversed(alphas), strict=True):
        q += s * (a - (r @ q) / (r @ s))
    return -q


def _asynchronous(rt: Runtime, p: int, *, n: int, beta: float, step: float, iterations: int,
                  lam: float) -> Trace:
    m = rt.m
    w = np.zeros(p)
    trace: Trace = []
    for i in range(m):
        rt.send(i, 0, w)
    for u in range(1, iterations * m + 1):
        reply = rt.next_reply()
        if reply is None:
            break
        worker, _, payload = reply
        w = w - step * (payload[:-1] / (beta * n) + lam * w / m)
        rt.send(worker, u, w)
        if u % m == 0:
            trace.append((rt.elapsed(), w.copy()))
            if rt.stop_after(u // m, iterations):
                break
    return trace


def block_coordinate_descent(rt: Runtime, loss_grad: Callable[[np.ndarray], np.ndarray],
                             block_sizes: list[int], n: int, *, k: int,
                             iterations: int) -> tuple[list[tuple[float, np.ndarray]],
                                                       list[np.ndarray]]:
    """Encoded BCD (master only). Returns the trace of z = X S.T v and the final blocks v_i."""
    v = [np.zeros(b) for b in block_sizes]
    z = np.zeros(n)
    trace = []
    for t in range(iterations):
        gz = loss_grad(z)
        replies = rt.round(t, [np.concatenate([gz, vi]) for vi in v], k)
        if replies is None:
            break
        for i, payload in replies.items():
            v[i] = v[i] + payload[: block_sizes[i]]
            z = z + payload[block_sizes[i]:]
        trace.append((rt.elapsed(), np.concatenate(v)))
        if rt.stop_after(t + 1, iterations):
            break
    return trace, v
