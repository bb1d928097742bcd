"""Single-process (world of size 1) tests of hpcml.parallel: bucket layout, densification, the
cost model of ``auto``, exchange memory, and the torch-optimizer contract of the wrappers
(schedulers, state_dict, add_param_group, argument errors)."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hpcml.comm import world
from hpcml.parallel import DistributedOptimizer, ExchangeMemory, plan_buckets
from hpcml.parallel.buckets import build_buckets
from hpcml.parallel.reductions import allgather_bytes, allgather_cheaper, allreduce_bytes
from hpcml.parallel.sparse import add_into, densify_into


def test_plan_buckets():
    assert plan_buckets([10, 10, 10], bucket_bytes=80) == [[0, 1], [2]]
    assert plan_buckets([100, 1, 1], bucket_bytes=16) == [[0], [1, 2]]
    assert plan_buckets([], bucket_bytes=16) == []
    assert plan_buckets([1] * 5, bucket_bytes=4) == [[0], [1], [2], [3], [4]]


def test_densify_uncoalesced_sparse():
    idx = torch.tensor([[2, 0, 2]])
    vals = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    g = torch.sparse_coo_tensor(idx, vals, (4, 2), check_invariants=False)
    out = torch.full((8,), 7.0)
    densify_into(g, out)
    assert out.view(4, 2).tolist() == [[3, 4], [0, 0], [6, 8], [0, 0]]


def _gradient(values, rows, sparse):
    """A (rows x 2) gradient from ``values``: dense, or sparse COO with repeated row indices."""
    vals = torch.tensor(values, dtype=torch.float32).view(-1, 2)
    if not sparse:
        return vals[:rows].clone() if len(vals) >= rows else torch.cat(
            [vals, torch.zeros(rows - len(vals), 2)])
    idx = torch.tensor([[(3 * i) % 2 for i in range(len(vals))]])  # rows 0 and 1, repeated
    return torch.sparse_coo_tensor(idx, vals, (rows, 2), check_invariants=False)


normal = st.floats(min_value=1e-30, max_value=1e30).flatmap(
    lambda m: st.sampled_from([m, -m]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(normal, min_size=2, max_size=12).filter(
    lambda v: len(v) % 2 == 0), st.booleans()), min_size=1, max_size=4),
    st.sampled_from([2, 4, 8, 1024]), st.sampled_from([torch.float32, torch.bfloat16]))
def test_writing_gradients_scaled_by_a_power_of_two_equals_scaling_their_sum(uses, ranks,
                                                                              dtype):
    """The reducer's fused averaging (GradientReducer._fill_scale): writing each use's
    gradient times 1/P into a slot and adding the next ones the same way gives bit for bit the
    unscaled slot divided by P, for dense and uncoalesced sparse uses, in the bucket's dtype."""
    rows = 5
    grads = [_gradient(values, rows, sparse) for values, sparse in uses]
    scaled, plain = torch.full((rows * 2,), 7.0, dtype=dtype), torch.zeros(rows * 2, dtype=dtype)
    densify_into(grads[0], scaled, 1 / ranks)
    densify_into(grads[0], plain)
    for g in grads[1:]:
        add_into(g, scaled.view(rows, 2), 1 / ranks)
        add_into(g, plain.view(rows, 2))
    assert torch.equal(scaled, plain / ranks)


def test_cost_model():
    assert allgather_bytes(10, 100, 4) == 3 * 10 * 108
    assert allreduce_bytes(1000, 100, 4) == 1.5 * 1000 * 100
    assert not allgather_cheaper(1, 1000, 256, 1)
    assert allgather_cheaper(5, 1000, 256, 4)
    assert not allgather_cheaper(1000, 1000, 256, 2)
    assert not allgather_cheaper(300, 1000, 256, 4)  # fewer bytes, but 4 x 300 rows of memory


def test_exchange_memory_peak():
    m = ExchangeMemory()
    m.alloc(10)
    m.alloc(5)
    m.free(5)
    assert (m.current, m.peak) == (10, 15)
    m.reset_peak()
    assert m.peak == 10


def test_buckets_one_set_per_dtype_in_backward_order():
    params = [torch.zeros(3), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(4),
              torch.zeros(5, dtype=torch.bfloat16)]
    buckets = build_buckets(params, bucket_bytes=16)
    assert [[p.numel() for p in b.params] for b in buckets] == [[3], [2, 5], [4]]
    assert [b.buffer.dtype for b in buckets] == [torch.float32, torch.bfloat16, torch.float32]
    assert buckets[1].view(1).shape == (5,) and buckets[1].offsets == [0, 2]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _train(net, opt, sched, steps, start=0):
    for t in range(start, start + steps):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
        sched.step()


def test_distributed_optimizer_is_a_torch_optimizer_with_exact_state_round_trip():
    net = _net()
    opt = DistributedOptimizer(torch.optim.Adam(net.parameters(), lr=0.1), net)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    _train(net, opt, sched, 3)
    assert opt.param_groups[0]["lr"] == opt.optimizer.param_groups[0]["lr"] == 0.05
    assert len(calls) == 3
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    _train(net, opt, sched, 3, start=3)
    fresh = _net()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh.load_state_dict(saved["model"])
    opt2 = DistributedOptimizer(torch.optim.Adam(fresh.parameters(), lr=0.1), fresh)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.state is opt2.optimizer.state and opt2.param_groups[0]["lr"] == 0.05
    opt2.optimizer.load_state_dict(saved["opt"])  # loading the wrapped one keeps them shared
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.state is opt2.optimizer.state
    _train(fresh, opt2, sched2, 3, start=3)
    for a, b in zip(net.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    extra = nn.Parameter(torch.ones(2))
    net.register_parameter("extra", extra)
    opt.add_param_group({"params": [extra], "lr": 1.0})
    assert len(opt.optimizer.param_groups) == 2
    opt.zero_grad()
    (net(torch.ones(1, 4)).sum() + extra.sum()).backward()
    opt.step()
    torch.testing.assert_close(extra.detach(), torch.zeros(2), rtol=0, atol=1e-6)  # 1 - lr


def test_bad_arguments_and_misuse_raise_clear_errors():
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reduction='ring'"):
        DistributedOptimizer(sgd, net, reduction="ring")
    with pytest.raises(ValueError, match="op='mean'"):
        DistributedOptimizer(sgd, net, op="mean")
    with pytest.raises(ValueError, match="backward_passes_per_step=0"):
        DistributedOptimizer(sgd, net, backward_passes_per_step=0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        DistributedOptimizer(net, net)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        DistributedOptimizer(other, net)
    opt = DistributedOptimizer(sgd, net, comm=world(), backward_passes_per_step=2)
    net(torch.ones(1, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.zero_grad()
    net(torch.ones(1, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="3 times before step"):
        net(torch.ones(1, 4)).sum().backward()
    opt.step()
    with opt.no_sync():
        net(torch.ones(1, 4)).sum().backward()  # allowed: no exchange under way

    def closure():
        opt.zero_grad()
        loss = net(torch.ones(1, 4)).sum()
        loss.backward()
        return loss

    opt.zero_grad()  # drop the no_sync pass
    before = net(torch.ones(1, 4)).sum().item()
    assert opt.step(closure).item() == before  # the closure ran once, before the update
    assert net(torch.ones(1, 4)).sum().item() != before


class _Declared(nn.Module):
    """Declares its dense-gradient weight as sparse (allowed: it is gathered row-wise)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 3, sparse=True)
        self.lin = nn.Linear(3, 2)

    def sparse_parameters(self):
        return [self.lin.weight]

    def forward(self, ids):
        return self.lin(self.emb(ids)).sum()


def test_sparse_reductions_take_sparse_and_declared_dense_gradients():
    ref = _Declared()
    ref(torch.tensor([1, 3, 3])).backward()
    for reduction in ("sparse_allgather", "auto", "dense_allreduce"):
        net = _Declared()
        opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net,
                                   reduction=reduction)
        net(torch.tensor([1, 3, 3])).backward()
        opt.synchronize()
        for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
            assert not p.grad.is_sparse
            torch.testing.assert_close(p.grad, q.grad.to_dense(), msg=f"{reduction} {name}")
        expected = {"emb.weight": "allgather", "lin.weight": "allgather"}
        assert opt.choices == ({} if reduction == "dense_allreduce" else
                               expected if reduction == "sparse_allgather" else
                               dict.fromkeys(expected, "allreduce"))  # auto at P = 1: dense


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_gradients_are_staged_through_the_host():
    ref = _Declared()
    ref(torch.tensor([1, 3, 3])).backward()
    net = _Declared().cuda().to(torch.bfloat16)
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net,
                               reduction="sparse_allgather")
    net(torch.tensor([1, 3, 3], device="cuda")).backward()
    opt.step()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert p.grad.device.type == "cuda" and p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float().cpu(), q.grad.to_dense(), rtol=2e-2, atol=2e-2)
