"""The call orders of ``hpcml bench collectives`` (pure arithmetic, no MPI)."""

import itertools

import pytest

from hpcml.bench.collectives import call_orders


@pytest.mark.parametrize("n", range(1, 10))
def test_call_orders_balance_position_and_predecessor(n):
    rows = call_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    # every path takes every position equally often
    for position in range(n):
        firsts = [row[position] for row in rows]
        assert all(firsts.count(k) == len(rows) // n for k in range(n))
    # every ordered pair of distinct paths is adjacent equally often
    pairs = [pair for row in rows for pair in itertools.pairwise(row)]
    expected = 1 if n % 2 == 0 else 2
    assert all(pairs.count(pair) == expected for pair in itertools.permutations(range(n), 2))
