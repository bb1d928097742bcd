"""Job-file validation of the consensus job and benchmark (pure, before any MPI work)."""

import pytest

from hpcml.config import build
from hpcml.consensus.bench import ConsensusBenchConfig
from hpcml.consensus.job import ConsensusConfig
from hpcml.errors import ConfigError, UsageError


def job(**privacy):
    return build(ConsensusConfig, {"kind": "consensus", "privacy": privacy})


@pytest.mark.parametrize("privacy,key", [({"epsilon": 0.0}, "privacy.epsilon"),
                                         ({"epsilon": -3.0}, "privacy.epsilon"),
                                         ({"delta": 0.0}, "privacy.delta"),
                                         ({"delta": 1.0}, "privacy.delta")])
def test_bad_budget_names_the_key(privacy, key):
    with pytest.raises(ConfigError, match=key):
        job(**privacy).check(4)


def test_budget_rules_per_mechanism():
    job(mechanism="laplace", delta=0.0).check(4)
    job(mechanism="none", epsilon=0.0).check(4)
    with pytest.raises(ConfigError, match="must be one of"):
        job(mechanism="exponential")


def test_graph_checked_against_rank_count(tmp_path):
    cfg = build(ConsensusConfig, {"kind": "consensus", "graph": {"kind": "regular",
                                                                 "degree": 3}})
    cfg.check(4)
    with pytest.raises(UsageError, match="graph.degree"):
        cfg.check(5)
    edges = tmp_path / "e.txt"
    edges.write_text("0 1\n1 2\n")
    cfg = build(ConsensusConfig, {"kind": "consensus",
                                  "graph": {"kind": "file", "edges": str(edges)}})
    cfg.check(3)
    with pytest.raises(UsageError, match="disconnected"):
        cfg.check(4)


def test_bench_config_rules():
    ok = {"kind": "bench-consensus", "epsilons": [1.0, 10.0], "epsilon": 10.0}
    build(ConsensusBenchConfig, ok).check(4)
    with pytest.raises(ConfigError, match="epsilon"):
        build(ConsensusBenchConfig, {**ok, "epsilon": 5.0}).check(4)
    with pytest.raises(ConfigError, match="ranks"):
        build(ConsensusBenchConfig, {**ok, "ranks": [2, 8]}).check(4)
    with pytest.raises(ConfigError, match="optim.task"):
        build(ConsensusBenchConfig, {**ok, "optim": {"task": "ridge"}}).check(4)
    with pytest.raises(ConfigError, match="epsilons"):
        build(ConsensusBenchConfig, {**ok, "epsilons": [0.0, 10.0]})
