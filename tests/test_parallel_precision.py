"""Mixed precision (hpcml.parallel.precision) in every layout against the one-process run of the
same recipe: the same autocast dtype and the same loss scale, on the whole batch in one process.

Low-precision sums of a different order round differently, so "equal" means: every master
gradient within a few units of the dtype's rounding of the reference's largest element (a wrong
scale, a missing reduction or an fp32 reference would be off by far more), and the loss to
float32 rounding (the loss itself is computed in float32 under autocast). One launch per rank
count checks data parallelism, ZeRO-1, tensor parallelism and the pipeline, bf16 and fp16, the
overflow path (an inf on one rank only: every rank skips and halves the scale) and the refusals.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcml.parallel as hp
from hpcml.errors import UsageError
from hpcml.parallel.precision import MixedPrecision
from hpcml.parallel.tensor import parallelize
from hpcml.testing import mpi_test

# max |grad - reference| / max |reference| per tensor: 4 units of bf16 (2^-8), 8 of fp16 (2^-11);
# measured at 4 ranks: 6.0e-3 (bf16) and 4.8e-4 (fp16)
TOL = {torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -8}
N = 8  # global batch


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 6, generator=g), torch.randn(N, 3, generator=g)


def recipe(dtype: torch.dtype, scale: float, pieces: list[tuple], weight: float,
           ) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the same recipe: autocast forward of each piece, backward of
    ``loss * weight * scale``, gradients divided by the scale."""
    model = mlp()
    total = 0.0
    for x, y in pieces:
        with torch.autocast("cpu", dtype=dtype):
            loss = F.mse_loss(model(x), y, reduction="sum") * weight
        (loss * scale).backward()
        total += float(loss.detach())
    return total, {n: p.grad / scale for n, p in model.named_parameters()}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
    assert err <= TOL[dtype], (what, dtype, err)


def check_data_parallel(comm, dtype: torch.dtype) -> None:
    """DistributedOptimizer: the averaged master gradients and the loss (fp16 from 2^8: the
    default 2^16 overflows this model's first backward, which the overflow checks cover)."""
    mp = MixedPrecision(dtype, comm, loss_scale=2.0 ** 8 if dtype == torch.float16 else None)
    model = mlp()
    opt = hp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    x, y = (t.tensor_split(comm.size)[comm.rank] for t in batch())
    with mp.autocast():
        loss = F.mse_loss(model(x), y, reduction="sum") * (comm.size / N)
    mp.scale_loss(loss).backward()
    assert mp.unscale_(opt) is False
    ref_loss, ref = recipe(dtype, mp.scale, [batch()], 1.0 / N)
    assert abs(comm.allreduce(float(loss.detach())) / comm.size - ref_loss) <= 1e-3 * ref_loss
    for name, p in model.named_parameters():
        close(p.grad, ref[name], dtype, name)
    assert mp.step(opt) is True


def check_zero1_and_overflow(comm) -> None:
    """ZeRO-1 under fp16: reduce-scattered master gradients, an SGD step equal to the recipe's,
    float32 optimizer state; then an inf put into one rank's local gradient only: every rank
    skips (parameters unchanged) and halves the scale; the next step is taken again."""
    dtype = torch.float16
    mp = MixedPrecision(dtype, comm, loss_scale=2.0 ** 10)
    model = mlp()
    opt = hp.ShardedOptimizer(model.parameters(), torch.optim.SGD, comm, lr=0.5, momentum=0.9)
    x, y = (t.tensor_split(comm.size)[comm.rank] for t in batch())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def backward(poison: bool) -> None:
        opt.zero_grad()
        with mp.autocast():
            loss = F.mse_loss(model(x), y, reduction="sum") * (comm.size / N)
        mp.scale_loss(loss).backward()
        if poison and comm.rank == comm.size - 1:
            next(model.parameters()).grad.view(-1)[0] = float("inf")

    backward(poison=False)
    _, ref = recipe(dtype, mp.scale, [batch()], 1.0 / N)
    assert mp.step(opt) is True
    for name, p in model.named_parameters():
        close((before[name] - p.detach()) / 0.5, ref[name], dtype, name)
    assert all(v.dtype == torch.float32 for s in opt.inner.state.values()
               for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    after_one = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(poison=True)
    assert mp.step(opt) is False
    assert mp.scale == 2.0 ** 9 and mp.skipped == 1
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), after_one[name]), name
    backward(poison=False)
    assert mp.step(opt) is True and mp.scale == 2.0 ** 9
    assert not any(torch.equal(p.detach(), after_one[n]) for n, p in model.named_parameters())


def check_tensor_parallel(comm) -> None:
    """bf16 tensor parallelism over all ranks: loss and each rank's gradient slices."""
    dtype = torch.bfloat16
    mp = MixedPrecision(dtype, comm)
    par = parallelize(mlp(), comm)
    opt = torch.optim.SGD(par.parameters(), lr=0.1)
    x, y = batch()
    with mp.autocast():
        loss = F.mse_loss(par(x), y, reduction="sum") / N
    mp.scale_loss(loss).backward()
    mp.unscale_(opt)
    ref_loss, ref = recipe(dtype, mp.scale, [batch()], 1.0 / N)
    assert abs(float(loss.detach()) - ref_loss) <= 2e-2 * ref_loss  # bf16 partial sums
    shards = {f"{prefix}.{p}" if prefix else p: s for prefix, m in par.named_modules()
              for p, s in getattr(m, "tp_shards", {}).items()}
    for name, p in par.named_parameters():
        want = shards[name].local(ref[name], comm.size, comm.rank) if name in shards \
            else ref[name]
        close(p.grad, want, dtype, name)
    assert mp.step(opt) is True


def check_pipeline(comm, dtype: torch.dtype) -> None:
    """A pipeline (times 2 data replicas at 4 ranks) whose trace and forwards run under the
    autocast: activations travel in the compute dtype; loss and master gradients equal the
    recipe over the same microbatches; then an inf on the last rank only is skipped by all."""
    mp = MixedPrecision(dtype, comm, loss_scale=2.0 ** 8, dynamic=True)
    stages = min(comm.size, 2)
    data = comm.size // stages
    mesh = hp.Mesh(comm, data=data, pipeline=stages)
    micro = 2
    pmodel = hp.PipelineModel(mlp(), mesh, sample=(batch()[0][:2],), microbatches=micro,
                              precision=mp)
    leaves = [leaf for c in pmodel.trace.calls for leaf in c.leaves]
    assert any(getattr(leaf, "dtype", None) == dtype for leaf in leaves)

    @hp.step
    def train(model, x, y):
        loss = F.mse_loss(model(x), y, reduction="sum") / N * data
        model.backward(mp.scale_loss(loss))
        return loss

    x, y = (t.tensor_split(data)[mesh.coords["data"]] for t in batch())
    out = train(pmodel, x, y)
    loss = mesh.data.allreduce(out.reduce_sum()) / data
    pieces = [(a.tensor_split(micro)[m], b.tensor_split(micro)[m])
              for a, b in zip(batch()[0].tensor_split(data), batch()[1].tensor_split(data),
                              strict=True) for m in range(micro)]
    ref_loss, ref = recipe(dtype, mp.scale, pieces, 1.0 / N)
    assert abs(loss - ref_loss) <= 1e-3 * ref_loss
    opt = torch.optim.Adam(pmodel.parameters(), lr=1e-3)
    assert mp.unscale_(opt) is False
    for name, p in pmodel.named_parameters():
        close(p.grad, ref[name], dtype, name)
    assert mp.step(opt) is True
    pmodel.zero_grad()
    train(pmodel, x, y)
    if comm.rank == comm.size - 1:
        pmodel.parameters()[-1].grad.view(-1)[0] = float("nan")
    kept = [p.detach().clone() for p in pmodel.parameters()]
    assert mp.step(opt) is False and mp.scale == 2.0 ** 7
    assert all(torch.equal(p.detach(), k) for p, k in zip(pmodel.parameters(), kept,
                                                          strict=True))


def check_refusals(comm) -> None:
    """One line each: low-precision master weights, a scale that is not a power of two, an
    unknown dtype; and the scale grows after growth_interval clean steps."""
    half = mlp().to(torch.bfloat16)
    mp = MixedPrecision("bf16", comm)
    with pytest.raises(UsageError, match="optimizer holds a torch.bfloat16 parameter.*float32"):
        mp.step(torch.optim.SGD(half.parameters(), lr=0.1))
    with pytest.raises(UsageError, match="loss_scale=1000.0 is not a power of two.*1024"):
        MixedPrecision("fp16", comm, loss_scale=1000.0)
    with pytest.raises(UsageError, match="dtype 'int8'"):
        MixedPrecision("int8", comm)
    grow = MixedPrecision("fp16", comm, loss_scale=16.0, growth_interval=2)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(2):
        model(batch()[0]).sum().backward()
        assert grow.step(opt)
    assert grow.scale == 32.0 and grow.state_dict()["good_steps"] == 2


@mpi_test(ranks=[1, 2, 4], timeout=240, in_process=True)
def test_mixed_precision_equals_the_one_process_recipe(comm):
    for dtype in (torch.bfloat16, torch.float16):
        check_data_parallel(comm, dtype)
        check_pipeline(comm, dtype)
    check_zero1_and_overflow(comm)
    check_tensor_parallel(comm)
    check_refusals(comm)
