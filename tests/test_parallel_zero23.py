"""ZeRO-2 and ZeRO-3 (:class:`hpcml.parallel.ShardedOptimizer` with ``stage=2/3``) against one
process running the unsharded optimizer on the global batch, at 1, 2 and 4 ranks, in one launch
per rank count: loss, averaged gradients (gathered from the shards) and parameters after
several steps; uneven unit sizes (padded); a unit called twice; accumulation over two backward
passes; global gradient clipping (:func:`hpcml.parallel.clip_grad_norm_`) against
``torch.nn.utils.clip_grad_norm_``; data x tensor and data x pipeline at 4 ranks; and the
refusals, in one process."""

import pytest
import torch
from torch import nn

import hpcml.parallel as hp
from hpcml.errors import UsageError
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.testing import mpi_test


class Twice(nn.Module):
    """``a`` is called twice per forward (a unit used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "twice":
        return Twice()
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # 42 and 24 elements


def batch(rank: int, step: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, 5, generator=g), torch.randn(rows, 3, generator=g)


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (net(x) - y).square().mean()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def check_data_parallel(comm, stage: int, kind: str, *, clip: float | None = None,
                        passes: int = 1, steps: int = 3) -> None:
    """``steps`` Adam steps of ``build(kind)`` under ZeRO-``stage`` against one process."""
    d = comm.size
    ref, net = build(kind), build(kind)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.02, weight_decay=0.01)
    opt = ShardedOptimizer(net.parameters(), torch.optim.Adam, comm, stage=stage, module=net,
                           bucket_bytes=100, passes=passes, lr=0.02, weight_decay=0.01)
    for step in range(steps):
        ref_opt.zero_grad()
        ref_loss = sum(loss_of(ref, *batch(r * passes + k, step)) for r in range(d)
                       for k in range(passes)) / (d * passes)
        ref_loss.backward()
        opt.zero_grad()
        loss = 0.0
        for k in range(passes):
            part = loss_of(net, *batch(comm.rank * passes + k, step)) / passes
            part.backward()
            loss += float(part.detach())
        assert all(p.grad is None for p in net.parameters()), "full gradients kept"
        assert abs(comm.allreduce(loss) / d - float(ref_loss.detach())) <= 1e-6
        opt.reduce_gradients()
        grads = opt.unshard(opt.grad_shard)
        for g, p in zip(grads, ref.parameters(), strict=True):
            assert rel_err(g, p.grad) <= 1e-5, (stage, kind, step, rel_err(g, p.grad))
        if clip:
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            norm = hp.clip_grad_norm_(opt, clip)
            assert abs(float(norm) - float(ref_norm)) <= 1e-5 * float(ref_norm)
            assert float(norm) > clip  # the clipping did something
        opt.step()
        ref_opt.step()
    values = opt.unshard(opt.param_shard) if stage == 3 else [p.detach() for p in
                                                                net.parameters()]
    for v, p in zip(values, ref.parameters(), strict=True):
        assert rel_err(v, p.detach()) <= 1e-5, (stage, kind, rel_err(v, p.detach()))
    if stage == 3 and d > 1:  # parameters freed between steps, only this rank's chunks kept
        assert all(p.untyped_storage().nbytes() == 0 for p in net.parameters())
        assert opt.param_shard.numel() * d < sum(p.numel() for p in net.parameters()) + 2 * d


def check_tensor_parallel(comm, stage: int) -> None:
    """data 2 x tensor 2: ZeRO over the data group of each tensor rank's shards, SGD with
    momentum, against one process on the global batch."""
    mesh = hp.Mesh(comm, data=2, tensor=2)
    tp, dp = mesh.tensor, mesh.data

    def mlp() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    ref, par = mlp(), hp.parallelize(mlp(), tp)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = ShardedOptimizer(par.parameters(), torch.optim.SGD, dp, stage=stage, module=par,
                           lr=0.1, momentum=0.9)
    for step in range(3):
        ref_opt.zero_grad()
        (sum(loss_of(ref, *batch(r, step)) for r in range(2)) / 2).backward()
        ref_opt.step()
        opt.zero_grad()
        loss_of(par, *batch(dp.rank, step)).backward()
        opt.step()
    shards = {f"{prefix}.{n}" if prefix else n: s for prefix, m in par.named_modules()
              for n, s in getattr(m, "tp_shards", {}).items()}
    values = opt.unshard(opt.param_shard) if stage == 3 else [p.detach() for p in
                                                                par.parameters()]
    ref_params = dict(ref.named_parameters())
    for (name, _), v in zip(par.named_parameters(), values, strict=True):
        want = ref_params[name].detach()
        if name in shards:
            want = shards[name].local(want, tp.size, tp.rank)
        assert rel_err(v, want) <= 1e-5, (stage, name, rel_err(v, want))


@hp.step
def pp_step(model, x, y, scale: float):  # noqa: ANN001, ANN201
    loss = (model(x) - y).square().sum() * scale
    model.backward(loss)
    return loss


def check_pipeline(comm, stage: int) -> None:
    """data 2 x pipeline 2, two microbatches: ZeRO within each stage, Adam, global gradient
    clipping over shards and stages, against one process on the global batch (loss, norm and
    parameters after three steps)."""
    mesh = hp.Mesh(comm, data=2, pipeline=2)

    def deep() -> nn.Module:
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                             nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))

    ref, net = deep(), deep()
    pmodel = hp.PipelineModel(net, mesh, sample=(batch(0, 0, 2)[0],), microbatches=2,
                              data_reduction="optimizer")
    opt = ShardedOptimizer(pmodel.parameters(), torch.optim.Adam, mesh.data, stage=stage,
                           pipeline=pmodel, lr=0.02)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.02)
    for step in range(3):
        xs, ys = zip(*(batch(r, step) for r in range(2)), strict=True)
        ref_opt.zero_grad()
        ref_loss = (ref(torch.cat(xs)) - torch.cat(ys)).square().mean()
        ref_loss.backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
        ref_opt.step()
        opt.zero_grad()
        r = mesh.coords["data"]
        out = pp_step(pmodel, xs[r], ys[r], 2 / ys[r].numel() / 2)
        loss = mesh.data.allreduce(out.reduce_sum()) / 2
        assert abs(loss - float(ref_loss)) <= 1e-6 * float(ref_loss), (loss, float(ref_loss))
        norm = float(hp.clip_grad_norm_(opt, 0.05, pipeline=pmodel))
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm and norm > 0.05, (norm, ref_norm)
        opt.step()
    values = opt.unshard(opt.param_shard) if stage == 3 else [p.detach() for p in
                                                                pmodel.parameters()]
    ref_params = dict(ref.named_parameters())
    for (name, _), v in zip(pmodel.named_parameters(), values, strict=True):
        assert rel_err(v, ref_params[name].detach()) <= 1e-5, (stage, name)


@mpi_test(ranks=[1, 2, 4], timeout=240, in_process=True)
def test_zero23_matches_one_process(comm):
    for stage in (2, 3):
        check_data_parallel(comm, stage, "twice", passes=2)
        check_data_parallel(comm, stage, "mlp", clip=0.05)
    if comm.size == 4:
        for stage in (2, 3):
            check_tensor_parallel(comm, stage)
            check_pipeline(comm, stage)


def test_zero23_refusals():
    from hpcml.comm import world

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight

    net = Shared()
    with pytest.raises(UsageError, match="units 'a' and 'b'.*one unit"):
        ShardedOptimizer(net.parameters(), torch.optim.SGD, world(), stage=3, module=net, lr=1)
    with pytest.raises(UsageError, match="no module 'c'"):
        ShardedOptimizer(net.parameters(), torch.optim.SGD, world(), stage=3, module=net,
                         units=["c"], lr=1)
    with pytest.raises(UsageError, match="pass module=model"):
        ShardedOptimizer(net.parameters(), torch.optim.SGD, world(), stage=3, lr=1)
    with pytest.raises(UsageError, match="stage=4"):
        ShardedOptimizer(net.parameters(), torch.optim.SGD, world(), stage=4, lr=1)
    seq = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    with pytest.raises(UsageError, match="inside the unit '0'"):
        ShardedOptimizer(seq.parameters(), torch.optim.SGD, world(), stage=3, module=seq,
                         units=["0", "0.0"], lr=1)


def test_zero23_unused_parameter_is_skipped():
    """A parameter without a gradient on every rank gets none in the optimizer (AdamW's weight
    decay would move it on a zero gradient), as in the unsharded optimizer."""
    from hpcml.comm import world

    for stage in (2, 3):
        torch.manual_seed(0)
        net = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
        before = [p.detach().clone() for p in net.parameters()]
        opt = ShardedOptimizer(net.parameters(), torch.optim.AdamW, world(), stage=stage,
                               module=net, lr=0.1, weight_decay=0.5)
        opt.zero_grad()
        net["a"](torch.randn(2, 3)).sum().backward()
        opt.step()
        after = opt.unshard(opt.param_shard) if stage == 3 else list(net.parameters())
        moved = [not torch.equal(x, y) for x, y in zip(before, after, strict=True)]
        assert moved == [True, True, False, False], (stage, moved)
