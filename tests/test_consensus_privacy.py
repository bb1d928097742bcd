"""The privacy contract of a consensus run, checked from the outside (issue 21).

- Secret noise: two runs of the same job file with the same ``seed`` draw different noise, and
  regenerating the noise from the run directory's ``config.toml`` (the attack that recovered
  every node's data) does not reproduce the run.
- The privacy boundary: in a private run the ledger shows, on every rank, exactly the noised
  messages (one ``d``-vector of float64 per round on the graph communicator; the ledger counts
  the buffer once, MPI delivers it to each of the node's ring neighbours), the same messages
  once more at each logged round for the metrics, with an 8-byte stop flag, and the launcher's
  constant messages (validation outcome, host name, run-directory path), each computed here in
  closed form.
- The modes that give privacy up exist only by name and say so in summary.json.
"""

import json
import pickle
import platform
from pathlib import Path

import pytest

from hpcml.comm import transport
from hpcml.config import load_job_file, read_toml
from hpcml.consensus.config import PrivacyConfig
from hpcml.consensus.job import ConsensusConfig
from hpcml.rundir import read_metrics
from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]
D = 10  # the mean task's dimension: the diabetes data set's 10 features
ROUNDS, LOG_EVERY = 8, 3


def run_job(runs: Path, ranks: int, *settings: str) -> tuple[Path, str]:
    """``hpcml run jobs/consensus-mean.toml`` with ROUNDS rounds, logged every LOG_EVERY;
    returns (the new run directory, stdout)."""
    before = set(runs.iterdir()) if runs.exists() else set()
    args = [arg for kv in (f"runs_dir={runs}", f"optim.rounds={ROUNDS}",
                           f"log_every={LOG_EVERY}", *settings) for arg in ("--set", kv)]
    res = hpcml_cli(ranks, "run", "jobs/consensus-mean.toml", *args, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    (run,) = set(runs.iterdir()) - before
    return run, res.stdout


def test_two_runs_with_the_same_seed_draw_different_noise(tmp_path):
    from hpcml.consensus import algorithm, job
    from hpcml.privacy.noise import node_rngs

    (a, out), (b, _) = (run_job(tmp_path, 2) for _ in range(2))
    assert (a / "config.toml").read_text() == (b / "config.toml").read_text()
    first, second = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [m["round"] for m in first] == [0, 3, 6, 8]
    assert first[0] == second[0]  # round 0 carries no noise (x^0 = 0, sensitivity 0)
    assert all(x["mse"] != y["mse"] for x, y in zip(first[1:], second[1:], strict=True))
    summary = json.loads((a / "summary.json").read_text())
    assert summary["private"] is True and summary["not_private_because"] == []
    assert "private run: noise from OS entropy" in out
    # the attack of issue 21: regenerate every node's noise from the seed in config.toml
    cfg = load_job_file(ConsensusConfig, read_toml(a / "config.toml"), "config.toml", 2)
    _, w, task, steps, plan = job.setup(cfg, 2)
    ref = algorithm.simulate(task, w, plan, steps, cfg.privacy.clip,
                             node_rngs("reproducible", cfg.seed, 2))
    guess = [algorithm.mse(ref.states[t] + ref.noise[t], task.optimum) for t in (0, 3, 6, 8)]
    assert guess[0] == first[0]["mse"]
    assert all(g != m["mse"] for g, m in zip(guess[1:], first[1:], strict=True))


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_a_private_run_sends_only_its_noised_messages(tmp_path, ranks):
    run, _ = run_job(tmp_path, ranks)
    degree = {1: 0, 2: 1, 4: 2}[ranks]  # ring neighbours of each node
    scored = len(set(range(0, ROUNDS + 1, LOG_EVERY)) | {ROUNDS})  # rounds 0, 3, 6, 8

    def size(obj):
        return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    # validation outcome, host name, the host identity the transport check compares
    launcher = size(None) + size(platform.node()) + size(transport.identity())
    opened = size((str(run), None))  # the run directory (path, no refusal)
    for rank, ops in enumerate(json.loads((run / "ledger.json").read_text())["ranks"]):
        seen = {op: (t["calls"], t["bytes_sent"], t["bytes_received"]) for op, t in ops.items()}
        assert seen == {
            # round t's message x_i^t + n_i^t, t < ROUNDS, to the ring neighbours
            "consensus.Neighbor_allgather": (ROUNDS, ROUNDS * D * 8, ROUNDS * degree * D * 8),
            # the same message again at each scored round (the last one is the release),
            # plus the 8-byte stop flag
            "Allgather": (scored, scored * (D + 1) * 8, ranks * scored * (D + 1) * 8),
            "allgather": (3, launcher, ranks * launcher),
            # the run directory's path (or rank 0's one-line refusal), from rank 0
            "bcast": (1, opened if rank == 0 else size(None), opened),
        }, f"rank {rank}"
        sent = sum(t["bytes_sent"] for t in ops.values())
        assert sent == (ROUNDS * D * 8 + scored * (D + 1) * 8 + launcher
                        + (opened if rank == 0 else size(None)))


def test_the_modes_that_give_privacy_up_are_named():
    assert ConsensusConfig().not_private_because() == []
    for change, needle in (({"metrics": "evaluation"}, 'metrics = "evaluation"'),
                           ({"privacy": PrivacyConfig(noise="reproducible")},
                            'noise = "reproducible"'),
                           ({"privacy": PrivacyConfig(mechanism="none")}, "carry no noise")):
        (reason,) = ConsensusConfig(**change).not_private_because()
        assert needle in reason, (change, reason)


def test_evaluation_mode_says_it_is_not_private(tmp_path):
    run, out = run_job(tmp_path, 2, 'metrics="evaluation"', 'privacy.noise="reproducible"',
                       "verify=true")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["private"] is False and summary["metrics_of"] == "true iterates x_i^t"
    assert any('metrics = "evaluation"' in r for r in summary["not_private_because"])
    assert summary["matches_simulation"] is True  # the gathered iterates equal the simulation
    assert 'NOT PRIVATE ("private": false)' in out
    metrics = read_metrics(run / "metrics.jsonl")
    assert metrics[-1]["mse"] == summary["mse_final"] != summary["mse_released"]
    ops = json.loads((run / "ledger.json").read_text())["ranks"][0]
    assert ops["Allgather"]["calls"] == 4 + 1  # the true iterates, then the releases
