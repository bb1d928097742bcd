"""Issue 23's silent defects, each against one process or a one-line refusal: weight ties kept
or refused by ``parallelize``, a sharded weight read outside its module, global gradient
clipping in every layout (DP, ZeRO-1, TP, PP) equal to ``torch.nn.utils.clip_grad_norm_``,
microbatch splits, the deterministic default partition, and the data-parallel misuses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcml.parallel as hp
from hpcml.errors import UsageError
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.tensor import parallelize, vocab_parallel_cross_entropy
from hpcml.parallel.tensor.plan import sharded_parameters
from hpcml.testing import mpi_test

V, D = 12, 8  # vocabulary and width: split evenly over 1, 2 and 4 ranks
MAX_NORM = 0.05  # far below every norm below, so clipping always scales


class TiedLM(nn.Module):
    """A Hugging-Face-style language model: the output head *is* the embedding."""

    def __init__(self, functional_head: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        self.body = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D))
        self.functional_head = functional_head
        if not functional_head:
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.body(h)
        return F.linear(h, self.embed.weight) if self.functional_head else self.head(h)


def ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (4, 5), generator=g), torch.randint(0, V, (4, 5), generator=g)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_ties(comm) -> None:
    x, y = ids()
    ref = TiedLM()
    F.cross_entropy(ref(x).flatten(0, 1), y.flatten(), reduction="sum").backward()
    # the tie kept: head split like the embedding (column = rows of the weight)
    par = parallelize(TiedLM(), comm, {"head": "column"})
    assert par.head.weight is par.embed.weight
    assert len(list(par.parameters())) == len(list(ref.parameters()))
    lo = comm.rank * V // comm.size
    logits = par(x)
    assert logits.shape[-1] == V // comm.size
    vocab_parallel_cross_entropy(logits.flatten(0, 1), y.flatten(), comm,
                                 reduction="sum").backward()
    want = ref.embed.weight.grad[lo:lo + V // comm.size]
    assert rel_err(par.embed.weight.grad, want) <= 1e-5
    # the default plan keeps the lone head whole while it splits the embedding: refused
    with pytest.raises(UsageError) as err:
        parallelize(TiedLM(), comm)
    message = str(err.value)
    assert "\n" not in message and "'head.weight'" in message and "'embed.weight'" in message


def check_shard_read_outside_its_module(comm) -> None:
    x, y = ids()
    par = parallelize(TiedLM(functional_head=True), comm)
    with pytest.raises(UsageError) as err:
        par(x)
    assert "\n" not in str(err.value) and "'embed.weight'" in str(err.value)
    with torch.no_grad():  # no autograd history: optimizers, checkpoints, copies still work
        par.embed.weight.mul_(1.0)
        assert par.embed.weight.detach().shape == (V // comm.size, D)


def mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def reference_clip(norm_type: float) -> tuple[torch.Tensor, dict]:
    """One process: loss over the whole batch, torch's clip; the norm and clipped grads."""
    model = mlp()
    x, y = data()
    ((model(x) - y) ** 2).sum().div(len(x)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type)
    return norm, {n: p.grad.clone() for n, p in model.named_parameters()}


def local_loss(model: nn.Module, comm) -> torch.Tensor:
    """This data rank's rows; its loss scaled so that the average over ranks is the mean."""
    x, y = data()
    rows = slice(comm.rank * len(x) // comm.size, (comm.rank + 1) * len(x) // comm.size)
    return ((model(x[rows]) - y[rows]) ** 2).sum().div(len(x)).mul(comm.size)


def check_clip(comm) -> None:
    for norm_type in (2.0, float("inf")):
        want_norm, want = reference_clip(norm_type)
        # data parallelism: torch's clip would see the unreduced gradient
        model = mlp()
        opt = hp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model,
                                      comm=comm)
        local_loss(model, comm).backward()
        norm = hp.clip_grad_norm_(opt, MAX_NORM, norm_type)
        assert rel_err(norm, want_norm) <= 1e-5, ("dp", norm, want_norm)
        for n, p in model.named_parameters():
            assert rel_err(p.grad, want[n]) <= 1e-5, ("dp", n)
        # ZeRO-1: the clipped shard is what step applies (SGD, lr 1: new = old - grad)
        model = mlp()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, comm, lr=1.0)
        local_loss(model, comm).backward()
        norm = hp.clip_grad_norm_(opt, MAX_NORM, norm_type)
        opt.step()
        assert rel_err(norm, want_norm) <= 1e-5, ("zero1", norm, want_norm)
        for n, p in model.named_parameters():
            assert rel_err(before[n] - p.detach(), want[n]) <= 1e-5, ("zero1", n)
        # tensor parallelism (column, row, replicated Linear): the norm over the shards
        model = parallelize(mlp(), comm)
        x, y = data()
        ((model(x) - y) ** 2).sum().div(len(x)).backward()
        norm = hp.clip_grad_norm_(model, MAX_NORM, norm_type)
        assert rel_err(norm, want_norm) <= 1e-5, ("tp", norm, want_norm)
        shards = sharded_parameters(model)
        for n, p in model.named_parameters():
            ref = shards[n].local(want[n], comm.size, comm.rank) if n in shards else want[n]
            assert rel_err(p.grad, ref) <= 1e-5, ("tp", n)
    check_pipeline_clip(comm)


class Twice(nn.Module):
    """A module called twice (held by two stages: gradients summed, counted once)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared(torch.tanh(self.embed(x)))
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(self.shared(h))


@hp.step
def pipeline_step(model, x, y):
    loss = ((model(x) - y) ** 2).sum() / 8
    model.backward(loss)
    return loss


def check_pipeline_clip(comm) -> None:
    x, y = data()
    ref = Twice()
    ((ref(x) - y) ** 2).sum().div(len(x)).backward()
    want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    pmodel = hp.PipelineModel(Twice(), hp.Mesh(comm, pipeline=comm.size), sample=(x[:2],),
                              microbatches=2, units=["embed", "shared", "blocks.0", "blocks.1",
                                                     "blocks.2", "head"])
    if comm.size > 1:
        assert pmodel.plan.shared == ["shared.bias", "shared.weight"]
    pipeline_step(pmodel, x, y)
    norm = hp.clip_grad_norm_(pmodel, MAX_NORM)
    assert rel_err(norm, want_norm) <= 1e-5, ("pp", norm, want_norm)
    grads = dict(ref.named_parameters())
    for n, p in pmodel.named_parameters():
        assert rel_err(p.grad, grads[n].grad) <= 1e-5, ("pp", n)


@mpi_test(ranks=[1, 2, 4], timeout=240)
def test_tensor_parallel_ties_shard_reads_and_global_clipping(comm):
    check_ties(comm)
    check_shard_read_outside_its_module(comm)
    check_clip(comm)
