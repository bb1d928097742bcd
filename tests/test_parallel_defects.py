"""Issue 23's silent defects, each against one process or a one-line refusal: weight ties kept
or refused by ``parallelize``, a sharded weight read outside its module, global gradient
clipping in every layout (DP, ZeRO-1, TP, PP) equal to ``torch.nn.utils.clip_grad_norm_``,
microbatch splits, the deterministic default partition, and the data-parallel misuses."""

import inspect
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcml.parallel as hp
from hpcml.comm import world
from hpcml.errors import UsageError
from hpcml.parallel.sharding import ShardedOptimizer
from hpcml.parallel.tensor import parallelize, vocab_parallel_cross_entropy
from hpcml.parallel.tensor.plan import sharded_parameters
from hpcml.testing import launch, mpi_test

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
        if comm.size == 4:  # ZeRO-1 over data 2 of a tensor-parallel (T = 2) model
            mesh = hp.Mesh(comm, data=2, tensor=2)
            model = parallelize(mlp(), mesh.tensor)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, mesh.data, lr=1.0)
            local_loss(model, mesh.data).backward()
            norm = hp.clip_grad_norm_(opt, MAX_NORM, norm_type)
            opt.step()
            assert rel_err(norm, want_norm) <= 1e-5, ("zero1 x tp", norm, want_norm)
            for n, p in model.named_parameters():
                ref = shards[n].local(want[n], 2, mesh.tensor.rank) if n in shards else want[n]
                assert rel_err(before[n] - p.detach(), ref) <= 1e-5, ("zero1 x tp", n)
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
    # defect 7: the default partition is by parameter count, not by measured time
    counts = [c.param_count for c in pmodel.trace.calls]
    assert pmodel.costs == pytest.approx([n / sum(counts) for n in counts], rel=1e-12)
    pipeline_step(pmodel, x, y)
    norm = hp.clip_grad_norm_(pmodel, MAX_NORM)
    assert rel_err(norm, want_norm) <= 1e-5, ("pp", norm, want_norm)
    grads = dict(ref.named_parameters())
    for n, p in pmodel.named_parameters():
        assert rel_err(p.grad, grads[n].grad) <= 1e-5, ("pp", n)


def check_data_parallel_misuse(comm) -> None:
    # an extra backward pass after zero_grad(set_to_none=False): param.grad is a view of the
    # bucket whose Iallreduce is in flight; the pass is refused before it accumulates
    lin = nn.Linear(3, 1, bias=False)
    hp.broadcast_parameters(lin, comm)
    opt = hp.DistributedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), lin, comm=comm)
    inp = torch.full((1, 3), float(comm.rank + 1))
    lin(inp).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    lin(inp).sum().backward()
    with pytest.raises(RuntimeError, match="got a gradient 2 times before step"):
        lin(inp).sum().backward()
    opt.synchronize()
    assert lin.weight.grad.tolist() == [[(comm.size + 1) / 2] * 3]
    # a parameter unfrozen after the optimizer was built: refused, then rebuilt and averaged
    torch.manual_seed(5)
    net, ref = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)), None
    net[0].requires_grad_(False)
    opt = hp.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, comm=comm)
    net[0].requires_grad_(True)
    net(inp).sum().backward()
    with pytest.raises(ValueError, match="parameter '0.weight' was unfrozen") as err:
        opt.step()
    assert "\n" not in str(err.value)
    opt.reducer.synchronize()  # drain the exchange the refused step left posted
    opt.zero_grad()
    opt.rebuild()
    net(inp).sum().backward()
    opt.synchronize()
    ref = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    ref.load_state_dict(net.state_dict())
    ref(torch.full((1, 3), (comm.size + 1) / 2)).sum().backward()  # linear: mean input
    for (n, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) <= 1e-6, n


@mpi_test(ranks=[1, 2, 4], timeout=240, in_process=True)
def test_ties_shard_reads_clipping_and_data_parallel_misuse(comm):
    check_ties(comm)
    check_shard_read_outside_its_module(comm)
    check_clip(comm)
    check_data_parallel_misuse(comm)


def test_microbatch_splits_are_equal_and_batch_arguments_explicit():
    """Defect 6: batch 10 over 4 microbatches is refused (the loss / M normalization would
    weigh unequal chunks unequally); a tensor that is not batch-sized is refused unless the
    step names its batch arguments, and then only those are split."""
    from hpcml.parallel.pipeline import _positional_names, split_microbatches

    x, y = torch.arange(10.0), torch.arange(10.0)
    with pytest.raises(UsageError, match="a batch of 10 does not split into 4 equal"):
        split_microbatches((x, y), {}, 4, ["x", "y"])
    table = torch.ones(3, 2)
    with pytest.raises(UsageError, match=r"argument 'table' has first dimension 3.*batch=\("):
        split_microbatches((x[:8], table), {}, 4, ["x", "table"])
    square = torch.ones(8, 8)  # batch-sized but not batch data: declared by batch=
    chunks = split_microbatches((x[:8], square), {"y": y[:8]}, 4, ["x", "square"],
                                batch=("x", "y"))
    assert [c[0][0].tolist() for c in chunks] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(c[0][1] is square and c[1]["y"].shape == (2,) for c in chunks)
    with pytest.raises(UsageError, match=r"\['z'\] are not arguments"):
        split_microbatches((x[:8],), {}, 4, ["x"], batch=("z",))

    def fn(model, a, *rest):
        return a

    assert _positional_names(inspect.signature(fn), 4) == \
        ["model", "a", "rest[0]", "rest[1]"]


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.a, self.b = nn.Linear(4, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_activations_kept_for_recomputation_are_counted():
    """Defect 8, one process: a checkpointed unit keeps its input (a's output, 8 x 64 floats)
    alive until the backward; the stage's peak counts it, and x (8 x 4 floats) that a saves."""
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    pmodel = hp.PipelineModel(Wide(), hp.Mesh(world()), sample=(x,), microbatches=1,
                              units=["a", "b"], checkpoint_modules=["b"])
    pipeline_step(pmodel, x, y)
    assert pmodel.stats["peak_activation_bytes"] >= 4 * 8 * (64 + 4)


class Counted(nn.Module):
    """Unit ``a`` returns the sequence length as a Python int, which later code slices by."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Length(), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, n = self.a(x)
        return self.b(h[:, :n])


class Length(nn.Linear):
    def __init__(self) -> None:
        super().__init__(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return super().forward(x), int(x.shape[1]) - 1


def varying_non_tensor_output(comm) -> None:
    pmodel = hp.PipelineModel(Counted(), hp.Mesh(comm, pipeline=2),
                              sample=(torch.randn(2, 5, 3),), microbatches=2, units=["a", "b"])
    for length in (5, 4):  # the trace saw 5; the second step's int differs
        pipeline_step(pmodel, torch.randn(4, length, 3), torch.randn(4, length - 1, 3))


def test_non_tensor_output_that_varies_is_refused():
    """Defect 5, two stages: the int that unit a returns changes with the batch; stage 1 would
    replay the traced one, so stage 0 refuses with one line (and the job stops)."""
    res = launch(2, [sys.executable, "-m", "hpcml.testing", __file__,
                     "varying_non_tensor_output"], timeout=120)
    assert res.returncode != 0
    assert "hpcml: error (rank 0): pipeline: unit 'a' (call 0) returned the non-tensor " \
           "output 3 where the trace recorded 4" in res.stderr, res.stderr[-3000:]


class Branch(nn.Module):
    """Which way the forward goes depends on unit a's output, which b (stage 1) never reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) if bool(self.a(x).sum() > 0) else self.b(-x)


def branch_on_unreceived_activation(comm) -> None:
    x = torch.ones(4, 3)
    assert float(Branch().a(x).sum()) > 0  # stage 0 takes b(x); zeros would take b(-x)
    pmodel = hp.PipelineModel(Branch(), hp.Mesh(comm, pipeline=2), sample=(x[:2],),
                              microbatches=2, units=["a", "b"])
    pipeline_step(pmodel, x, torch.zeros(4, 3))


def test_control_flow_on_an_activation_a_stage_does_not_receive_is_refused():
    """Defect 4, two stages: stage 1 would branch on zeros standing in for a's output; it
    refuses with one line naming the unit."""
    res = launch(2, [sys.executable, "-m", "hpcml.testing", __file__,
                     "branch_on_unreceived_activation"], timeout=120)
    assert res.returncode != 0
    assert "hpcml: error (rank 1): pipeline: the forward turned the output of unit 'a' " \
           "(call 0) into a Python value (__bool__)" in res.stderr, res.stderr[-3000:]
