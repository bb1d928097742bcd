"""The best-of-grid logic of ``hpcml bench optimizers`` (pure, no training): the best learning
rate per optimizer, its spread over the seeds, the grid-edge flag and the difference to tuned
Adam, against values computed by hand (binary-exact losses, so equalities are exact)."""

import math

import pytest

from hpcml.optim.bench import best_of_grid, best_table, grid_table


def runs_of(name, finals_by_lr):
    """Runs of ``name``: {lr: [final per seed, None = diverged]}; step_ms = 10 * seed + lr * 1e3."""
    return [{"optimizer": name, "lr": lr, "seed": seed, "final": final,
             "step_ms": 10.0 * seed + lr * 1e3, "opt_cpu_ms": 1.0, "state_bytes": 2**20}
            for lr, finals in finals_by_lr.items() for seed, final in enumerate(finals)]


RUNS = [
    *runs_of("adam", {1e-3: [2.5, 2.75], 2e-3: [2.25, 2.5], 4e-3: [2.0, None]}),
    *runs_of("lion", {2e-3: [3.25, 3.5], 1e-3: [3.0, 3.0]}),      # order of runs is irrelevant
    *runs_of("yogi", {1e-3: [3.0, 3.0], 2e-3: [2.5, 2.5]}),
    *runs_of("avgrad", {1e-3: [2.0]}),
    *runs_of("mada", {1e-3: [None, 2.0], 2e-3: [None, None]}),
    *runs_of("adamw", {1e-3: [2.5, 2.0], 2e-3: [2.0, 2.5], 4e-3: [2.75, 2.5]}),
]


def test_best_of_grid_against_hand_computed_values():
    cells, rows = best_of_grid(RUNS)
    rows = {r["optimizer"]: r for r in rows}
    assert list(rows) == ["adam", "lion", "yogi", "avgrad", "mada", "adamw"]
    # adam: means 2.625, 2.375 and (a diverged seed) none: the best is 2e-3, which has a
    # neighbour on each side, so the grid brackets it although the larger lr diverged.
    adam = rows["adam"]
    assert (adam["lr"], adam["val_loss"], adam["min"], adam["max"], adam["seeds"]) == (
        2e-3, 2.375, 2.25, 2.5, 2)
    assert adam["std"] == pytest.approx(0.25 / math.sqrt(2))  # sample std of {2.25, 2.5}
    assert (adam["edge"], adam["lrs"], adam["lrs_diverged"], adam["vs_adam"]) == (None, 3, 1, 0)
    assert adam["step_ms"] == 7.0  # median of 0 + 2 and 10 + 2
    assert adam["vs_adam_seeds"] == [0.0, 0.0]
    # lion: best at the smallest lr (std 0 over two equal seeds); yogi at the largest.
    assert (rows["lion"]["lr"], rows["lion"]["edge"], rows["lion"]["std"]) == (1e-3, "low", 0.0)
    assert rows["lion"]["vs_adam"] == 3.0 - 2.375
    assert rows["lion"]["vs_adam_seeds"] == [3.0 - 2.5, 3.0 - 2.25]  # seed 1, seed 0
    assert (rows["yogi"]["lr"], rows["yogi"]["edge"], rows["yogi"]["vs_adam"]) == (
        2e-3, "high", 0.125)
    # avgrad: one lr and one seed: no std, cannot be bracketed.
    assert (rows["avgrad"]["edge"], rows["avgrad"]["std"], rows["avgrad"]["vs_adam"]) == (
        "single", None, -0.375)
    assert rows["avgrad"]["vs_adam_seeds"] == [-0.25, -0.25]  # its one seed, 0: 2.0 - 2.25
    # mada: a seed diverged at every lr: no best, nothing to compare.
    mada = rows["mada"]
    assert (mada["lr"], mada["val_loss"], mada["edge"], mada["vs_adam"], mada["lrs_diverged"]) \
        == (None, None, None, None, 2)
    # adamw: 1e-3 and 2e-3 tie at 2.25; the tie goes to the smaller lr (an edge).
    assert (rows["adamw"]["lr"], rows["adamw"]["edge"], rows["adamw"]["val_loss"]) == (
        1e-3, "low", 2.25)
    by_cell = {(c["optimizer"], c["lr"]): c for c in cells}
    assert [c["lr"] for c in cells if c["optimizer"] == "lion"] == [1e-3, 2e-3]
    assert (by_cell["adam", 4e-3]["mean"], by_cell["adam", 4e-3]["diverged"],
            by_cell["adam", 4e-3]["min"]) == (None, 1, 2.0)
    assert [c["best"] for c in cells if c["optimizer"] == "adam"] == [False, True, False]
    assert by_cell["mada", 2e-3]["min"] is None


def test_tables_state_the_edge_and_the_divergence():
    cells, rows = best_of_grid(RUNS)
    best = best_table(rows).splitlines()
    line = {r.split(" | ")[0].strip("| "): r for r in best[2:]}
    assert "| 0.001 | 3.0000 ± 0.0000 | 3.0000-3.0000 | 2 | YES: smallest lr" in line["lion"]
    assert "YES: largest lr, optimum may be higher | +0.1250 (+0.0000 to +0.2500) |" \
        in line["yogi"]
    assert "| 0.002 | 2.3750 ± 0.1768 | 2.2500-2.5000 | 2 | no | +0.0000 (+0.0000 to " \
        "+0.0000) | 1 of 3 |" in line["adam"]
    assert "diverged at every lr" in line["mada"]
    grid = grid_table(cells, absolute=True).splitlines()
    assert grid[0] == "| optimizer | lr 0.001 | lr 0.002 | lr 0.004 |"
    assert grid[2] == "| adam | 2.6250 | **2.3750** | div 1/2 |"
    assert grid[4] == "| yogi | 3.0000 | **2.5000** | - |"
