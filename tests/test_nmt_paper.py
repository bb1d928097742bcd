"""The paper-scale reduction preset (jobs/bench-reduction-paper.toml) at 1, 2 and 4 ranks: its
exchange bytes and peak exchange memory per rank equal the closed forms of the two paths
(dense: the model's bytes, flat in P; sparse: grows linearly in P), computed independently from
the model's parameter count and every rank's synthetic batch. The 32,768-row vocabulary is the
preset's; the width is cut to 64 for test time (the forms hold for any width). Also the
real-corpus job (jobs/transformer-nmt-catalogs.toml) end to end."""

import json
import pickle
from pathlib import Path

import pytest

from hpcml.config.schema import apply_overrides, load_job_file, read_toml
from hpcml.jobs import RunContext
from hpcml.nmt import bench
from hpcml.nmt.model import smoothed_loss_sum
from hpcml.nmt.subword import prepare
from hpcml.nmt.synthetic import SyntheticStream
from hpcml.nmt.text import read_pairs, write_pairs
from hpcml.rundir import RunDir
from hpcml.testing import hpcml_cli, mpi_test

JOB = Path(__file__).resolve().parents[1] / "jobs" / "bench-reduction-paper.toml"
SMALL = ["model.d_model=64", "model.heads=2", "model.ff=128", "steps=1", "warmup=0",
         "batch_tokens=40", "methods=['sparse_allgather', 'dense_allreduce']", "results=''",
         "projection.ranks=0"]


def tied_rows(cfg, vocab, batch):
    """Rows of the uncoalesced tied-embedding gradient of ``batch``, from a plain single-process
    backward (the sparse payload one rank contributes)."""
    model = bench._model(cfg, vocab, sparse=True)
    smoothed_loss_sum(model(batch.src, batch.tgt_in), batch.tgt_out, 0.1).backward()
    return model.embed.weight.grad._nnz()


@mpi_test(ranks=(1, 2, 4), timeout=240)
def test_paper_preset_bytes_follow_closed_forms(comm):
    cfg = load_job_file(bench.ReductionConfig, apply_overrides(read_toml(JOB), SMALL), "job",
                        comm.size)
    assert cfg.synthetic.vocab == 32768 and cfg.model.layers == 1 and cfg.scaling == "weak"
    ctx = RunContext(comm, cfg, RunDir(Path(".")))
    vocab, stream = bench._stream(cfg, comm)
    rows = {m: bench._measure_alone(cfg, ctx, m, vocab, stream) for m in cfg.methods}

    d, p = cfg.model.d_model, comm.size
    params = list(bench._model(cfg, vocab, sparse=True).parameters())
    n_all = sum(t.numel() for t in params)
    flags = 4 * len(params)                      # int32 "has a gradient" flag per tensor
    n_dense = n_all - vocab * d                  # parameters outside the tied embedding
    batches = [SyntheticStream(cfg.synthetic, cfg.batch_tokens * p, cfg.seed, r, p).batch(0)
               for r in range(p)]
    nnz = [tied_rows(cfg, vocab, b) for b in batches]
    for b, n in zip(batches, nnz, strict=True):  # every vocabulary row, plus looked-up rows
        assert vocab < n <= vocab + b.src.numel() + b.tgt_in.numel()
    row = 4 * d + 8                              # float32 row + int64 index
    gathered = sum(nnz) * row + 8 * p            # P payloads + the Allgather of counts

    dense = rows["dense_allreduce"]
    assert dense["exchange_peak_bytes"] == 4 * n_all
    assert dense["recv_bytes_per_step"] == 4 * n_all + flags
    sparse = rows["sparse_allgather"]
    assert sparse["exchange_peak_bytes"] == 4 * n_dense + gathered + vocab * row
    nnz_max_msg = len(pickle.dumps(max(nnz), protocol=pickle.HIGHEST_PROTOCOL))
    assert sparse["recv_bytes_per_step"] == 4 * n_dense + gathered + nnz_max_msg + flags
    for r in rows.values():
        assert r["rss_peak_bytes"] >= r["exchange_peak_bytes"] + 4 * n_all


CATALOGS = Path(__file__).resolve().parents[1] / "jobs" / "transformer-nmt-catalogs.toml"


def test_catalog_job_trains_and_reports_sacrebleu(tmp_path):
    """The real-corpus job end to end on 2 ranks (tiny model, a few steps, a 600/20/30-pair
    slice of the shipped catalog text re-encoded with 300 pieces): length-bucketed batches, beam
    search over the test split, sacreBLEU with its signature."""
    text = CATALOGS.parents[1] / "data" / "nmt" / "catalogs-en-fr"
    for split, n in (("train", 600), ("valid", 20), ("test", 30)):
        write_pairs(tmp_path / "txt" / split, "en", "fr", read_pairs(text / split, "en", "fr")[:n])
    corpus = prepare(tmp_path / "txt", tmp_path / "c.h5", vocab_size=300)
    sets = []
    for kv in ["model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
               "train.batch_tokens=256", "train.steps=3", "train.warmup=2", "eval.beam=2",
               "eval.valid_every=0", f"data.path={corpus}", f"runs_dir={tmp_path / 'runs'}"]:
        sets += ["--set", kv]
    res = hpcml_cli(2, "run", str(CATALOGS), *sets, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["beam"] == 2 and 0.0 <= summary["test_bleu"] <= 100.0
    assert summary["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert f"sacreBLEU {summary['test_bleu']:.2f} (beam 2): nrefs:1" in res.stdout
    assert len((run / "test-hypotheses.txt").read_text().splitlines()) == 30


@pytest.mark.parametrize("sets, match", [
    (["synthetic.vocab=0", "data.path=data/nmt/numbers-en-fr.h5"], "scaling: strong scaling"),
    (["batch_tokens=0"], "batch_tokens: 0 tokens cannot give"),
    (["synthetic.vocab=4"], "synthetic.vocab: 4 leaves no ordinary tokens")])
def test_paper_preset_bad_values_exit_2(tmp_path, sets, match):
    strong = JOB.with_name("bench-reduction-paper-strong.toml")
    args = [a for kv in [*sets, f"runs_dir={tmp_path / 'runs'}"] for a in ("--set", kv)]
    res = hpcml_cli(1, "bench", "reduction", str(strong), *args, cwd=JOB.parents[1])
    assert res.returncode == 2 and match in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
