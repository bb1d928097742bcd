"""DP consensus on real MPI ranks: the distributed run equals the single-process simulation."""

import json

import numpy as np

from hpcml.testing import hpcml_cli, mpi_test


@mpi_test(ranks=[1, 2, 4], in_process=True)
def test_distributed_equals_simulation(comm):
    from hpcml.consensus import accounting, algorithm, mixing, tasks, topology
    from hpcml.privacy.noise import node_rngs, noise_rng

    for kind, rule, mechanism in (("ring", "metropolis", "gaussian"),
                                  ("complete", "lazy", "laplace"),
                                  ("erdos_renyi", "metropolis", "gaussian")):
        adj = topology.build_graph(kind, comm.size, p=0.6, seed=3)
        w = mixing.mixing_matrix(adj, rule)
        task = tasks.load_task("ridge", comm.size)
        steps = algorithm.step_sizes(0.5, 0.5, 12)
        plan = accounting.plan_noise(mechanism, 5.0, 1e-5, steps, 1.0, task.dim)
        graph = algorithm.graph_comm(comm, adj)
        assert sorted(graph.neighbors()[0]) == np.flatnonzero(adj[comm.rank]).tolist()
        seen = []
        x, released = algorithm.run_node(
            graph, task, w, plan, steps, 1.0, noise_rng("reproducible", 11, comm.rank),
            observe=lambda t, v, m, out=seen: out.append((v.copy(), m.copy())))
        ref = algorithm.simulate(task, w, plan, steps, 1.0, node_rngs("reproducible", 11,
                                                                      comm.size))
        assert len(seen) == 13
        for t, (v, m) in enumerate(seen):
            np.testing.assert_array_equal(v, ref.states[t, comm.rank])
            np.testing.assert_array_equal(m, ref.states[t, comm.rank] + ref.noise[t, comm.rank])
        np.testing.assert_array_equal(released, ref.released[comm.rank])
        np.testing.assert_array_equal(x, ref.states[-1, comm.rank])
    calls = comm.ledger.totals().get("consensus.Neighbor_allgather", {}).get("calls")
    assert calls == 36


def test_job_runs_and_writes_privacy_ledger(tmp_path):
    res = hpcml_cli(2, "run", "jobs/consensus-mean.toml", "--set", f"runs_dir={tmp_path}",
                    "--set", "optim.rounds=8", "--set", "privacy.epsilon=3.0",
                    "--set", 'privacy.noise="reproducible"', "--set", "verify=true",
                    cwd=_root())
    assert res.returncode == 0, res.stderr
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["matches_simulation"] is True and summary["nodes"] == 2
    # reproducible noise is asked for by name and makes the run non-private, visibly
    assert summary["private"] is False and len(summary["not_private_because"]) == 1
    assert "reproducible" in summary["not_private_because"][0]
    assert 'NOT PRIVATE ("private": false): noise = "reproducible"' in res.stdout
    ledger = json.loads((run / "privacy.json").read_text())
    assert abs(ledger["spent"]["epsilon"] - 3.0) < 1e-9 and ledger["releasing_rounds"] == 8
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 9
    assert json.loads((run / "graph.json").read_text())["spectral_gap"] > 0


def test_bad_input_exits_2_without_output(tmp_path):
    for setting, needle in (("privacy.epsilon=0", "privacy.epsilon"),
                            ("privacy.delta=1.5", "privacy.delta"),
                            ('privacy.noise="seed"', "privacy.noise"),
                            ("verify=true", "verify: the simulation must redraw")):
        res = hpcml_cli(1, "run", "jobs/consensus-mean.toml", "--set", f"runs_dir={tmp_path}/runs",
                        "--set", setting, cwd=_root())
        assert res.returncode == 2, (setting, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (setting, res.stderr)
    assert not (tmp_path / "runs").exists()


def test_disconnected_graph_at_four_ranks_exits_2(tmp_path):
    edges = tmp_path / "split.txt"
    edges.write_text("0 1\n2 3\n")
    res = hpcml_cli(4, "run", "jobs/consensus-mean.toml", "--set", f"runs_dir={tmp_path}/runs",
                    "--set", "graph.kind=\"file\"", "--set", f"graph.edges=\"{edges}\"",
                    cwd=_root())
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "disconnected" in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()


def test_bench_consensus_small(tmp_path):
    res = hpcml_cli(4, "bench", "consensus", "jobs/bench-consensus.toml",
                    "--set", f"runs_dir={tmp_path}", "--set", "trials=1",
                    "--set", "epsilons=[10.0, 100.0]", "--set", "graphs=[\"ring\", \"complete\"]",
                    "--set", "optim.rounds=5", cwd=_root())
    assert res.returncode == 0, res.stderr
    (run,) = tmp_path.iterdir()
    assert (run / "consensus.png").stat().st_size > 0
    assert "MPI = simulation" in (run / "table.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mpi_equals_simulation"] is True and len(summary["rows"]) == 8
    assert summary["private"] is False and summary["noise"] == "reproducible"
    assert {r["nodes"] for r in summary["rows"]} == {2, 4}


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]
