"""Pure partitioning math of pipeline parallelism (no MPI, no torch): which modules are the
partition's atoms ("units"), how much each unit call costs, and the contiguous split of the
call sequence into stages that minimizes the costliest stage.

- :func:`choose_units` starts from the root's children and *opens* (replaces by its children)
  the unit with the most parameters, until there are ``units_per_stage * stages`` units and
  none holds more than that fraction of the parameters. A
  module can be opened only if that loses nothing: it has no parameters of its own and every
  child that holds parameters is called during the trace (``nn.MultiheadAttention`` reads its
  ``out_proj.weight`` without calling ``out_proj``, so it stays one unit). Containers
  (``ModuleList``) are never called and are always opened. Coarse units are deliberate: a
  value computed *between* units (a residual sum) crosses a stage boundary as the unit
  outputs it is made of, so finer units mean more, smaller messages.
- :func:`call_costs` turns measured seconds and bytes into one cost per call: half the call's
  share of the total time plus half its share of the total memory; with no time measured
  (all zero), its share of the parameter count alone.
- :func:`partition` splits the calls into ``stages`` contiguous, non-empty segments, honouring
  pins (call index -> stage), and minimizes the largest segment cost exactly (dynamic
  programming). Its result therefore satisfies the balance bound
  ``max stage cost <= total / stages + max call cost`` whenever no pins constrain it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Node:
    """One module of the tree: its children (full dotted names), parameters it owns directly,
    parameters of its whole subtree, and whether its ``forward`` ran during the trace."""

    name: str
    children: tuple[str, ...]
    direct_params: int
    params: int
    called: bool


def _openable(tree: Mapping[str, Node], name: str) -> bool:
    node = tree[name]
    if node.direct_params:
        return False
    for child in node.children:
        c = tree[child]
        if c.params and not c.called and not _openable(tree, child):
            return False
    return True


def choose_units(tree: Mapping[str, Node], stages: int, units_per_stage: int = 2,
                 root: str = "") -> list[str]:
    """Module names that become units, in tree order: the root's children, then repeatedly
    the called unit with the most parameters that can be opened is replaced by its children,
    while there are fewer than ``target = units_per_stage * stages`` units or that unit holds
    more than ``1 / target`` of the parameters, and some unit can be opened. Uncalled
    modules without parameters are dropped; an uncalled child of the root that holds
    parameters is left to the root's own code (its parameters are used outside any unit)."""
    if stages < 1 or units_per_stage < 1:
        raise ValueError(f"stages ({stages}) and units_per_stage ({units_per_stage}) must be >= 1")

    def expand(name: str) -> list[str]:
        out = []
        for child in tree[name].children:
            node = tree[child]
            if node.called:
                out.append(child)
            elif node.params and _openable(tree, child):
                out += expand(child)
        return out

    target = units_per_stage * stages
    share = tree[root].params / target
    units = expand(root)
    while True:
        candidates = [u for u in units if tree[u].children and _openable(tree, u)
                      and expand(u)]
        if not candidates:
            return units
        biggest = max(candidates, key=lambda u: tree[u].params)
        if len(units) >= target and tree[biggest].params <= share:
            return units
        i = units.index(biggest)
        units[i:i + 1] = expand(biggest)


def call_costs(seconds: Sequence[float], memory: Sequence[float],
               params: Sequence[float]) -> list[float]:
    """One cost per call (sums to 1): ``(time share + memory share) / 2``, or the parameter
    share when no time was measured. Shares of an all-zero quantity are uniform."""
    n = len(seconds)
    if not (len(memory) == len(params) == n) or n == 0:
        raise ValueError(f"call_costs: {len(seconds)} times, {len(memory)} memories, "
                         f"{len(params)} parameter counts; need the same positive number")

    def share(xs: Sequence[float]) -> list[float]:
        total = float(sum(xs))
        return [float(x) / total for x in xs] if total > 0 else [1.0 / n] * n

    if sum(seconds) <= 0:
        return share(params)
    return [(t + m) / 2 for t, m in zip(share(seconds), share(memory), strict=True)]


def partition(costs: Sequence[float], stages: int,
              pins: Mapping[int, int] | None = None) -> list[int]:
    """Stage of every call: non-decreasing, every stage non-empty, ``pins[i] == stage[i]``,
    and the largest stage cost as small as possible. Raises ``ValueError`` when impossible
    (fewer calls than stages, or pins out of order)."""
    n, pins = len(costs), dict(pins or {})
    if stages < 1:
        raise ValueError(f"partition: stages must be >= 1, got {stages}")
    if n < stages:
        raise ValueError(f"partition: {n} module calls cannot fill {stages} stages; use fewer "
                         "stages or let more modules be units")
    for i, s in pins.items():
        if not (0 <= i < n and 0 <= s < stages):
            raise ValueError(f"partition: pin of call {i} to stage {s} is out of range "
                             f"({n} calls, {stages} stages)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    pin_of = [pins.get(i) for i in range(n)]

    inf = math.inf
    # best[s][j]: smallest max cost placing calls 0..j-1 on stages 0..s (each non-empty)
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        if pin_of[j - 1] not in (None, 0):
            break
        best[0][j] = prefix[j]
    for s in range(1, stages):
        for j in range(s + 1, n + 1):
            for i in range(j - 1, s - 1, -1):
                if pin_of[i] is not None and pin_of[i] != s:
                    break
                value = max(best[s - 1][i], prefix[j] - prefix[i])
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    if best[stages - 1][n] == inf:
        raise ValueError(f"partition: the pins {pins} cannot be met by {stages} contiguous "
                         "stages (a later call is pinned to an earlier stage)")
    out = [0] * n
    j = n
    for s in range(stages - 1, 0, -1):
        i = cut[s][j]
        out[i:j] = [s] * (j - i)
        j = i
    return out


def stage_costs(costs: Sequence[float], stage_of: Sequence[int], stages: int) -> list[float]:
    """Total cost of each stage."""
    totals = [0.0] * stages
    for c, s in zip(costs, stage_of, strict=True):
        totals[s] += c
    return totals
