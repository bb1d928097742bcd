"""Where privacy noise comes from: secret OS entropy, or, only when asked for by name, a stream
regenerated from the job's seed (debugging; the run is then not private).

``secret``: each call draws a fresh 128-bit seed from the operating system's entropy source
(``numpy.random.SeedSequence()`` without arguments) and keeps it only inside the returned
generator: it is never returned, logged or written, so nobody, the run's own files included, can
regenerate the noise. ``reproducible``: the generator of ``[seed, *key]``, the same on every call,
so anyone who reads the run's ``config.toml`` can regenerate every noise vector and subtract it:
the messages then protect nothing. Jobs with a privacy guarantee take the mode from their job
file (``noise``), default ``secret``, and report ``"private": false`` for ``reproducible``.
"""

from __future__ import annotations

import numpy as np

NOISE_MODES = ("secret", "reproducible")


def noise_rng(mode: str, seed: int, *key: int) -> np.random.Generator:
    """The noise generator of one stream (e.g. ``key = (node,)``): seeded from OS entropy for
    ``mode = "secret"`` (``seed`` and ``key`` are ignored), from ``[seed, *key]`` for
    ``"reproducible"``. Not collective."""
    if mode == "secret":
        return np.random.default_rng(np.random.SeedSequence())
    if mode == "reproducible":
        return np.random.default_rng([seed, *key])
    raise ValueError(f"noise mode {mode!r} is not one of {NOISE_MODES}")


def node_rngs(mode: str, seed: int, nodes: int) -> list[np.random.Generator]:
    """``noise_rng(mode, seed, i)`` for nodes i = 0..nodes-1: what node i (rank i) draws its
    noise from, all in one process (the single-process simulation)."""
    return [noise_rng(mode, seed, i) for i in range(nodes)]


def secret_rng() -> np.random.Generator:
    """A generator seeded from OS entropy (``noise_rng("secret", ...)``)."""
    return noise_rng("secret", 0)


def reproducible_reason(mode: str, seed: int) -> list[str]:
    """Why a run with noise mode ``mode`` is not private: one reason for ``reproducible``, none
    for ``secret``."""
    if mode != "reproducible":
        return []
    return [f"noise = \"reproducible\" regenerates every noise vector from seed = {seed} "
            "(config.toml), so anyone who sees the noised outputs can subtract it"]


def privacy_status(reasons: list[str]) -> tuple[dict[str, object], str]:
    """(the summary fields ``private`` and ``not_private_because``, the console line) of a run
    that is private exactly when ``reasons`` is empty."""
    fields: dict[str, object] = {"private": not reasons, "not_private_because": reasons}
    line = ("  private run: noise from OS entropy, never written anywhere" if not reasons
            else "  NOT PRIVATE (\"private\": false): " + "; ".join(reasons))
    return fields, line
