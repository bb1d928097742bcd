"""Pure pipeline schedules: the order in which one stage runs the forward (``F``) and backward
(``B``) passes of M microbatches, plus a simulator of the whole pipeline.

- GPipe (Huang et al. 2019): all M forwards, then all M backwards in the same order. A stage
  holds the activations of all M microbatches at its peak.
- 1F1B (PipeDream-Flush, Narayanan et al. 2021): stage s of S runs ``min(S - s - 1, M)`` warm-up
  forwards, then alternates one forward and one backward, then drains the remaining backwards.
  Same bubble as GPipe, but at most ``min(S - s, M)`` microbatches are in flight on stage s.

- Interleaved 1F1B (Narayanan et al. 2021, arXiv 2104.04473, section 2.2.2): the model is cut
  into V = v * S *virtual stages* (chunks); rank s holds chunks s, s + S, ..., s + (v - 1) S.
  A rank runs forwards in groups of S microbatches per chunk (chunk 0 of microbatches 0..S-1,
  chunk 1 of the same, ..., then the next S microbatches), backwards in the same groups with the
  chunks reversed; after ``2 (S - s - 1) + (v - 1) S`` warm-up forwards (all of them when
  M = S) it alternates one forward and one backward. Needs M to be a multiple of S.

GPipe and 1F1B run forwards and backwards in microbatch order 0..M-1. With equal per-stage
forward time f and backward time b, both take (M + S - 1)(f + b) and each stage idles for
(S - 1)(f + b): the bubble fraction (idle / total) (S - 1) / (M + S - 1). Interleaving with v
chunks (each taking f / v and b / v) shrinks the idle time to (S - 1)(f + b) / v: the paper's
bubble (idle / ideal compute) (S - 1) / (v M), idle / total (S - 1) / (v M + S - 1).

An action is ``(kind, microbatch, chunk)``; chunk is 0 for GPipe and 1F1B.
"""

from __future__ import annotations

from collections.abc import Callable

Action = tuple[str, int, int]
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def gpipe(stages: int, micro: int, stage: int, chunks: int = 1) -> list[Action]:
    """GPipe order on ``stage``: F0..F(M-1), B0..B(M-1). ``chunks`` must be 1."""
    _check(stages, micro, stage, chunks, 1)
    return [("F", m, 0) for m in range(micro)] + [("B", m, 0) for m in range(micro)]


def one_f_one_b(stages: int, micro: int, stage: int, chunks: int = 1) -> list[Action]:
    """1F1B order on ``stage``: warm-up forwards, steady F/B pairs, cool-down backwards.
    ``chunks`` must be 1."""
    _check(stages, micro, stage, chunks, 1)
    return _one_f_one_b(min(stages - stage - 1, micro), micro,
                        lambda k, kind: (kind, k, 0))


def interleaved_one_f_one_b(stages: int, micro: int, stage: int,
                            chunks: int = 2) -> list[Action]:
    """Interleaved 1F1B order on ``stage`` holding ``chunks`` virtual stages (module
    docstring); ``micro`` must be a multiple of ``stages``."""
    _check(stages, micro, stage, chunks, None)
    if micro % stages:
        raise ValueError(f"interleaved-1f1b needs microbatches to be a multiple of the pipeline "
                         f"size {stages}; got {micro}: use "
                         f"microbatches={-(-micro // stages) * stages}")
    total = micro * chunks
    warm = total if micro == stages else \
        min(total, 2 * (stages - stage - 1) + (chunks - 1) * stages)

    def action(k: int, kind: str) -> Action:
        group, pos = divmod(k, stages * chunks)
        chunk = pos // stages
        return kind, group * stages + pos % stages, \
            chunk if kind == "F" else chunks - 1 - chunk

    return _one_f_one_b(warm, total, action)


def _one_f_one_b(warm: int, total: int, action: Callable[[int, str], Action]) -> list[Action]:
    """``warm`` forwards, then F/B pairs, then the remaining backwards, of ``total`` each;
    ``action(k, kind)`` names the k-th forward or backward."""
    out = [action(k, "F") for k in range(warm)]
    for k in range(total - warm):
        out += [action(warm + k, "F"), action(k, "B")]
    return out + [action(k, "B") for k in range(total - warm, total)]


def schedule(name: str) -> Callable[..., list[Action]]:
    """The schedule function called ``name`` (one of :data:`SCHEDULES`):
    ``fn(stages, micro, stage, chunks)``."""
    table = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_one_f_one_b}
    if name not in table:
        raise ValueError(f"schedule {name!r} is not one of {list(SCHEDULES)}")
    return table[name]


def theoretical_bubble(stages: int, micro: int, chunks: int = 1) -> float:
    """Idle fraction (idle / total time) of each stage with equal stage times and ``chunks``
    virtual stages per rank: (S - 1) / (v M + S - 1); (S - 1) / (M + S - 1) for v = 1."""
    return (stages - 1) / (chunks * micro + stages - 1)


def paper_bubble(stages: int, micro: int, chunks: int = 1) -> float:
    """The bubble as arXiv 2104.04473 states it (idle time / ideal compute time):
    (S - 1) / (v M)."""
    return (stages - 1) / (chunks * micro)


def in_flight(actions: list[Action]) -> int:
    """Most (microbatch, chunk) forwards whose backward has not run yet, at any point."""
    live = peak = 0
    for kind, *_ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def simulate(name: str, stages: int, micro: int, forward: float = 1.0,
             backward: float = 2.0, chunks: int = 1) -> tuple[float, list[float]]:
    """Run the schedule on an ideal machine (communication free, every stage's F takes
    ``forward`` and B ``backward``, split evenly over its ``chunks``; each rank runs its
    actions in order, an action waiting for the one it depends on): returns the makespan and
    each stage's idle fraction. Raises ``RuntimeError`` if the per-stage orders deadlock."""
    plans = [schedule(name)(stages, micro, s, chunks) for s in range(stages)]
    last = stages * chunks - 1
    done: dict[tuple[str, int, int], float] = {}
    pos, clock = [0] * stages, [0.0] * stages
    while any(pos[s] < len(plans[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(plans[s]):
                continue
            kind, m, chunk = plans[s][pos[s]]
            v = chunk * stages + s  # the virtual stage
            if kind == "F":
                dep = done.get(("F", v - 1, m)) if v > 0 else 0.0
            else:
                dep = done.get(("B", v + 1, m)) if v < last else done.get(("F", v, m))
            if dep is None:
                continue
            start = max(clock[s], dep)
            clock[s] = start + (forward if kind == "F" else backward) / chunks
            done[(kind, v, m)] = clock[s]
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name} deadlocks at S={stages}, M={micro}")
    makespan = max(clock)
    busy = micro * (forward + backward)
    return makespan, [1 - busy / makespan for _ in range(stages)]


def _check(stages: int, micro: int, stage: int, chunks: int, only: int | None) -> None:
    if stages < 1 or micro < 1 or not 0 <= stage < stages or chunks < 1:
        raise ValueError(f"schedule: need stages >= 1, microbatches >= 1, chunks >= 1 and "
                         f"0 <= stage < stages; got stages={stages}, microbatches={micro}, "
                         f"stage={stage}, chunks={chunks}")
    if only is not None and chunks != only:
        raise ValueError(f"schedule: virtual_stages={chunks} needs schedule='interleaved-1f1b'")
