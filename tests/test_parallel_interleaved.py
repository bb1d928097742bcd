"""Interleaved 1F1B (virtual pipeline stages): the schedule against its theory on an ideal
machine, and the pipelined model against the single-process one (loss, every gradient).

The model is the pipeline tests' SkipNet: a long skip connection, a module called twice (its
parameters on two virtual stages, which may be two chunks of one rank), a parameter read between
modules, and sequence lengths that change per microbatch.
"""

import pytest
import torch
from test_parallel_pipeline import SkipNet, assert_matches, batch, reference, train_step

import hpcml.parallel as hp
from hpcml.errors import UsageError
from hpcml.parallel.pipeline_schedule import (
    in_flight,
    interleaved_one_f_one_b,
    paper_bubble,
    simulate,
    theoretical_bubble,
)
from hpcml.testing import mpi_test


@pytest.mark.parametrize(("stages", "chunks", "micro"),
                         [(1, 2, 3), (2, 2, 2), (2, 2, 4), (2, 3, 6), (4, 2, 4), (4, 2, 8),
                          (4, 3, 12), (3, 4, 6)])
def test_interleaved_schedule_runs_everything_once_with_the_interleaved_bubble(stages, chunks,
                                                                              micro):
    """Each rank runs each (microbatch, chunk) forward and backward once, forwards of a chunk
    in microbatch order, a backward after its forward; on an ideal machine (each chunk takes
    1/v of the stage time) the orders do not deadlock and every rank idles
    (S-1)/(v*M+S-1) of the time, i.e. (S-1)/(v*M) of the compute time."""
    for s in range(stages):
        actions = interleaved_one_f_one_b(stages, micro, s, chunks)
        every = [(m, c) for m in range(micro) for c in range(chunks)]
        assert sorted((m, c) for k, m, c in actions if k == "F") == every
        assert sorted((m, c) for k, m, c in actions if k == "B") == every
        for c in range(chunks):
            assert [m for k, m, x in actions if k == "F" and x == c] == list(range(micro))
        for i, (kind, m, c) in enumerate(actions):
            if kind == "B":
                assert ("F", m, c) in actions[:i]
        assert in_flight(actions) <= micro * chunks
    makespan, idle = simulate("interleaved-1f1b", stages, micro, 1.0, 2.0, chunks)
    assert makespan == pytest.approx(3.0 * (micro + (stages - 1) / chunks))
    assert idle == pytest.approx([theoretical_bubble(stages, micro, chunks)] * stages)
    assert idle[0] / (1 - idle[0]) == pytest.approx(paper_bubble(stages, micro, chunks))
    if chunks > 1 and stages > 1:  # interleaving shrinks the bubble of plain 1F1B by v
        assert idle[0] < simulate("1f1b", stages, micro)[1][0]


def test_interleaved_schedule_refuses_what_it_cannot_order():
    with pytest.raises(ValueError, match="multiple of the pipeline size 4; got 6: use "
                                         "microbatches=8"):
        interleaved_one_f_one_b(4, 6, 0, 2)
    with pytest.raises(ValueError, match="virtual_stages=2 needs schedule='interleaved-1f1b'"):
        simulate("1f1b", 2, 4, chunks=2)


def layouts(size: int) -> list[tuple[int, int, int, int]]:
    """(data, pipeline, virtual stages, microbatches) at this rank count."""
    return {1: [(1, 1, 2, 3), (1, 1, 3, 2)],
            2: [(1, 2, 2, 4), (1, 2, 3, 2)],
            4: [(1, 4, 2, 4), (2, 2, 2, 2)]}[size]


@hp.step
def predict(model, x, lengths):
    return model(x, lengths)


@mpi_test(ranks=[1, 2, 4], timeout=180, in_process=True)
def test_interleaved_pipeline_matches_single_process(comm):
    for data, stages, chunks, micro in layouts(comm.size):
        torch.manual_seed(0)
        model, reference_model = SkipNet(), SkipNet()
        reference_model.load_state_dict(model.state_dict())
        mesh = hp.Mesh(comm, data=data, pipeline=stages)
        pmodel = hp.PipelineModel(model, mesh, sample=batch(99, 2, 5)[:2], microbatches=micro,
                                  schedule="interleaved-1f1b", virtual_stages=chunks)
        assert pmodel.vstages == stages * chunks
        assert sorted({pmodel.plan.rank_of(s) for s in pmodel.plan.stage_of}) == \
            list(range(stages))
        replica = mesh.coords["data"]
        for seed, length in ((1, 7), (2, 4)):  # two steps: the reducer starts over cleanly
            x, lengths, y = batch(seed, 2 * micro * data, length)
            shards = [tuple(t.tensor_split(data)[r] for t in (x, lengths, y))
                      for r in range(data)]
            chunked = [tuple(t.tensor_split(micro)[m] for t in shard)
                       for shard in shards for m in range(micro)]
            ref_loss, ref_grads = reference(reference_model, chunked, data)
            pmodel.zero_grad()
            out = train_step(pmodel, *shards[replica])
            loss = mesh.data.allreduce(out.reduce_sum()) / data
            assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
            assert_matches(pmodel, ref_grads)
        assert pmodel.stats["in_flight"] >= 1
        # the full checkpoint gathers every chunk's parameters from the rank that runs it
        full = pmodel.full_state_dict()
        if full is not None:
            assert full.keys() == reference_model.state_dict().keys()
            assert all(torch.equal(full[k], v) for k, v in reference_model.state_dict().items())
        table = pmodel.stage_table()
        assert f"(S-1)/(v*M+S-1) = {theoretical_bubble(stages, micro, chunks):.3f}" in table
        assert f"v={chunks}" in table
        assert pmodel.partition_table().count("\n| ") == stages * chunks
        # evaluation: forwards only, each microbatch's output on the last rank
        x, lengths, _ = batch(7, 2 * micro, 5)
        with torch.no_grad():
            got = predict(pmodel, x, lengths).outputs
        if pmodel.stage == stages - 1:
            want = [reference_model(a, b) for a, b in zip(x.tensor_split(micro),
                                                          lengths.tensor_split(micro),
                                                          strict=True)]
            assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-6)
                       for g, w in zip(got, want, strict=True))
    if comm.size > 1:
        with pytest.raises(UsageError, match=f"multiple of the pipeline size {comm.size}, got "
                                             f"{comm.size + 1}; use microbatches="
                                             f"{2 * comm.size}"):
            hp.PipelineModel(SkipNet(), hp.Mesh(comm, pipeline=comm.size),
                             sample=batch(99, 2, 5)[:2], microbatches=comm.size + 1,
                             schedule="interleaved-1f1b", virtual_stages=2)
    with pytest.raises(UsageError, match="virtual_stages: 2 needs schedule='interleaved-1f1b'"):
        hp.PipelineModel(SkipNet(), hp.Mesh(comm), sample=batch(99, 2, 5)[:2],
                         virtual_stages=2)
