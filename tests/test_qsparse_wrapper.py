"""``QsparseLocalSGD`` around an arbitrary torch model, in one process (world of size 1)."""

import pytest
import torch

from hpcml.comm import world
from hpcml.qsparse import QsparseLocalSGD, ServerExchange, make_compressor


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
