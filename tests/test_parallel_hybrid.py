"""Hybrid layouts against the single-process model on the same global batch (float32; every
tensor within 1e-5 of the reference, relative to the reference tensor's largest element):

- pipeline 2 x tensor 2, GPipe and 1F1B, on the hpcml NMT transformer (head-parallel attention,
  column/row feed-forward, a vocabulary-parallel embedding tied to the output projection, held by
  the first and the last stage, and the vocabulary-parallel loss on the last stage): the loss,
  every gradient on every rank (its shard of the reference gradient), the whole gradients and
  state dict gathered to the first rank;
- pipeline 2 x tensor 2 on a small tied language model: the parameters after one Adam step;
- data 2 x pipeline 2 (4 ranks) and pipeline 2 (2 ranks) with ZeRO-1 Adam: the model leaves the
  data-parallel reduction to the optimizer (each replica's gradients are its own batch's), the
  parameters after two steps, Adam state split over the data group, and the saved activations
  the same as without ZeRO (its flat parameter buffer is not counted as an activation).
"""

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcml.parallel as hp
from hpcml.errors import UsageError
from hpcml.nmt.model import Transformer, smoothed_loss_sum
from hpcml.parallel.pipeline_trace import trace
from hpcml.parallel.tensor import vocab_parallel_cross_entropy
from hpcml.parallel.tensor.plan import sharded_parameters
from hpcml.testing import launch, mpi_test

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline_hybrid_nmt.py"
PAD = 0
VOCAB = 13  # splits 7 / 6 over two tensor ranks


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def local_piece(model: nn.Module, name: str, full: torch.Tensor, tp) -> torch.Tensor:
    """This tensor rank's piece of the single-process tensor ``full`` of parameter ``name``."""
    shard = sharded_parameters(model).get(name)
    return full if shard is None else shard.local(full, tp.size, tp.rank)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.tanh(self.fc1(h)))


class TiedLM(nn.Module):
    """Embedding, residual blocks, norm, and the embedding again as the output projection
    (``project`` when it is vocabulary-parallel: this rank's logit slice)."""

    def __init__(self, vocab: int = VOCAB - 2, d: int = 8, blocks: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        project = getattr(self.embed, "project", None)
        return project(h) if project is not None else F.linear(h, self.embed.weight)


def lm_batch(seed: int, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (n, length + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def nmt_batch(seed: int, n: int) -> tuple[torch.Tensor, ...]:
    """src, tgt_in, tgt_out with PAD-filled sentences of varying length."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, VOCAB, (n, 7), generator=g)
    tgt = torch.randint(1, VOCAB, (n, 6), generator=g)
    src[0, 4:] = PAD
    tgt[1, 3:] = PAD
    return src, tgt[:, :-1], tgt[:, 1:]


def transformer() -> Transformer:
    torch.manual_seed(1)
    return Transformer(vocab=VOCAB, d_model=16, heads=4, layers=2, ff=32, dropout=0.0,
                       sparse=False)


@hp.step
def nmt_step(model, src, tgt_in, tgt_out, tp):
    loss = vocab_parallel_cross_entropy(model(src, tgt_in), tgt_out, tp, ignore_index=PAD,
                                        label_smoothing=0.1, reduction="sum")
    model.backward(loss)
    return loss


@hp.step
def predict(model, src, tgt_in):
    return model(src, tgt_in)


@hp.step
def lm_step(model, ids, target, tp, scale):
    logits = model(ids)
    loss = scale * (vocab_parallel_cross_entropy(logits, target, tp, reduction="sum")
                    if tp.size > 1 else F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                                        reduction="sum"))
    model.backward(loss)
    return loss


def lm_reference(model: nn.Module, chunks: list[tuple], scale: float) -> float:
    """Gradients (accumulated in ``model``) and loss of the summed microbatch losses."""
    total = 0.0
    for ids, target in chunks:
        loss = scale * F.cross_entropy(model(ids).flatten(0, 1), target.flatten(),
                                       reduction="sum")
        loss.backward()
        total += float(loss)
    return total


def check_pipeline_x_tensor(comm, schedule: str) -> None:
    """The NMT transformer on pipeline 2 x tensor 2: loss, every gradient (on every rank and
    gathered whole), the gathered state dict."""
    mesh = hp.Mesh(comm, pipeline=2, tensor=2)
    tp = mesh.tensor
    ref = transformer()
    pmodel = hp.PipelineModel(hp.parallelize(transformer(), tp), mesh,
                              sample=nmt_batch(9, 2)[:2], microbatches=3, schedule=schedule)
    src, tgt_in, tgt_out = nmt_batch(3, 6)
    ref_loss = sum(smoothed_loss_sum(ref(s, i), o, 0.1) for s, i, o in
                   zip(src.tensor_split(3), tgt_in.tensor_split(3), tgt_out.tensor_split(3),
                       strict=True))
    ref_loss.backward()
    ref_loss = float(ref_loss.detach())
    loss = nmt_step(pmodel, src, tgt_in, tgt_out, tp).reduce_sum()
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss, (loss, ref_loss)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in pmodel.named_parameters():
        want = local_piece(pmodel.module, name, ref_grads[name], tp)
        assert p.grad.shape == want.shape, name
        assert rel_err(p.grad, want) <= 1e-5, (schedule, name, rel_err(p.grad, want))
    # every rank (each tensor rank of each stage) works with the same partition and plan
    assert len({repr((p.stage_of, p.live, sorted(p.holders.items())))
                for p in comm.allgather(pmodel.plan)}) == 1
    # every parameter is held somewhere; the embedding by the first and the last stage
    held = comm.allgather(sorted(n for n, _ in pmodel.named_parameters()))
    assert set().union(*held) == set(ref_grads)
    assert all("embed.weight" in h for h in held)
    assert mesh.tensor.ledger.ops["tensor.Allreduce"].calls > 0
    full = pmodel.gather_full({n: p.grad for n, p in pmodel.named_parameters()})
    state = pmodel.full_state_dict()
    if comm.rank == 0:
        assert full.keys() == ref_grads.keys()
        for name, grad in full.items():
            assert rel_err(grad, ref_grads[name]) <= 1e-5, (schedule, name)
        assert list(state) == list(ref.state_dict())
        for name, value in ref.state_dict().items():
            assert torch.equal(state[name], value), name
    else:
        assert full is None and state is None
    # evaluation: forward-only steps; the last stage returns its vocabulary slice of the logits
    with torch.no_grad():
        out = predict(pmodel, src, tgt_in)
        if pmodel.stage == 1:
            lo, hi = pmodel.module.embed.vocab_start, pmodel.module.embed.vocab_end
            for got, s, i in zip(out.outputs, src.tensor_split(3), tgt_in.tensor_split(3),
                                 strict=True):
                assert rel_err(got, ref(s, i)[..., lo:hi]) <= 1e-5
        else:
            assert out.outputs == []


def check_pipeline_x_tensor_adam(comm) -> None:
    """The tied LM on pipeline 2 x tensor 2: one Adam step equals the single-process one."""
    mesh = hp.Mesh(comm, pipeline=2, tensor=2)
    tp = mesh.tensor
    torch.manual_seed(2)
    ref = TiedLM()
    model = TiedLM()
    model.load_state_dict(ref.state_dict())
    pmodel = hp.PipelineModel(hp.parallelize(model, tp), mesh, sample=lm_batch(8, 2, 3)[:1],
                              microbatches=2)
    assert {pmodel.plan.owner("embed.weight")} | pmodel.plan.holders["embed.weight"] == {0, 1}
    ids, target = lm_batch(4, 4, 5)
    scale = 1.0 / target.numel()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    ref_loss = lm_reference(ref, list(zip(ids.tensor_split(2), target.tensor_split(2),
                                          strict=True)), scale)
    ref_opt.step()
    opt = torch.optim.Adam(pmodel.parameters(), lr=0.01)
    loss = lm_step(pmodel, ids, target, tp, scale).reduce_sum()
    opt.step()
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    ref_params = dict(ref.named_parameters())
    for name, p in pmodel.named_parameters():
        want = local_piece(pmodel.module, name, ref_params[name].detach(), tp)
        assert rel_err(p.detach(), want) <= 1e-5, (name, rel_err(p.detach(), want))


def check_pipeline_x_zero(comm, data: int) -> None:
    """data x pipeline 2 with ZeRO-1 Adam against one process on the global batch (two steps),
    and against the same layout with plain Adam (activation bytes)."""
    mesh = hp.Mesh(comm, data=data, pipeline=2)
    torch.manual_seed(3)
    ref = TiedLM()
    models = [TiedLM(), TiedLM()]
    for m in models:
        m.load_state_dict(ref.state_dict())
    sample = lm_batch(8, 2, 3)[:1]
    zero = hp.PipelineModel(models[0], mesh, sample=sample, microbatches=2,
                            data_reduction="optimizer")
    plain = hp.PipelineModel(models[1], mesh, sample=sample, microbatches=2)
    opt = hp.ShardedOptimizer(zero.parameters(), torch.optim.Adam, mesh.data, lr=0.01)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    replica = mesh.coords["data"]
    for step, length in enumerate((5, 3)):
        ids, target = lm_batch(10 + step, 4 * data, length)
        scale = 1.0 / target.numel()
        shards = list(zip(ids.tensor_split(data), target.tensor_split(data), strict=True))
        # this replica's own gradient: the model must not have reduced it over the data group
        mine = TiedLM()
        mine.load_state_dict(ref.state_dict())
        lm_reference(mine, [tuple(t.tensor_split(2)[m] for t in shards[replica])
                            for m in range(2)], scale * data)
        ref_opt.zero_grad()
        lm_reference(ref, [tuple(t.tensor_split(2)[m] for t in shard)
                           for shard in shards for m in range(2)], scale)
        ref_opt.step()
        for pm, o in ((zero, opt), (plain, plain_opt)):
            o.zero_grad()
            lm_step(pm, *shards[replica], mesh.tensor, scale * data)
        own = dict(mine.named_parameters())
        for name, p in zero.named_parameters():
            assert rel_err(p.grad, own[name].grad) <= 1e-5, (name, "reduced by the model?")
        opt.step()
        plain_opt.step()
        assert zero.stats["peak_activation_bytes"] == plain.stats["peak_activation_bytes"]
    ref_params = dict(ref.named_parameters())
    for pm in (zero, plain):
        for name, p in pm.named_parameters():
            assert rel_err(p.detach(), ref_params[name].detach()) <= 1e-5, name
    plain_state = sum(v.numel() for s in plain_opt.state.values() for v in s.values()
                      if v.dim() > 0)
    zero_state = sum(v.numel() for s in opt.inner.state.values() for v in s.values()
                     if v.dim() > 0)
    assert zero_state <= plain_state // data + 2 * data, (zero_state, plain_state)
    assert zero.exchange_bytes == 0  # no gradient buckets: the optimizer reduces
    with pytest.raises(UsageError, match="gather_full: \\['blocks.9.fc1.weight'\\] are not keys"):
        zero.gather_full({"blocks.9.fc1.weight": torch.zeros(1)})
    with pytest.raises(UsageError, match="data_reduction: 'zero' is not one of"):
        hp.PipelineModel(TiedLM(), mesh, sample=sample, data_reduction="zero")


@mpi_test(ranks=[2, 4], timeout=240, in_process=True)
def test_hybrid_layouts_match_single_process(comm):
    if comm.size == 4:
        for schedule in ("gpipe", "1f1b"):
            check_pipeline_x_tensor(comm, schedule)
        check_pipeline_x_tensor_adam(comm)
    check_pipeline_x_zero(comm, data=comm.size // 2)


def test_trace_structure_digest_ignores_shapes_not_structure():
    """What the ranks compare before sharing rank 0's partition: equal for the same model
    traced on batches of other shapes (or other weights), different for another model."""
    def digest(model: nn.Module, n: int, length: int) -> str:
        return trace(model, lm_batch(0, n, length)[:1], {}, stages=2).structure()

    torch.manual_seed(0)
    first = digest(TiedLM(), 2, 3)
    torch.manual_seed(1)
    assert digest(TiedLM(), 3, 5) == first
    assert digest(TiedLM(blocks=3), 2, 3) != first


def test_example_script_pipeline_x_tensor_trains_like_one_process(tmp_path):
    """examples/pipeline_hybrid_nmt.py (the README's script) at pipeline 2 x tensor 2 reaches
    the single process's loss after the same steps on the same global batches (Adam amplifies
    float rounding a little: 1e-3 relative), and its checkpoint is the single-process state
    dict. (Data x pipeline x ZeRO-1 is checked step by step above.)"""
    def run(ranks: int, *args: str) -> float:
        res = launch(ranks, [sys.executable, str(EXAMPLE), "--steps", "10", *args],
                     timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        return float(re.search(r"steps: loss ([\d.]+)", res.stdout).group(1))

    single = run(1, "--pipeline", "1")
    ckpt = tmp_path / "pp2xtp2.pt"
    assert run(4, "--pipeline", "2", "--tensor", "2", "--checkpoint", str(ckpt)) == \
        pytest.approx(single, rel=1e-3)
    plain = Transformer(40, d_model=32, heads=4, layers=2, ff=64, dropout=0.0, sparse=False)
    plain.load_state_dict(torch.load(ckpt, weights_only=True))
