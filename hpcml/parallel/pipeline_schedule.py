"""Pure pipeline schedules: the order in which one stage runs the forward (``F``) and backward
(``B``) passes of M microbatches, plus a simulator of the whole pipeline.

- GPipe (Huang et al. 2019): all M forwards, then all M backwards in the same order. A stage
  holds the activations of all M microbatches at its peak.
- 1F1B (PipeDream-Flush, Narayanan et al. 2021): stage s of S runs ``min(S - s - 1, M)`` warm-up
  forwards, then alternates one forward and one backward, then drains the remaining backwards.
  Same bubble as GPipe, but at most ``min(S - s, M)`` microbatches are in flight on stage s.

Both run forwards and backwards in microbatch order 0..M-1, which the pipeline's messages rely
on. With equal per-stage forward time f and backward time b, both take (M + S - 1)(f + b) and
each stage idles for (S - 1)(f + b): the bubble fraction (S - 1) / (M + S - 1).
"""

from __future__ import annotations

from collections.abc import Callable

Action = tuple[str, int]
SCHEDULES = ("gpipe", "1f1b")


def gpipe(stages: int, micro: int, stage: int) -> list[Action]:
    """GPipe order on ``stage``: F0..F(M-1), B0..B(M-1)."""
    _check(stages, micro, stage)
    return [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]


def one_f_one_b(stages: int, micro: int, stage: int) -> list[Action]:
    """1F1B order on ``stage``: warm-up forwards, steady F/B pairs, cool-down backwards."""
    _check(stages, micro, stage)
    warm = min(stages - stage - 1, micro)
    out: list[Action] = [("F", m) for m in range(warm)]
    f, b = warm, 0
    while f < micro:
        out += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    out += [("B", m) for m in range(b, micro)]
    return out


def schedule(name: str) -> Callable[[int, int, int], list[Action]]:
    """The schedule function called ``name`` (one of :data:`SCHEDULES`)."""
    table = {"gpipe": gpipe, "1f1b": one_f_one_b}
    if name not in table:
        raise ValueError(f"schedule {name!r} is not one of {list(SCHEDULES)}")
    return table[name]


def theoretical_bubble(stages: int, micro: int) -> float:
    """Idle fraction of each stage with equal stage times: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (micro + stages - 1)


def in_flight(actions: list[Action]) -> int:
    """Most microbatches whose forward ran and backward did not yet, at any point."""
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def simulate(name: str, stages: int, micro: int, forward: float = 1.0,
             backward: float = 2.0) -> tuple[float, list[float]]:
    """Run the schedule on an ideal machine (communication free, every stage's F takes
    ``forward`` and B ``backward``): returns the makespan and each stage's idle fraction.
    Raises ``RuntimeError`` if the per-stage orders deadlock."""
    plans = [schedule(name)(stages, micro, s) for s in range(stages)]
    done: dict[tuple[str, int, int], float] = {}
    pos, clock = [0] * stages, [0.0] * stages
    while any(pos[s] < len(plans[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(plans[s]):
                continue
            kind, m = plans[s][pos[s]]
            if kind == "F":
                dep = done.get(("F", s - 1, m)) if s > 0 else 0.0
            else:
                dep = done.get(("B", s + 1, m)) if s < stages - 1 else done.get(("F", s, m))
            if dep is None:
                continue
            start = max(clock[s], dep)
            clock[s] = start + (forward if kind == "F" else backward)
            done[(kind, s, m)] = clock[s]
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name} deadlocks at S={stages}, M={micro}")
    makespan = max(clock)
    busy = micro * (forward + backward)
    return makespan, [1 - busy / makespan for _ in range(stages)]


def _check(stages: int, micro: int, stage: int) -> None:
    if stages < 1 or micro < 1 or not 0 <= stage < stages:
        raise ValueError(f"schedule: need stages >= 1, microbatches >= 1 and 0 <= stage < "
                         f"stages; got stages={stages}, microbatches={micro}, stage={stage}")
