"""Per-use densification of sparse gradients (hpcml.parallel.uses) in one process: the reducer's
gradient equals autograd's own sum of the uses, whichever way the uses reach it (taken by the
taps, or left to autograd: a use outside the module's forward, a second pass, a non-None
``.grad``), and a pass that is not the step's (``autograd.grad`` for other inputs, a backward
that fails half-way) never writes into the bucket. Multi-rank equality with one process on the
tied NMT transformer is tests/test_parallel_reductions.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hpcml.parallel import DistributedOptimizer
from hpcml.parallel.uses import UseTaps

ROWS, DIM = 7, 3


class Tied(nn.Module):
    """One sparse embedding looked up ``lookups`` times and used as the output projection."""

    def __init__(self, lookups=2):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(ROWS, DIM, sparse=True)
        self.mix = nn.Linear(DIM, DIM)
        self.lookups = lookups

    def forward(self, ids):
        h = sum(self.emb(ids[k % len(ids)]) * (k + 1) for k in range(self.lookups))
        return self.mix(h) @ self.emb.weight.t()


def reference(ids, lookups=2, extra=False):
    """Autograd's gradients of the same loss, densified."""
    net = Tied(lookups)
    loss(net, ids, extra).backward()
    return {n: p.grad.to_dense() for n, p in net.named_parameters()}


def loss(net, ids, extra=False):
    out = net(ids).square().mean()
    return out + net.emb.weight.sum() * 0.5 if extra else out  # a use outside forward


def reduced(net, opt, ids, extra=False):
    opt.zero_grad()
    loss(net, ids, extra).backward()
    opt.synchronize()
    return {n: p.grad for n, p in net.named_parameters()}


def assert_grads(got, want):
    for name, g in want.items():
        assert not got[name].is_sparse, name
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-6, msg=name)


IDS = [torch.tensor([[1, 2, 2], [0, 6, 1]]), torch.tensor([[3, 3, 5], [4, 1, 0]])]


def test_taps_take_every_use_and_autograd_sums_nothing():
    net, taken = Tied(), []
    acc_seen = []
    net.emb.weight.register_post_accumulate_grad_hook(lambda p: acc_seen.append(p.grad))
    taps = UseTaps(net, [net.emb.weight], lambda p, g: taken.append(g) or True)
    net(IDS).square().mean().backward()
    taps.remove()
    assert len(taken) == 3  # two lookups and the projection
    assert [g.is_sparse for g in taken].count(True) == 2
    assert acc_seen == [None] and net.emb.weight.grad is None
    total = sum(g.to_dense() for g in taken)
    torch.testing.assert_close(total, reference(IDS)["emb.weight"], rtol=1e-6, atol=1e-6)
    net(IDS).square().mean().backward()  # removed: autograd sums the uses again
    assert len(taken) == 3 and net.emb.weight.grad is not None


@pytest.mark.parametrize("extra", [False, True])
def test_reduced_gradient_equals_autograd_sum_over_steps(extra):
    net = Tied()
    with torch.no_grad():  # built where autograd is off: the taps still find the parameter
        opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), net)
    assert opt.reducer._taps is not None
    for _ in range(3):
        assert_grads(reduced(net, opt, IDS, extra), reference(IDS, extra=extra))


def test_uses_left_to_autograd_when_the_pass_cannot_take_them():
    # p.grad not None (zero_grad(set_to_none=False)): autograd accumulates, the reducer copies
    net = Tied()
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), net)
    reduced(net, opt, IDS)
    opt.zero_grad(set_to_none=False)
    loss(net, IDS).backward()
    opt.synchronize()
    assert_grads({n: p.grad for n, p in net.named_parameters()}, reference(IDS))
    # backward(create_graph=True): autograd keeps the graph of the summed gradient
    net3 = Tied()
    opt3 = DistributedOptimizer(torch.optim.SGD(net3.parameters(), lr=0.0), net3)
    opt3.zero_grad()
    with pytest.warns(UserWarning, match="create_graph"):  # torch's note on the cycle
        loss(net3, IDS).backward(create_graph=True)
    assert net3.emb.weight.grad.requires_grad
    opt3.synchronize()
    assert_grads({n: p.grad for n, p in net3.named_parameters()}, reference(IDS))
    # two passes per step: the first accumulates in .grad, so neither pass takes
    net2 = Tied()
    opt2 = DistributedOptimizer(torch.optim.SGD(net2.parameters(), lr=0.0), net2,
                                backward_passes_per_step=2)
    opt2.zero_grad()
    loss(net2, IDS).backward()
    loss(net2, IDS).backward()
    opt2.synchronize()
    want = {n: 2 * g for n, g in reference(IDS).items()}
    assert_grads({n: p.grad for n, p in net2.named_parameters()}, want)


def test_a_pass_that_is_not_the_steps_never_writes_into_the_bucket():
    net = Tied()
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), net)
    got = reduced(net, opt, IDS)
    kept = got["emb.weight"].clone()
    # autograd.grad for the input of the projection only: the embedding's node does not run
    h = net.mix(net.emb(IDS[0]))
    (g,) = torch.autograd.grad((h @ net.emb.weight.t()).sum(), [h])
    assert g.shape == h.shape and torch.equal(net.emb.weight.grad, kept)
    # autograd.grad of the parameter itself: autograd sums the uses and hands the sum back
    (g,) = torch.autograd.grad(loss(net, IDS), [net.emb.weight])
    torch.testing.assert_close(g.to_dense(), reference(IDS)["emb.weight"], rtol=1e-6, atol=1e-6)
    loss(net, IDS).backward(inputs=[net.mix.weight])  # a backward for another parameter
    opt.synchronize()
    assert torch.equal(net.emb.weight.grad, kept)
    # a backward that fails after the first use was taken: the next step is still exact
    out = loss(net, IDS)
    boom = net.mix.bias.register_hook(lambda _: (_ for _ in ()).throw(RuntimeError("boom")))
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="boom"):
        out.backward()
    boom.remove()
    opt.reducer.synchronize()  # the failed pass's state is dropped with the step
    assert_grads(reduced(net, opt, IDS), reference(IDS))


@settings(max_examples=25, deadline=None)
@given(lookups=st.integers(1, 4), extra=st.booleans(),
       ids=st.lists(st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=4),
                    min_size=1, max_size=3))
def test_any_number_of_uses_sums_like_autograd(lookups, extra, ids):
    width = min(len(row) for row in ids)
    batches = [torch.tensor([row[:width]]) for row in ids]
    net = Tied(lookups)
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), net)
    assert_grads(reduced(net, opt, batches, extra), reference(batches, lookups, extra))
