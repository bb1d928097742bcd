"""The projection of reduction rows to the paper's machine (pure): the byte lines, the
alpha-beta step time and the first process count that runs out of node memory agree with
direct evaluation of their definitions."""

import math

import pytest

from hpcml.nmt.projection import OMNIPATH, MethodModel, ProjectionConfig, exchange_seconds, project
from hpcml.report.alphabeta import AlphaBeta

MiB = 2**20


def rows(method, base, per_rank, rss=900 * MiB, ms=1000.0, ps=(1, 2, 4)):
    return [{"method": method, "P": p, "step_ms": ms, "exchange_peak_bytes": base + per_rank * p,
             "recv_bytes_per_step": base + per_rank * p, "rss_peak_bytes": rss} for p in ps]


def test_exchange_time_is_the_alpha_beta_sum():
    ab = AlphaBeta(alpha=2e-6, beta=1e-9, ranks=2, points=2, rms_rel_error=0.0)
    n, m, p = 96 * MiB, 68 * MiB, 64
    buckets = math.ceil(n / (16 * MiB))
    expect = buckets * 2 * 6 * ab.alpha + 2 * (p - 1) / p * n * ab.beta
    assert exchange_seconds(ab, p, n, 0, 16 * MiB) == pytest.approx(expect)
    assert exchange_seconds(ab, p, n, m, 16 * MiB) == pytest.approx(
        expect + (p - 1) * (ab.alpha + m * ab.beta))
    assert exchange_seconds(ab, 1, n, m, 16 * MiB) == 0.0


def test_out_of_memory_rank_count_matches_brute_force():
    cfg = ProjectionConfig(ranks=1200, ranks_per_node=4, node_memory_gib=192.0)
    sparse = rows("sparse_allgather", 28 * MiB, 68 * MiB)
    dense = rows("dense_allreduce", 96 * MiB, 0)
    model = MethodModel.from_rows(sparse)
    assert model.peak == pytest.approx((28 * MiB, 68 * MiB))
    node = cfg.node_memory_gib * 2**30
    first = next(p for p in range(1, 5000) if model.node_bytes(p, 4) > node)
    assert model.first_p_out_of_memory(node, 4) == first
    table, facts = project(sparse + dense, "weak", cfg, 16 * MiB, OMNIPATH)
    assert facts["out_of_memory_at"] == {"sparse_allgather": first, "dense_allreduce": None}
    for r in table:
        assert (r["fits_node"] == "yes") == (r["method"] == "dense_allreduce" or r["P"] < first)
    projected = [r for r in table if r["source"] == "projected"]
    assert {r["P"] for r in projected} == {16, 64, 256, 1024, 1200}
    dense_1200 = next(r for r in projected if r["method"] == "dense_allreduce" and r["P"] == 1200)
    assert dense_1200["step_ms"] == pytest.approx(
        1000.0 + 1e3 * exchange_seconds(OMNIPATH, 1200, 96 * MiB, 0, 16 * MiB))


def test_strong_scaling_divides_compute():
    table, _ = project(rows("dense_allreduce", 96 * MiB, 0), "strong",
                       ProjectionConfig(ranks=400), 16 * MiB, OMNIPATH)
    r = next(r for r in table if r["P"] == 400)
    t = 1.0 / 400 + exchange_seconds(OMNIPATH, 400, 96 * MiB, 0, 16 * MiB)
    assert r["step_ms"] == pytest.approx(1e3 * t)
    assert r["efficiency"] == pytest.approx(1.0 / (400 * t))
