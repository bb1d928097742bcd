"""The paper-scale reduction preset (jobs/bench-reduction-paper.toml) at 1, 2 and 4 ranks: its
exchange bytes and peak exchange memory per rank equal the closed forms of the two paths
(dense: the model's bytes, flat in P; sparse: grows linearly in P), computed independently from
the model's parameter count and every rank's synthetic batch. The 32,768-row vocabulary is the
preset's; the width is cut to 64 for test time (the forms hold for any width)."""

import pickle
from pathlib import Path

from hpcml.config.schema import apply_overrides, load_job_file, read_toml
from hpcml.jobs import RunContext
from hpcml.nmt import bench
from hpcml.nmt.synthetic import SyntheticStream
from hpcml.rundir import RunDir
from hpcml.testing import mpi_test

JOB = Path(__file__).resolve().parents[1] / "jobs" / "bench-reduction-paper.toml"
SMALL = ["model.d_model=64", "model.heads=2", "model.ff=128", "steps=1", "warmup=0",
         "batch_tokens=40", "methods=['sparse_allgather', 'dense_allreduce']", "results=''",
         "projection.ranks=0"]


@mpi_test(ranks=(1, 2, 4), timeout=240)
def test_paper_preset_bytes_follow_closed_forms(comm):
    cfg = load_job_file(bench.ReductionConfig, apply_overrides(read_toml(JOB), SMALL), "job",
                        comm.size)
    assert cfg.synthetic.vocab == 32768 and cfg.model.layers == 1 and cfg.scaling == "weak"
    ctx = RunContext(comm, cfg, RunDir(Path(".")))
    vocab, stream = bench._stream(cfg, comm)
    rows = {m: bench._measure_alone(cfg, ctx, m, vocab, stream) for m in cfg.methods}

    d, p = cfg.model.d_model, comm.size
    n_all = sum(t.numel() for t in bench._model(cfg, vocab, sparse=True).parameters())
    n_dense = n_all - vocab * d                  # parameters outside the tied embedding
    batches = [SyntheticStream(cfg.synthetic, cfg.batch_tokens * p, cfg.seed, r, p).batch(0)
               for r in range(p)]
    # uncoalesced tied-embedding gradient: every projection row + one row per looked-up id
    nnz = [vocab + b.src.numel() + b.tgt_in.numel() for b in batches]
    row = 4 * d + 8                              # float32 row + int64 index
    gathered = sum(nnz) * row + 8 * p            # P payloads + the Allgather of counts

    dense = rows["dense_allreduce"]
    assert dense["exchange_peak_bytes"] == 4 * n_all
    assert dense["recv_bytes_per_step"] == 4 * n_all
    sparse = rows["sparse_allgather"]
    assert sparse["exchange_peak_bytes"] == 4 * n_dense + gathered + vocab * row
    nnz_max_msg = len(pickle.dumps(max(nnz), protocol=pickle.HIGHEST_PROTOCOL))
    assert sparse["recv_bytes_per_step"] == 4 * n_dense + gathered + nnz_max_msg
    for r in rows.values():
        assert r["rss_peak_bytes"] >= r["exchange_peak_bytes"] + 4 * n_all
