"""Delay models: determinism, distributions (fixed-seed statistical tests), trace replay."""

import numpy as np
import pytest

from hpcml.comm import StragglerConfig, make_delay_model
from hpcml.errors import ConfigError, UsageError
from hpcml.testing import mpi_test


def delays(cfg, rank, n):
    model = make_delay_model(cfg)
    return np.array([model.delay(rank, t) for t in range(n)])


def test_none_and_fixed():
    assert delays(StragglerConfig(), 0, 5).tolist() == [0.0] * 5
    cfg = StragglerConfig(kind="fixed", slow_ranks=[2], delay=0.3)
    assert delays(cfg, 2, 3).tolist() == [0.3] * 3
    assert delays(cfg, 1, 3).tolist() == [0.0] * 3


def test_models_are_deterministic_and_ranks_independent():
    cfg = StragglerConfig(kind="exponential", mean=0.01, seed=7)
    assert delays(cfg, 1, 50).tolist() == delays(cfg, 1, 50).tolist()
    assert delays(cfg, 1, 50).tolist() != delays(cfg, 2, 50).tolist()
    assert np.corrcoef(delays(cfg, 1, 2000), delays(cfg, 2, 2000))[0, 1] < 0.1


def test_exponential_mean_and_memorylessness():
    d = delays(StragglerConfig(kind="exponential", mean=0.02, seed=1), 0, 20000)
    # mean within 4 standard errors (sd of an exponential = its mean)
    assert abs(d.mean() - 0.02) < 4 * 0.02 / np.sqrt(d.size)
    assert abs(np.mean(d > 0.02) - np.exp(-1)) < 0.02


def test_pareto_tail_follows_the_power_law():
    cfg = StragglerConfig(kind="pareto", shape=2.0, scale=0.01, max_delay=100.0, seed=3)
    d = delays(cfg, 0, 20000)
    assert d.min() >= 0.01
    for x in (0.02, 0.05):
        assert abs(np.mean(d > x) - (0.01 / x) ** 2) < 0.01


def test_delays_are_capped():
    cfg = StragglerConfig(kind="pareto", shape=0.5, scale=0.1, max_delay=0.5)
    assert delays(cfg, 0, 1000).max() == 0.5


def test_trace_replays_and_wraps(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("0.1,0.0\n0.0,0.2\n")
    cfg = StragglerConfig(kind="trace", trace=str(trace))
    assert delays(cfg, 0, 4).tolist() == [0.1, 0.0, 0.1, 0.0]
    assert delays(cfg, 1, 3).tolist() == [0.0, 0.2, 0.0]
    with pytest.raises(UsageError, match=r"has 2 columns but ranks 0\.\.2 each need one"):
        make_delay_model(cfg, size=3)  # refused before any delay is asked for


def test_bad_straggler_settings_name_the_key(tmp_path):
    with pytest.raises(UsageError, match="stragglers.trace: file .* not found"):
        make_delay_model(StragglerConfig(kind="trace", trace=str(tmp_path / "no.csv")))
    with pytest.raises(ConfigError, match="stragglers.slow_ranks: ranks \\[5\\] do not exist"):
        make_delay_model(StragglerConfig(kind="fixed", slow_ranks=[5], delay=1.0), size=4)


@mpi_test()
def test_straggle_sleeps_and_records(comm):
    comm.set_delays(make_delay_model(StragglerConfig(kind="fixed", slow_ranks=[0], delay=0.05)))
    comm.ledger.reset()
    slept = comm.straggle(0)
    assert slept == (0.05 if comm.rank == 0 else 0.0)
    recorded = comm.ledger.totals().get("straggle")
    if comm.rank == 0:
        assert recorded["calls"] == 1 and recorded["seconds"] >= 0.05
    else:
        assert recorded is None
