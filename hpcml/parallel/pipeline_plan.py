"""What each pipeline stage holds, receives and sends, given a :class:`Trace` and the stage of
every unit call. Pure: no MPI, identical on every rank.

- ``live[b]`` (boundary b between stages b-1 and b): the unit outputs made on stages < b that
  a call on a stage >= b, or the model's output (last stage), depends on. Stage b-1 sends them
  to stage b, passing on what it received itself when still needed further down (a skip
  connection crosses several stages this way); gradients travel back the same way.
- ``header_len[b]``: one integer per dimension of every tensor output of the calls before
  stage b. The header carries their shapes, so stages can replay the forward on tensors whose
  shapes vary per batch (sentence length) without knowing them in advance.
- ``holders[p]``: the stages that keep parameter p: those of the calls of its unit, those whose
  calls or output read it outside its unit (a tied embedding is held by the first and the last
  stage), every stage whose replay of the forward runs code between units that reads it (a
  positional parameter added before the first layer), stage 0 for a parameter no call uses.
  Parameters held by more than one rank are *shared*: their gradients are summed over the
  pipeline after the backward passes.

With interleaving (``ranks`` < ``stages``), the stages are virtual: stage v runs on pipeline
rank ``v % ranks``. ``stage_of``, ``first``, ``live`` and ``header_len`` count virtual stages;
:meth:`Plan.owner`, :meth:`Plan.held` and :attr:`Plan.shared` answer for ranks (a parameter two
chunks of one rank use is one tensor there, whose gradient accumulates both uses).
"""

from __future__ import annotations

import dataclasses

from hpcml.parallel.pipeline_trace import Dep, Leaf, Trace


@dataclasses.dataclass(frozen=True)
class Plan:
    stages: int
    stage_of: list[int]
    first: list[int]
    live: list[list[Dep]]
    header_len: list[int]
    holders: dict[str, frozenset[int]]  # parameter -> the (virtual) stages that hold it
    ranks: int  # pipeline ranks; == stages without interleaving

    def rank_of(self, stage: int) -> int:
        """The pipeline rank that runs (virtual) stage ``stage``."""
        return stage % self.ranks

    @property
    def shared(self) -> list[str]:
        """Parameters held by several ranks, sorted by name."""
        return sorted(n for n, s in self.holders.items()
                      if len({self.rank_of(v) for v in s}) > 1)

    def owner(self, name: str) -> int:
        """The rank whose copy of parameter ``name`` goes into a checkpoint."""
        return self.rank_of(min(self.holders[name]))

    def held(self, rank: int) -> set[str]:
        """The parameters pipeline rank ``rank`` keeps (for any of its virtual stages)."""
        return {n for n, s in self.holders.items() if any(self.rank_of(v) == rank for v in s)}


def make_plan(trace: Trace, stage_of: list[int], stages: int,
              all_params: list[str], ranks: int | None = None) -> Plan:
    """The plan for ``stage_of`` (non-decreasing, each of the ``stages`` stages non-empty),
    run by ``ranks`` pipeline ranks (default ``stages``; it must divide ``stages``)."""
    calls = trace.calls
    if len(stage_of) != len(calls) or sorted(set(stage_of)) != list(range(stages)) or \
            any(a > b for a, b in zip(stage_of, stage_of[1:], strict=False)):
        raise ValueError(f"stage_of {stage_of} is not a contiguous split of {len(calls)} calls "
                         f"into {stages} stages")
    first = [stage_of.index(s) for s in range(stages)] + [len(calls)]
    consumers: dict[Dep, int] = {}  # latest stage that needs each unit output
    for k, call in enumerate(calls):
        for dep in call.deps:
            consumers[dep] = max(consumers.get(dep, -1), stage_of[k])
    for dep in trace.output_deps:
        consumers[dep] = stages - 1
    live: list[list[Dep]] = [[] for _ in range(stages)]
    for b in range(1, stages):
        live[b] = sorted(d for d, last in consumers.items()
                         if stage_of[d[0]] < b <= last)
    header_len = [sum(leaf.ndim for call in calls[:first[b]] for leaf in call.leaves
                      if isinstance(leaf, Leaf)) for b in range(stages)]
    holders: dict[str, set[int]] = {n: set() for n in all_params}
    for k, call in enumerate(calls):
        for name in [*trace.unit_params[call.unit], *call.params]:
            holders[name].add(stage_of[k])
    for name in trace.output_params:
        holders[name].add(stages - 1)
    for name, position in trace.glue_params.items():
        # every stage replays the code between units up to its own last call
        holders[name] |= {s for s in range(stages) if first[s + 1] >= position}
    return Plan(stages, list(stage_of), first, live, header_len,
                {n: frozenset(s or {0}) for n, s in holders.items()},
                stages if ranks is None else ranks)
