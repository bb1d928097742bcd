"""``hpcml bench qsparse`` end to end on 2 ranks with a short schedule."""

import json
from pathlib import Path

from hpcml.testing import hpcml_cli

ROOT = Path(__file__).resolve().parents[1]


def test_bench_reports_every_method_with_exact_bits(tmp_path):
    runs = tmp_path / "runs"
    res = hpcml_cli(2, "bench", "qsparse", str(ROOT / "jobs/bench-qsparse.toml"),
                    "--set", "train.steps=48", "--set", "train.eval_every=8",
                    "--set", "train.target=0.5", "--set", "train.H=4",
                    "--set", f"data.path='{ROOT / 'data/qsparse/digits.h5'}'",
                    "--set", f"runs_dir='{runs}'", cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr
    (run,) = list(runs.iterdir())
    assert (run / "qsparse.png").stat().st_size > 0 and (run / "table.md").is_file()
    rows = {r["method"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}
    assert list(rows) == ["vanilla", "topk", "qsgd", "local", "qsparse-sync", "qsparse-async"]
    d = 4810
    per_sync = {"vanilla": 32 * d, "topk": 48 * (13 + 32), "qsgd": 32 + d * 5,
                "local": 32 * d, "qsparse-sync": 48 * 13 + 32 + 48 * 5,
                "qsparse-async": 48 * 13 + 32 + 48 * 5}
    syncs = {"vanilla": 48, "topk": 48, "qsgd": 48, "local": 12, "qsparse-sync": 12,
             "qsparse-async": 12}
    for method, r in rows.items():
        assert r["bits_per_sync"] == per_sync[method]
        assert r["bits_total"] == syncs[method] * per_sync[method]
        assert r["mpi_bytes"] >= r["bits_total"] / 8
    assert rows["vanilla"]["bits_ratio"] == 1.0
    assert rows["qsparse-sync"]["workers"] == 2 and rows["qsparse-async"]["workers"] == 1
