"""``QsparseLocalSGD`` and ``AllreduceSGD`` around an arbitrary torch model, in one process
(world of size 1): training, torch-optimizer contract (schedulers, state_dict), exact resume."""

import pytest
import torch

from hpcml.comm import world
from hpcml.qsparse import QsparseLocalSGD, ServerExchange, make_compressor
from hpcml.qsparse.optimizer import AllreduceSGD


def cnn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    net[0].bias.requires_grad_(False)  # a frozen parameter is neither trained nor sent
    return net


def test_wrapper_trains_a_cnn_with_local_steps_and_compression():
    net = cnn()
    frozen = net[0].bias.detach().clone()
    params = [p for p in net.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)
    c = make_compressor("qtopk", k=40, s=7)
    opt = torch.optim.SGD(params, lr=0.05)
    qs = QsparseLocalSGD(net, opt, compressor=c, H=3, comm=world())
    x, y = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)), \
        torch.arange(32) % 10
    first = None
    for step in range(1, 31):
        qs.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        qs.step()
        if step % 3 == 0:
            torch.testing.assert_close(torch.nn.utils.parameters_to_vector(params), qs.x_sync)
    assert qs.syncs == 10 and qs.bits_sent == 10 * c.bits(d) and qs.x_sync.numel() == d
    assert torch.equal(net[0].bias, frozen)
    assert qs.memory.abs().sum() > 0
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(net(x), y).item() < first


def test_wrapper_rejects_bad_arguments():
    net = cnn()
    with pytest.raises(ValueError, match="H must be >= 1"):
        QsparseLocalSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), H=0, comm=world())
    with pytest.raises(ValueError, match="needs >= 2 ranks"):
        ServerExchange(world())


def _qsparse_run(steps, start=0, state=None):
    """A QsparseLocalSGD run with momentum, Q∘rand-k (random stream), H = 3 and a StepLR
    schedule; with ``state`` it resumes from a checkpoint read with weights_only=True."""
    net = cnn()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)
    qs = QsparseLocalSGD(net, opt, compressor=make_compressor("qrandk", k=40, s=7), H=3,
                         comm=world(), seed=3)
    assert isinstance(qs, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(qs, step_size=4, gamma=0.5)
    if state is not None:
        net.load_state_dict(state["model"])
        qs.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(10, (8,), generator=g)
        qs.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        qs.step()
        sched.step()
    return net, qs, sched


def test_qsparse_state_dict_resumes_bit_exactly(tmp_path):
    net, qs, _ = _qsparse_run(12)
    part_net, part_qs, part_sched = _qsparse_run(7)  # stops between synchronizations
    path = tmp_path / "ckpt.pt"
    torch.save({"model": part_net.state_dict(), "optimizer": part_qs.state_dict(),
                "scheduler": part_sched.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    assert saved["optimizer"]["qsparse"]["memory"].abs().sum() > 0  # the error memory is saved
    resumed_net, resumed, sched = _qsparse_run(5, start=7, state=saved)
    assert sched.get_last_lr() == [0.05 * 0.5 ** 3] == [resumed.param_groups[0]["lr"]]
    for a, b in zip(net.state_dict().values(), resumed_net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(qs.x_sync, resumed.x_sync) and torch.equal(qs.memory, resumed.memory)
    assert (qs.syncs, qs.bits_sent, qs.local_steps) == (resumed.syncs, resumed.bits_sent, 12)


def test_allreduce_sgd_takes_a_scheduler_and_saves_its_counters():
    net = cnn()
    base = AllreduceSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), world())
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.1)
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    base.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.01)
    state = base.state_dict()
    assert state["hpcml"] == {"syncs": 1, "bits_sent": base.bits_per_step}
    net2 = cnn()
    fresh = AllreduceSGD(net2, torch.optim.SGD(net2.parameters(), lr=0.1), world())
    fresh.load_state_dict(state)
    assert (fresh.syncs, fresh.bits_sent) == (1, base.bits_per_step)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.01)
