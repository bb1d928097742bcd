"""hpcml.parallel data parallelism at 1, 2 and 4 ranks against a single process that runs the
whole global batch: gradient accumulation (1, 2, 4 micro-batches), float16/bfloat16 models,
unused and frozen parameters, no_sync, LR scheduler + state_dict round trip through the
broadcasts, parameters bit-identical on every rank, errors on misuse, overlap of the reduction
with backward, and the ledger's blocked vs outstanding time. One launch per rank count."""

import io
import time

import torch
from torch import nn

from hpcml.parallel import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters
from hpcml.testing import mpi_test

G = 16  # global batch: divisible by every (ranks x micro-batches) used here


class Branchy(nn.Module):
    """``side`` is used only by global chunk 0, ``never`` by nobody, ``frozen`` is frozen."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.frozen = nn.Linear(6, 6)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)
        self.side = nn.Linear(8, 2)
        self.never = nn.Linear(8, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, use_side: bool) -> torch.Tensor:
        h = torch.tanh(self.body(self.frozen(x)))
        return self.head(h) + self.side(h) if use_side else self.head(h)


def data(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(G, 6, generator=g), torch.randn(G, 2, generator=g)


def chunk_loss(model, x, y, chunk):
    return (model(x, use_side=chunk == 0).float() - y.float()).square().sum()


def reference_grads(chunks, dtype=torch.float32):
    """One process, global batch, global mean loss, in float32 (from the model and inputs
    rounded to ``dtype``)."""
    model = Branchy().to(dtype).float()
    x, y = data()
    x = x.to(dtype).float()
    n = G // chunks
    total = sum(chunk_loss(model, x[c * n:(c + 1) * n], y[c * n:(c + 1) * n], c)
                for c in range(chunks)) / G
    total.backward()
    return {k: None if p.grad is None else p.grad.float().clone()
            for k, p in model.named_parameters()}


def local_passes(comm, model, micro, step=0):
    """This rank's ``micro`` backward passes of its share, scaled so the average over ranks is
    the global mean loss."""
    x, y = data(step)
    n = G // (comm.size * micro)
    for m in range(micro):
        c = comm.rank * micro + m
        xs = x[c * n:(c + 1) * n].to(model.head.weight.dtype)
        (chunk_loss(model, xs, y[c * n:(c + 1) * n], c) * comm.size / G).backward()


def check_accumulation_dtypes_unused_frozen(comm):
    for dtype, micros, tol in ((torch.float32, (1, 2, 4), 1e-5), (torch.bfloat16, (2,), 3e-2),
                               (torch.float16, (4,), 3e-3)):
        for micro in micros:
            model = Branchy().to(dtype)
            ref = reference_grads(comm.size * micro, dtype)
            frozen = model.frozen.weight.detach().clone()
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                       comm=comm, bucket_kib=0.1,
                                       backward_passes_per_step=micro)
            local_passes(comm, model, micro)
            opt.synchronize()
            for k, p in model.named_parameters():
                if ref[k] is None:
                    assert p.grad is None, (k, dtype, micro)
                    continue
                assert p.grad.dtype == dtype, (k, p.grad.dtype)
                where = f"{k} {dtype} x{micro}"
                torch.testing.assert_close(p.grad.float(), ref[k], rtol=tol, atol=tol,
                                           msg=lambda m, w=where: f"{w}: {m}")
            opt.step()
            assert torch.equal(model.frozen.weight, frozen)
            assert model.never.weight.grad is None


def check_no_sync_and_misuse(comm):
    model = Branchy()
    ref = reference_grads(comm.size * 2)
    comm.ledger.reset()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, comm=comm)
    x, y = data()
    n = G // (comm.size * 2)
    c0, c1 = 2 * comm.rank, 2 * comm.rank + 1
    with opt.no_sync():
        (chunk_loss(model, x[c0 * n:(c0 + 1) * n], y[c0 * n:(c0 + 1) * n], c0)
         * comm.size / G).backward()
    assert opt.reducer.posted == 0 and comm.ledger.totals().get("Iallreduce") is None
    (chunk_loss(model, x[c1 * n:(c1 + 1) * n], y[c1 * n:(c1 + 1) * n], c1)
     * comm.size / G).backward()
    opt.synchronize()
    for k, p in model.named_parameters():
        if ref[k] is not None:
            torch.testing.assert_close(p.grad, ref[k], rtol=1e-5, atol=1e-6)
    # The reproduction of the issue: a second backward with one declared pass must raise,
    # not write into a buffer MPI owns (and the first pass's reduction still completes).
    lin = nn.Linear(3, 1, bias=False)
    broadcast_parameters(lin, comm)
    one = DistributedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), lin, comm=comm)
    inp = torch.full((1, 3), float(comm.rank + 1))
    lin(inp).sum().backward()
    try:
        lin(inp).sum().backward()
        raise AssertionError("a second backward pass did not raise")
    except RuntimeError as exc:
        assert "2 times before step()" in str(exc) and "backward_passes_per_step = 1" in str(exc)
    one.synchronize()
    assert lin.weight.grad.tolist() == [[(comm.size + 1) / 2] * 3]
    total = DistributedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), lin, comm=comm,
                                 op="sum")
    one.reducer.remove_hooks()
    total.zero_grad()
    lin(inp).sum().backward()
    total.step()
    assert lin.weight.grad.tolist() == [[comm.size * (comm.size + 1) / 2] * 3]
    half = nn.Linear(1, 1, bias=False).half()  # float16 gradients whose sum overflows 65504
    average = DistributedOptimizer(torch.optim.SGD(half.parameters(), lr=0.1), half, comm=comm)
    (half(torch.ones(1, 1, dtype=torch.float16)) * 40000).sum().backward()
    average.synchronize()
    assert half.weight.grad.item() == 40000.0
    if comm.size > 1:  # a model that differs on one rank fails on every rank, never hangs
        odd = nn.Linear(3, 2 if comm.rank == 1 else 1)
        try:
            DistributedOptimizer(torch.optim.SGD(odd.parameters(), lr=0.1), odd, comm=comm)
            raise AssertionError("different models on the ranks were accepted")
        except ValueError as exc:
            assert "parameters differ" in str(exc)


def run_steps(comm, model, opt, sched, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        local_passes(comm, model, 2, step=t)
        opt.step()
        sched.step()


def fresh(comm):
    model = Branchy(seed=comm.rank)  # different on every rank until broadcast
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, comm=comm,
                               backward_passes_per_step=2, bucket_kib=0.2)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def flat(model):
    return torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()])


def check_resume_and_identical_parameters(comm):
    model, opt, sched = fresh(comm)
    broadcast_parameters(model, comm)
    broadcast_optimizer_state(opt, comm)
    run_steps(comm, model, opt, sched, 4)
    saved = io.BytesIO()
    if comm.rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict()}, saved)
    run_steps(comm, model, opt, sched, 6, start=4)
    assert opt.param_groups[0]["lr"] == 0.05 * 0.5 ** 3
    # resume: only rank 0 reads the checkpoint; the broadcasts give everyone its state
    model2, opt2, sched2 = fresh(comm)
    if comm.rank == 0:
        saved.seek(0)
        state = torch.load(saved, weights_only=True)
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["opt"])
        sched_state = state["sched"]
    broadcast_parameters(model2, comm)
    broadcast_optimizer_state(opt2, comm)
    sched2.load_state_dict(comm.bcast(sched_state if comm.rank == 0 else None))
    run_steps(comm, model2, opt2, sched2, 6, start=4)
    mine = flat(model)
    assert torch.equal(flat(model2), mine)
    everyone = torch.empty(comm.size * mine.numel())
    comm.Allgather(mine, everyone)
    for r in range(comm.size):
        assert torch.equal(everyone.view(comm.size, -1)[r], mine), r
    assert not torch.equal(flat(Branchy(seed=0)), mine)  # it trained


def check_overlap_and_ledger(comm):
    """The first bucket's reduction is posted while backward is still running: when autograd
    finishes the *first* layer's weight (the last gradient backward computes), the buckets of
    the later layers are already posted. The ledger's ``seconds`` excludes time a request was
    merely outstanding."""
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(4)]
    model = nn.Sequential(*layers)
    seen = []
    layers[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(opt.reducer.posted))
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, comm=comm,
                               bucket_kib=0.5)  # one bucket per layer
    assert len(opt.reducer.buckets) == 4
    model(torch.ones(2, 8)).sum().backward()
    assert seen and seen[0] >= 3, seen  # buckets of layers 3, 2, 1 posted during backward
    assert opt.reducer.posted == 4
    opt.step()
    comm.ledger.reset()
    buf = torch.ones(1000)
    req = comm.Iallreduce(buf)
    time.sleep(0.2)  # "compute" while the request is outstanding
    req.wait()
    t = comm.ledger.totals()["Iallreduce"]
    assert t["outstanding_seconds"] >= 0.2
    assert t["seconds"] <= t["outstanding_seconds"] - 0.2 + 1e-6  # the sleep is not waiting
    assert torch.equal(buf, torch.full((1000,), float(comm.size)))


@mpi_test(timeout=240, in_process=True)
def test_data_parallel_against_single_process(comm):
    check_accumulation_dtypes_unused_frozen(comm)
    check_no_sync_and_misuse(comm)
    check_resume_and_identical_parameters(comm)
    check_overlap_and_ledger(comm)
