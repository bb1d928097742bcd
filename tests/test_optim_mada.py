"""MADA and AVGrad (arXiv 2401.08893) against independent references: torch's Adam/AdamW/AMSGrad
step for step, a hand-written AVGrad recursion, and central finite differences of the loss for the
hyper-gradient."""

import copy

import pytest
import torch

from hpcml.optim import COEFFICIENTS, MADA, RANGES, AVGrad

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randn(64, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def small_model(dtype=torch.float64):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1)).to(dtype)


def loss_at(model, i):
    """A loss that changes with the step (a drifting input), so gradients vary over time."""
    x = (X + 0.05 * i).to(next(model.parameters()).dtype)
    return ((model(x) - Y.to(x.dtype)) ** 2).mean()


def train(make_opt, steps=20, dtype=torch.float32):
    model = small_model(dtype)
    opt = make_opt(model.parameters())
    for i in range(steps):
        opt.zero_grad()
        loss_at(model, i).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt


ADAM = dict(beta3=0.0, c=1.0, rho=1.0, gamma=1.0, hyper_lr=0.0)


@pytest.mark.parametrize("reference, mada", [
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6),
     lambda ps: MADA(ps, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, **ADAM)),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
     lambda ps: MADA(ps, lr=1e-2, weight_decay=0.1, **ADAM)),
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
     lambda ps: MADA(ps, lr=1e-2, vmax="max", **{**ADAM, "rho": 0.0})),
], ids=["adam", "adamw", "amsgrad"])
def test_mada_reproduces_torch_adam_step_for_step(reference, mada):
    expected, _ = train(reference)
    got, _ = train(mada)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_avgrad_matches_its_recursion():
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-8
    got, _ = train(lambda ps: AVGrad(ps, lr=lr, betas=(b1, b2), eps=eps), steps=15,
                   dtype=torch.float64)
    model = small_model()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vsum = [torch.zeros_like(p) for p in params]
    for t in range(1, 16):
        model.zero_grad()
        loss_at(model, t - 1).backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                m[i] = b1 * m[i] + (1 - b1) * p.grad
                v[i] = b2 * v[i] + (1 - b2) * p.grad ** 2
                vsum[i] += v[i]
                v_hat = vsum[i] / t / (1 - b2 ** t)
                p -= lr * (m[i] / (1 - b1 ** t)) / (v_hat.sqrt() + eps)
    expected = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, train(lambda ps: torch.optim.Adam(
        ps, lr=lr, betas=(b1, b2), amsgrad=True), steps=15, dtype=torch.float64)[0])


INTERIOR = dict(beta1=0.8, beta2=0.9, beta3=0.4, c=0.6, rho=0.5, gamma=0.7)


def loss_after(steps, vmax, bump=None, delta=0.0):
    """Loss after ``steps`` MADA steps with coefficient ``bump`` shifted by ``delta`` in the
    last step only; also returns the optimizer (hyper-gradients ready)."""
    model = small_model()
    opt = MADA(model.parameters(), lr=0.02, hyper_lr=1e-30, vmax=vmax, **INTERIOR)
    for i in range(steps):
        if bump is not None and i == steps - 1:
            opt.param_groups[0][bump] += delta
        opt.zero_grad()
        loss_at(model, i).backward()
        opt.step()
    opt.zero_grad()
    loss = loss_at(model, steps)
    loss.backward()
    return float(loss.detach()), opt


@pytest.mark.parametrize("vmax", ["avg", "max"])
def test_hypergradient_matches_finite_differences(vmax):
    _, opt = loss_after(6, vmax)
    hyper = opt.hypergradient(opt.param_groups[0])
    assert set(hyper) == set(COEFFICIENTS)
    delta = 1e-6
    for k in COEFFICIENTS:
        plus, _ = loss_after(6, vmax, k, delta)
        minus, _ = loss_after(6, vmax, k, -delta)
        fd = (plus - minus) / (2 * delta)
        assert hyper[k] == pytest.approx(fd, rel=1e-4, abs=1e-9), k


def test_learned_coefficients_move_and_stay_in_range():
    start = dict(beta1=0.9, beta2=0.5, beta3=0.0, c=1.0, rho=0.5, gamma=1.0)
    _, opt = train(lambda ps: MADA(ps, lr=0.05, hyper_lr=50.0, **start), steps=30)
    final = opt.coefficients
    assert final != start
    for k, v in final.items():
        lo, hi = RANGES[k]
        assert lo <= v <= hi, (k, v)
    assert any(final[k] in RANGES[k] for k in final)  # the projection was active


def test_hyper_lr_zero_freezes_and_state_dict_round_trips():
    _, frozen = train(lambda ps: MADA(ps, hyper_lr={"beta3": 0.0}), steps=5)
    assert frozen.coefficients == {**dict(beta1=0.9, beta2=0.999, beta3=0.0, c=1.0, rho=0.6,
                                          gamma=1.0)}
    model = small_model(torch.float32)
    opt = MADA(model.parameters(), lr=0.05, hyper_lr=5.0)
    for i in range(5):
        opt.zero_grad()
        loss_at(model, i).backward()
        opt.step()
    twin_model = copy.deepcopy(model)
    twin = MADA(twin_model.parameters(), hyper_lr=0.0)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin.coefficients == opt.coefficients
    assert "d_rho" in next(iter(twin.state.values()))
    for m, o in ((model, opt), (twin_model, twin)):
        for i in range(5, 8):
            o.zero_grad()
            loss_at(m, i).backward()
            o.step()
    assert twin.coefficients == opt.coefficients
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=-1e-3), "lr"), (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"),
    (dict(beta3=1.5), "beta3"), (dict(rho=1.2), "rho"), (dict(hyper_lr=-1.0), "hyper_lr"),
    (dict(hyper_lr={"rho": -0.1}), "hyper_lr"), (dict(vmax="mean"), "vmax"),
    (dict(beta2=0.3), "beta2"),
])
def test_invalid_arguments_raise_one_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        MADA(small_model().parameters(), **kwargs)
    assert "\n" not in str(err.value)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = MADA(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_torch_spelling_betas_is_accepted_by_mada_and_avgrad():
    """``betas=(b1, b2)`` (torch's spelling) trains exactly as ``beta1=b1, beta2=b2``, and MADA
    with it reproduces torch's Adam given the same ``betas``; both spellings at once, or a
    ``betas`` that is not a pair, is one ``ValueError``."""
    expected, _ = train(lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)))
    got, opt = train(lambda ps: MADA(ps, lr=1e-2, betas=(0.8, 0.95), **ADAM))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert (opt.coefficients["beta1"], opt.coefficients["beta2"]) == (0.8, 0.95)
    learned, _ = train(lambda ps: MADA(ps, lr=1e-2, betas=(0.8, 0.95)))
    named, _ = train(lambda ps: MADA(ps, lr=1e-2, beta1=0.8, beta2=0.95))
    assert torch.equal(learned, named)
    a, _ = train(lambda ps: AVGrad(ps, lr=1e-2, betas=(0.8, 0.95)))
    b, _ = train(lambda ps: AVGrad(ps, lr=1e-2, beta1=0.8, beta2=0.95))
    assert torch.equal(a, b)
    for make in (MADA, AVGrad):
        with pytest.raises(ValueError, match="not both"):
            make(small_model().parameters(), betas=(0.8, 0.95), beta1=0.8)
        with pytest.raises(ValueError, match="betas must be"):
            make(small_model().parameters(), betas=(0.8,))
    with pytest.raises(ValueError, match="beta2"):
        MADA(small_model().parameters(), betas=(0.9, 1.5))
