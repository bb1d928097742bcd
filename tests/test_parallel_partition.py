"""Pure pipeline math in one process: unit choice, balanced partition, schedules, plan."""

import itertools
import random

import pytest
import torch
from test_parallel_pipeline import SkipNet, batch

from hpcml.parallel.pipeline_partition import Node, call_costs, choose_units, partition, stage_costs
from hpcml.parallel.pipeline_plan import make_plan
from hpcml.parallel.pipeline_schedule import (
    SCHEDULES,
    in_flight,
    schedule,
    simulate,
    theoretical_bubble,
)
from hpcml.parallel.pipeline_trace import param_names, trace


def brute_force(costs, stages, pins):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *cuts, len(costs)]
        stage_of = [s for s in range(stages) for _ in range(bounds[s], bounds[s + 1])]
        if any(stage_of[i] != s for i, s in pins.items()):
            continue
        worst = max(stage_costs(costs, stage_of, stages))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_partition_is_optimal_contiguous_and_within_the_bound(seed):
    rng = random.Random(seed)
    n, stages = rng.randint(4, 9), rng.randint(1, 4)
    costs = [rng.choice([0.0, rng.random(), 5 * rng.random()]) for _ in range(n)]
    pins = {rng.randrange(n): rng.randrange(stages)} if seed % 3 == 0 else {}
    expected = brute_force(costs, stages, pins)
    if expected is None:
        with pytest.raises(ValueError, match="pins"):
            partition(costs, stages, pins)
        return
    stage_of = partition(costs, stages, pins)
    assert stage_of == sorted(stage_of) and set(stage_of) == set(range(stages))
    assert all(stage_of[i] == s for i, s in pins.items())
    worst = max(stage_costs(costs, stage_of, stages))
    assert worst == pytest.approx(expected)
    if not pins:
        assert worst <= sum(costs) / stages + max(costs) + 1e-12


def test_partition_rejects_too_few_calls():
    with pytest.raises(ValueError, match="cannot fill 3 stages"):
        partition([1.0, 1.0], 3)


def test_call_costs_mix_time_and_memory_and_fall_back_to_parameters():
    assert call_costs([1, 3], [3, 1], [0, 0]) == [0.5, 0.5]
    assert call_costs([0, 0], [3, 1], [1, 3]) == [0.25, 0.75]


def test_units_open_the_biggest_module_only_when_nothing_is_lost():
    tree = {
        "": Node("", ("embed", "layers", "attn"), 0, 120, True),
        "embed": Node("embed", (), 10, 10, True),
        "layers": Node("layers", ("layers.0", "layers.1"), 0, 70, False),
        "layers.0": Node("layers.0", ("layers.0.a", "layers.0.b"), 0, 40, True),
        "layers.0.a": Node("layers.0.a", (), 20, 20, True),
        "layers.0.b": Node("layers.0.b", (), 20, 20, True),
        "layers.1": Node("layers.1", ("layers.1.fc",), 0, 30, True),
        "layers.1.fc": Node("layers.1.fc", (), 30, 30, True),
        # like nn.MultiheadAttention: own parameters and a child it never calls
        "attn": Node("attn", ("attn.out",), 30, 40, True),
        "attn.out": Node("attn.out", (), 10, 10, False),
    }
    # the container `layers` is never called: always opened
    assert choose_units(tree, 1) == ["embed", "layers.0", "layers.1", "attn"]
    # layers.0 holds more than 1/4 of the parameters: opened; layers.1 (exactly 1/4) is not
    assert choose_units(tree, 1, units_per_stage=4) == ["embed", "layers.0.a", "layers.0.b",
                                                        "layers.1", "attn"]
    # `attn` is never opened: its children would not account for its parameters
    assert choose_units(tree, 4) == ["embed", "layers.0.a", "layers.0.b", "layers.1.fc", "attn"]


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s != "interleaved-1f1b"])
@pytest.mark.parametrize(("stages", "micro"), [(1, 3), (2, 1), (2, 4), (4, 3), (4, 8)])
def test_schedules_run_everything_once_without_deadlock_and_bubble_formula(name, stages, micro):
    for s in range(stages):
        actions = schedule(name)(stages, micro, s)
        assert sorted(actions) == sorted([("F", m, 0) for m in range(micro)]
                                         + [("B", m, 0) for m in range(micro)])
        assert [m for k, m, _ in actions if k == "F"] == list(range(micro))
        assert [m for k, m, _ in actions if k == "B"] == list(range(micro))
        expected = micro if name == "gpipe" else min(stages - s, micro)
        assert in_flight(actions) == expected
    makespan, idle = simulate(name, stages, micro, forward=1.0, backward=2.0)
    assert makespan == pytest.approx(3.0 * (micro + stages - 1))
    assert idle == pytest.approx([theoretical_bubble(stages, micro)] * stages)


def test_trace_and_plan_of_a_skip_connection_and_a_module_called_twice():
    torch.manual_seed(0)
    model = SkipNet()
    units = ["embed", *[f"blocks.{i}" for i in range(6)], "shared", "head"]
    tr = trace(model, batch(0, 2, 5)[:2], {}, stages=4, units=units)
    assert [c.unit for c in tr.calls] == ["embed", "blocks.0", "blocks.1", "shared", "blocks.2",
                                          "blocks.3", "blocks.4", "blocks.5", "shared", "head"]
    assert tr.calls[2].deps == {(1, 0)} and tr.calls[9].deps == {(0, 0), (8, 0)}
    # blocks.1's fc1 is 8 x 64 + 64 x 16: the parameter counts are measured
    assert tr.calls[2].param_count == 16 * 64 + 64 + 64 * 16 + 16
    assert tr.calls[8].param_count == 0  # second call of `shared`
    stage_of = [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    plan = make_plan(tr, stage_of, 4, list(param_names(model).values()))
    # the skip connection (embed's output) crosses every boundary; `shared` is on 1 and 3
    assert all((0, 0) in plan.live[b] for b in (1, 2, 3))
    assert plan.holders["shared.weight"] == {1, 3}
    # `scale` is read between units after the first call: every stage replays that code
    assert tr.glue_params == {"scale": 1} and plan.holders["scale"] == {0, 1, 2, 3}
    assert plan.shared == ["scale", "shared.bias", "shared.weight"]
    assert plan.live[3] == [(0, 0), (7, 0)]


def test_measured_partition_of_uneven_layers_is_within_the_balance_bound():
    torch.manual_seed(0)
    model = SkipNet()
    tr = trace(model, batch(0, 4, 6)[:2], {}, stages=3)
    costs = call_costs([c.seconds for c in tr.calls],
                       [c.activation_bytes + 4 * c.param_count for c in tr.calls],
                       [c.param_count for c in tr.calls])
    stage_of = partition(costs, 3)
    assert max(stage_costs(costs, stage_of, 3)) <= 1 / 3 + max(costs) + 1e-12
