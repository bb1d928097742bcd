"""ZeRO-1 optimizer-state sharding against the unsharded optimizer on the averaged gradient of the
global batch, at 1, 2 and 4 ranks: parameters after several steps, per-rank state bytes ~ 1/D,
schedulers, per-rank and unsharded (cross-D) state dicts; bad input in one process."""

import io
import math

import pytest
import torch
from torch import nn

from hpcml.comm import world
from hpcml.errors import UsageError
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.testing import mpi_test


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (net(x) - y).square().mean()


def groups(net: nn.Module) -> list[dict]:
    return [{"params": list(net[0].parameters()), "lr": 0.05},
            {"params": list(net[2].parameters())}]


CASES = [(torch.optim.Adam, {"lr": 0.02, "weight_decay": 0.01}, 2),
         (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, 1)]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


@mpi_test(ranks=[1, 2, 4], timeout=180, in_process=True)
def test_sharded_optimizer_matches_unsharded(comm):
    d, steps = comm.size, 6
    for cls, kwargs, state_tensors in CASES:
        ref, net = model(), model()
        ref_opt = cls(groups(ref), **kwargs)
        opt = ShardedOptimizer(groups(net), cls, comm, **kwargs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
        for step in range(steps):
            # reference: the global batch's mean loss = the mean of the ranks' mean losses
            ref_opt.zero_grad()
            sum(loss_of(ref, *rank_batch(r, step)) for r in range(d)).div(d).backward()
            ref_opt.step()
            ref_sched.step()
            opt.zero_grad()
            loss_of(net, *rank_batch(comm.rank, step)).backward()
            opt.step()
            sched.step()
        for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
            assert rel_err(p.detach(), q.detach()) <= 1e-5, (cls.__name__, name)
        numel = sum(p.numel() for p in ref.parameters())
        full_bytes = sum(v.numel() * v.element_size() for s in ref_opt.state.values()
                         for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        assert full_bytes == state_tensors * 4 * numel
        mine = opt.state_bytes()
        # per-rank: k tensors over at most ceil(numel / D) elements, plus Adam's scalar step
        # tensor per parameter piece (at most one piece per parameter)
        assert mine <= state_tensors * 4 * math.ceil(numel / d) + 4 * 4, (mine, full_bytes)
        assert comm.allreduce(mine) >= full_bytes
        # the unsharded state dict: equal to the plain optimizer's, and loading the plain one
        # into a sharded optimizer (any D) continues the run identically
        full, plain = opt.full_state_dict(), ref_opt.state_dict()
        assert full["state"].keys() == plain["state"].keys()
        for i, kv in plain["state"].items():
            for k, v in kv.items():
                assert rel_err(full["state"][i][k], v) <= 1e-5, (cls.__name__, i, k)
        twin = model()
        twin.load_state_dict(ref.state_dict())
        twin_opt = ShardedOptimizer(groups(twin), cls, comm, **kwargs)
        twin_opt.load_full_state_dict(plain)
        x, y = rank_batch(comm.rank, steps)
        twin_opt.zero_grad()
        loss_of(twin, x, y).backward()
        twin_opt.step()
        ref_opt.zero_grad()
        sum(loss_of(ref, *rank_batch(r, steps)) for r in range(d)).div(d).backward()
        ref_opt.step()
        for p, q in zip(twin.parameters(), ref.parameters(), strict=True):
            assert rel_err(p.detach(), q.detach()) <= 1e-5, cls.__name__

    # a per-rank state dict restores the shard and the run continues identically
    net = model()
    opt = ShardedOptimizer(net.parameters(), torch.optim.Adam, comm, lr=0.01)
    for step in range(2):
        opt.zero_grad()
        loss_of(net, *rank_batch(comm.rank, step)).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = model()
    twin.load_state_dict(saved["model"])
    twin_opt = ShardedOptimizer(twin.parameters(), lambda g: torch.optim.Adam(g, lr=0.01), comm)
    twin_opt.load_state_dict(saved["opt"])
    for m, o in ((net, opt), (twin, twin_opt)):
        o.zero_grad()
        loss_of(m, *rank_batch(comm.rank, 2)).backward()
        o.step()
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_gradients_accumulate_in_the_flat_buffer():
    """Backward writes into the flat gradient buffer (no copy at step); a parameter backward
    did not reach is skipped, as a None gradient is by the plain optimizer; two backward passes
    accumulate."""
    net, ref = model(), model()
    opt = ShardedOptimizer(net.parameters(), torch.optim.Adam, world(), lr=0.1)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1)
    lo, hi = opt.grad_flat.data_ptr(), opt.grad_flat.data_ptr() + opt.grad_flat.nbytes
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    for step in range(2):
        for o in (opt, ref_opt):
            o.zero_grad()
        for m in (net, ref):
            for _ in range(2):
                (m[0](x).square().sum() if step == 0 else m(x).sum()).backward()
        assert all(lo <= p.grad.data_ptr() < hi for p in net.parameters())
        opt.step()
        ref_opt.step()
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            assert rel_err(p.detach(), q.detach()) <= 1e-6
    assert not torch.equal(net[2].weight, model()[2].weight)  # reached in step 1


def test_bad_input():
    comm = world()
    with pytest.raises(UsageError, match="no parameters"):
        ShardedOptimizer([], torch.optim.SGD, comm, lr=0.1)
    mixed = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    with pytest.raises(UsageError, match="one dtype and device"):
        ShardedOptimizer(mixed, torch.optim.SGD, comm, lr=0.1)
    opt = ShardedOptimizer(model().parameters(), torch.optim.SGD, comm, lr=0.1)
    with pytest.raises(UsageError, match="layout"):
        opt.load_state_dict({"inner": {}, "layout": {"rank": 0, "ranks": 8, "numel": 3}})
    # a sparse gradient is accumulated into (or, made anew, copied into) the dense flat buffer
    for fresh in (False, True):
        emb, dense = nn.Embedding(4, 2, sparse=True), nn.Embedding(4, 2)
        dense.load_state_dict(emb.state_dict())
        opt = ShardedOptimizer(emb.parameters(), torch.optim.SGD, comm, lr=0.1)
        if fresh:
            emb.zero_grad()
        emb(torch.tensor([1])).sum().backward()
        opt.step()
        dense(torch.tensor([1])).sum().backward()
        torch.optim.SGD(dense.parameters(), lr=0.1).step()
        assert torch.equal(emb.weight, dense.weight)
