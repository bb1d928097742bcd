"""Tensor parallelism against the single-process model: loss, every gradient and the full-state
checkpoint of an MLP and of the hpcml NMT transformer at 1, 2 and 4 ranks; vocabulary-parallel
cross entropy against ``F.cross_entropy``; the pure slicing and planning in one process."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcml.comm import chunk_bounds, world
from hpcml.errors import UsageError
from hpcml.nmt.model import Transformer, smoothed_loss_sum
from hpcml.parallel import Mesh
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.tensor import (
    Shard,
    default_plan,
    full_state_dict,
    load_full_state_dict,
    parallelize,
    vocab_parallel_cross_entropy,
)
from hpcml.testing import mpi_test

PAD = 0


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def assert_grads_match(par: nn.Module, ref: nn.Module, comm) -> None:
    """Every parameter's gradient on this rank equals its slice of the reference gradient."""
    shards = shards_of(par)
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in par.named_parameters()]
    assert sorted(names) == sorted(ref_params), "parallel model must keep the parameter names"
    for name, p in par.named_parameters():
        want = ref_params[name].grad
        if name in shards:
            want = shards[name].local(want, comm.size, comm.rank)
        assert p.grad is not None, name
        assert p.grad.shape == want.shape, name
        assert rel_err(p.grad, want) <= 1e-5, (name, rel_err(p.grad, want))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(),
                         nn.Linear(8, 4), nn.GELU(), nn.Linear(4, 3))


def transformer() -> Transformer:
    torch.manual_seed(1)
    return Transformer(vocab=13, d_model=16, heads=4, layers=1, ff=32, dropout=0.0, sparse=False)


def batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, 13, (3, 7), generator=g)
    tgt = torch.randint(1, 13, (3, 6), generator=g)
    src[0, 5:] = PAD
    tgt[1, 4:] = PAD
    return src, tgt[:, :-1], tgt[:, 1:]


def tp_transformer_loss(model: Transformer, comm, seed: int = 2) -> torch.Tensor:
    src, tgt_in, tgt_out = batch(seed)
    return vocab_parallel_cross_entropy(model(src, tgt_in), tgt_out, comm, ignore_index=PAD,
                                        label_smoothing=0.1, reduction="sum")


def ref_transformer_loss(model: Transformer, seed: int = 2) -> torch.Tensor:
    src, tgt_in, tgt_out = batch(seed)
    return smoothed_loss_sum(model(src, tgt_in), tgt_out, 0.1)


def shards_of(model: nn.Module) -> dict:
    return {f"{prefix}.{p}" if prefix else p: s for prefix, m in model.named_modules()
            for p, s in getattr(m, "tp_shards", {}).items()}


@mpi_test(ranks=[1, 2, 4], timeout=180, in_process=True)
def test_tensor_parallel_matches_single_process(comm):
    # an MLP under the default plan (column, row, column, row) with a gathered-free chain
    ref, par = mlp(), parallelize(mlp(), comm)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    ref(x).square().sum().backward()
    loss = par(x).square().sum()
    loss.backward()
    assert rel_err(loss, ref(x).square().sum()) <= 1e-5
    assert_grads_match(par, ref, comm)

    # vocabulary-parallel cross entropy (13 ids: uneven shards at 2 and 4 ranks)
    full = torch.randn(20, 13, generator=torch.Generator().manual_seed(4), requires_grad=True)
    target = torch.randint(0, 13, (20,), generator=torch.Generator().manual_seed(5))
    target[:3] = PAD
    lo, hi = chunk_bounds(13, comm.size, comm.rank)
    for smoothing, reduction in ((0.0, "mean"), (0.1, "sum"), (0.2, "none")):
        full.grad = None
        local = full.detach()[:, lo:hi].clone().requires_grad_()
        want = F.cross_entropy(full, target, ignore_index=PAD, label_smoothing=smoothing,
                               reduction=reduction)
        got = vocab_parallel_cross_entropy(local, target, comm, ignore_index=PAD,
                                           label_smoothing=smoothing, reduction=reduction)
        assert rel_err(got, want) <= 1e-6
        want.sum().backward()
        got.sum().backward()
        assert rel_err(local.grad, full.grad[:, lo:hi]) <= 1e-5

    # the NMT transformer: heads, vocabulary-parallel tied embedding, column/row feed-forward
    ref, par = transformer(), parallelize(transformer(), comm)
    ref_loss = ref_transformer_loss(ref)
    ref_loss.backward()
    loss = tp_transformer_loss(par, comm)
    loss.backward()
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_grads_match(par, ref, comm)
    with torch.no_grad():  # eval mode must not take torch's fused path around the shards
        ref.eval(), par.eval()
        assert rel_err(tp_transformer_loss(par, comm), ref_transformer_loss(ref)) <= 1e-5
    if comm.size > 1:
        assert comm.ledger.ops["Allreduce"].calls > 0

    # checkpoint: the full state gathers to the single-process model's, saved and loaded with
    # weights_only, into one process and into a parallel model of another degree
    state = full_state_dict(par, comm)
    single = transformer().state_dict()
    assert state.keys() == single.keys()
    for name, value in single.items():
        assert torch.equal(state[name], value), name
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = Transformer(vocab=13, d_model=16, heads=4, layers=1, ff=32, dropout=0.0,
                        sparse=False)
    fresh.load_state_dict(loaded)
    assert torch.equal(ref_transformer_loss(fresh), ref_loss.detach())
    half = comm.split(comm.rank % 2, name="tp_half") if comm.size == 4 else comm
    other = Transformer(vocab=13, d_model=16, heads=4, layers=1, ff=32, dropout=0.0, sparse=False)
    other.load_state_dict(loaded)
    other = parallelize(other, half)
    assert rel_err(tp_transformer_loss(other, half), ref_loss) <= 1e-5
    zeroed = parallelize(Transformer(vocab=13, d_model=16, heads=4, layers=1, ff=32,
                                     dropout=0.0, sparse=False), half)
    load_full_state_dict(zeroed, loaded, half)
    assert rel_err(tp_transformer_loss(zeroed, half), ref_loss) <= 1e-5
    if comm.size == 4:
        check_tensor_times_data_parallel(comm)
    check_dropout(comm)
    check_gather_costs_one_collective(comm)


def check_gather_costs_one_collective(comm) -> None:
    """An uneven gather (13 columns) and the backward of an uneven scatter: each one
    Allgatherv, no other message (the part lengths are computed, not exchanged)."""
    from hpcml.parallel.tensor import gather, scatter

    def calls() -> dict:
        return {op: t["calls"] for op, t in comm.ledger.totals().items()}

    full = torch.arange(26, dtype=torch.float32).reshape(2, 13)
    lo, hi = chunk_bounds(13, comm.size, comm.rank)
    part = full[:, lo:hi].clone().requires_grad_()
    whole = full.clone().requires_grad_()
    before = calls()
    out = gather(part, comm, -1, total=13)
    out.backward(full)
    mine = scatter(whole, comm, -1)
    mine.backward(full[:, lo:hi] * 2)
    after = calls()
    spent = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
    assert spent == ({"Allgatherv": 2} if comm.size > 1 else {}), spent
    assert torch.equal(out, full) and torch.equal(part.grad, full[:, lo:hi])
    assert torch.equal(mine, full[:, lo:hi]) and torch.equal(whole.grad, full * 2)
    with pytest.raises(UsageError, match="pass the full length"):
        gather(part, comm, -1, total=26)  # every rank's part is too short: no rank communicates


def check_tensor_times_data_parallel(comm) -> None:
    """data 2 x tensor 2, run inside the 4-rank case above (one launch fewer): TP transformer,
    ZeRO-1 SGD with momentum over the data groups, against one process on the summed loss of both
    data groups' batches. Not Adam: the key bias has an exactly-zero gradient (softmax ignores a
    shift common to all keys), and Adam would turn its float-rounding noise into full-size steps
    of arbitrary sign in either run."""
    mesh = Mesh(comm, data=2, tensor=2)
    tp, dp = mesh["tensor"], mesh["data"]
    ref, par = transformer(), parallelize(transformer(), tp)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt = ShardedOptimizer(par.parameters(), torch.optim.SGD, dp, average=False, lr=0.01,
                           momentum=0.9)
    for step in range(3):
        ref_opt.zero_grad()
        sum(ref_transformer_loss(ref, seed=10 * step + d) for d in range(2)).backward()
        ref_opt.step()
        opt.zero_grad()
        tp_transformer_loss(par, tp, seed=10 * step + dp.rank).backward()
        opt.step()
    shards, ref_params = shards_of(par), dict(ref.named_parameters())
    for name, p in par.named_parameters():
        want = ref_params[name].detach()
        if name in shards:
            want = shards[name].local(want, tp.size, tp.rank)
        assert rel_err(p.detach(), want) <= 1e-5, name


def dropout_mlp() -> nn.Sequential:
    """column -> tanh -> dropout of the sharded hidden -> row -> dropout of the replicated output"""
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 6),
                         nn.Dropout(0.5))


def recorded_masks(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """Output and each dropout module's mask (output != 0; inputs are nonzero almost surely)."""
    masks, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: masks.__setitem__(name, out.detach() != 0)))
    torch.manual_seed(seed)
    out = model(x)
    for h in hooks:
        h.remove()
    return out, masks


def check_dropout(comm) -> None:
    """Dropout under tensor parallelism: (a) replicated activations stay identical on every
    tensor rank, (b) masks of sharded activations differ between ranks (hidden layer and
    attention heads), (c) the parallel MLP equals one process whose masks are the ranks' masks
    put together, and activation checkpointing recomputes the same masks."""
    from torch.utils.checkpoint import checkpoint

    from hpcml.parallel.tensor import ShardedDropout

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(8))
    ref, par = dropout_mlp(), parallelize(dropout_mlp(), comm)
    assert isinstance(par[2], ShardedDropout) and type(par[4]) is nn.Dropout
    out, masks = recorded_masks(par, x, seed=11)
    hidden, replicated = comm.allgather(masks["2"]), comm.allgather(masks["4"])
    outs = comm.allgather(out.detach())
    assert all(torch.equal(o, outs[0]) for o in outs)                      # (a)
    assert all(torch.equal(m, replicated[0]) for m in replicated)
    assert all(not torch.equal(hidden[i], hidden[j]) for i in range(comm.size)  # (b)
               for j in range(i))
    assert 0.4 < float(masks["2"].float().mean()) < 0.6
    # (c) the single-process model with those masks, written out by hand
    full_mask = torch.cat(hidden, dim=1).float()
    w1, b1, w2, b2 = (t.detach().clone().requires_grad_() for t in
                      (ref[0].weight, ref[0].bias, ref[3].weight, ref[3].bias))
    h = torch.tanh(x @ w1.T + b1) * full_mask / 0.5
    want = (h @ w2.T + b2) * replicated[0].float() / 0.5
    assert rel_err(out, want) <= 1e-5
    weights = torch.randn(64, 6, generator=torch.Generator().manual_seed(9))
    (want * weights).sum().backward()
    (out * weights).sum().backward()
    lo, hi = chunk_bounds(16, comm.size, comm.rank)
    assert rel_err(par[0].weight.grad, w1.grad[lo:hi]) <= 1e-5
    assert rel_err(par[3].weight.grad, w2.grad[:, lo:hi]) <= 1e-5
    # activation checkpointing: the recomputation draws the same masks (same gradients)
    grads = [p.grad.clone() for p in par.parameters()]
    par.zero_grad()
    torch.manual_seed(11)
    again = checkpoint(par, x, use_reentrant=False)
    assert torch.equal(again, out)
    (again * weights).sum().backward()
    for p, g in zip(par.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    if comm.size > 1:
        check_attention_dropout(comm)


def check_attention_dropout(comm) -> None:
    """Every head computes the same thing (identical weights), so the ranks' per-head outputs
    differ only by their dropout masks: equal in eval mode, different in training; and the
    transformer's replicated activations stay identical on every rank with dropout on."""
    torch.manual_seed(12)
    full = nn.MultiheadAttention(8, 4, dropout=0.5, batch_first=True)
    with torch.no_grad():
        for w in (full.in_proj_weight, full.in_proj_bias):
            blocks = w.unflatten(0, (3, 4, 2))
            blocks.copy_(blocks[:, :1].expand_as(blocks).clone())
    attn = parallelize(nn.Sequential(full), comm)[0]
    seen = []
    attn.out_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(13))
    for training in (False, True):
        attn.train(training)
        seen.clear()
        attn(x, x, x)
        ctx = comm.allgather(seen[0].unflatten(-1, (-1, 2))[..., 0, :])  # this rank's first head
        assert all(torch.equal(c, ctx[0]) for c in ctx) != training, training
    # the training path (explicit softmax, then the sharded dropout) computes what SDPA computes,
    # fully masked rows included: compare with a dropout that (almost surely) keeps everything
    mask = torch.zeros(5, 5)
    mask[2] = float("-inf")
    attn.dropout = 1e-12
    want = attn.eval()(x, x, x, attn_mask=mask)[0]
    got = attn.train()(x, x, x, attn_mask=mask)[0]
    assert rel_err(got, want) <= 1e-5 and not got.isnan().any()
    model = parallelize(Transformer(vocab=13, d_model=16, heads=4, layers=1, ff=32,
                                    dropout=0.3, sparse=False), comm)
    states = []
    model.decoder.register_forward_hook(lambda _m, _i, out: states.append(out.detach()))
    torch.manual_seed(14)
    tp_transformer_loss(model, comm).backward()
    torch.manual_seed(14)
    model.eval()
    tp_transformer_loss(model, comm)
    assert not torch.equal(states[0], states[1])  # dropout did act
    gathered = comm.allgather(states[0])
    assert all(torch.equal(s, gathered[0]) for s in gathered)
    norms = comm.allgather(model.decoder.norm.weight.grad)
    assert all(rel_err(g, norms[0]) <= 1e-6 for g in norms)


def test_shard_slices_tile_the_parameter():
    full = torch.arange(2 * 3 * 12 * 5, dtype=torch.float32).reshape(2, 36, 5)
    for size in (1, 2, 3, 4):
        parts = [Shard(1, blocks=3).local(full, size, r) for r in range(size)]
        blocks = [torch.cat([p.unflatten(1, (3, -1))[:, b] for p in parts], dim=1)
                  for b in range(3)]
        assert torch.equal(torch.cat(blocks, dim=1), full)
    assert Shard(0).local(torch.arange(13), 4, 3).tolist() == [10, 11, 12]


def test_default_plan():
    assert default_plan(mlp()) == {"0": "column", "2": "row", "4": "column", "6": "row"}
    plan = default_plan(transformer())
    assert plan["embed"] == "vocab"
    assert plan["encoder.layers.0.self_attn"] == "heads"
    assert plan["decoder.layers.0.multihead_attn"] == "heads"
    assert plan["encoder.layers.0.linear1"] == "column"
    assert plan["decoder.layers.0.linear2"] == "row"
    assert not any(".out_proj" in name for name in plan)
    odd = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    assert default_plan(odd) == {"0": "column", "2": "row", "3": "replicate"}


def test_user_plan_and_bad_plans():
    model = parallelize(mlp(), world(), plan={"0": "replicate", "2": "replicate"})
    assert type(model[0]) is nn.Linear and type(model[4]).__name__ == "ColumnParallelLinear"
    with pytest.raises(UsageError, match="no module 'nope'"):
        parallelize(mlp(), world(), plan={"nope": "column"})
    with pytest.raises(UsageError, match="style 'diagonal'"):
        parallelize(mlp(), world(), plan={"0": "diagonal"})
    with pytest.raises(UsageError, match="needs an nn.Embedding"):
        parallelize(mlp(), world(), plan={"0": "vocab"})


class _FakeGroup:
    size, rank = 3, 0


def test_uneven_split_is_refused():
    from hpcml.parallel.tensor import ColumnParallelLinear, HeadParallelAttention

    with pytest.raises(UsageError, match="out_features = 16 does not split evenly over 3"):
        ColumnParallelLinear(nn.Linear(4, 16), _FakeGroup())
    with pytest.raises(UsageError, match="num_heads = 4"):
        HeadParallelAttention(nn.MultiheadAttention(12, 4, batch_first=True), _FakeGroup())
