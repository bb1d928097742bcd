"""Pipeline parallelism against the single-process model: loss, every gradient, checkpoints.

The model has uneven layers, a long skip connection, a module called twice (its parameters
end up on two stages), a parameter read between modules (on every stage that replays that
code), and a data-dependent sequence length (each microbatch is trimmed to
its longest sentence), so activation shapes change per microbatch and per step. The reference
runs the same microbatches of the same global batch in one process.
"""

import torch
from torch import nn

import hpcml.parallel as hp
from hpcml.nmt.model import Transformer, smoothed_loss_sum
from hpcml.testing import mpi_test

WIDTHS = (16, 64, 32, 128, 16, 48)


class Block(nn.Module):
    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(16, w) for w in WIDTHS])
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16))  # read between units

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.embed(x))[:, : int(lengths.max())] * self.scale
        h = h0
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == 1:
                h = self.shared(h)
        return self.head(self.shared(h) + h0)


def skip_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y[:, : out.shape[1]]) ** 2).sum()


def batch(seed: int, n: int, length: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 8, generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    return x, lengths, torch.randn(n, length, 4, generator=g)


@hp.step
def train_step(model, x, lengths, y):
    loss = skip_loss(model(x, lengths), y)
    model.backward(loss)
    return loss


def reference(model: nn.Module, chunks: list[tuple], data: int) -> tuple[float, dict]:
    """Loss and gradients of the single-process model over the same microbatches, with the
    data-parallel average (sum over replicas' microbatches / replicas)."""
    model.zero_grad()
    total = 0.0
    for x, lengths, y in chunks:
        loss = skip_loss(model(x, lengths), y) / data
        loss.backward()
        total += float(loss)
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_matches(pmodel: hp.PipelineModel, grads: dict) -> None:
    for name, p in pmodel.named_parameters():
        ref = grads[name]
        err = float((p.grad - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()) + 1e-12, (name, err)


def layouts(size: int) -> list[tuple[int, int, str]]:
    """(data, pipeline, schedule) at this rank count: both schedules at 2 and 4 ranks."""
    if size == 2:
        return [(1, 2, "gpipe"), (1, 2, "1f1b")]
    return [(1, 4, "1f1b"), (2, 2, "gpipe")]


def run_layout(comm, data: int, stages: int, schedule: str, micro: int = 3):
    torch.manual_seed(0)
    model = SkipNet()
    reference_model = SkipNet()
    reference_model.load_state_dict(model.state_dict())
    mesh = hp.Mesh(comm, data=data, pipeline=stages)
    pmodel = hp.PipelineModel(model, mesh, sample=batch(99, 2, 5)[:2], microbatches=micro,
                              schedule=schedule)
    replica = mesh.coords["data"]
    for seed, length in ((1, 7), (2, 4)):
        x, lengths, y = batch(seed, 6 * data, length)
        shards = [tuple(t.tensor_split(data)[r] for t in (x, lengths, y)) for r in range(data)]
        chunks = [tuple(t.tensor_split(micro)[m] for t in shard)
                  for shard in shards for m in range(micro)]
        ref_loss, ref_grads = reference(reference_model, chunks, data)
        pmodel.zero_grad()
        out = train_step(pmodel, *shards[replica])
        loss = mesh.data.allreduce(out.reduce_sum()) / data
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
        assert_matches(pmodel, ref_grads)
    return pmodel, reference_model


@hp.step
def predict(model, x, lengths):
    return model(x, lengths)


def check_forward_only(pmodel: hp.PipelineModel, reference_model: nn.Module) -> None:
    """Under no_grad a step runs the forwards only; the last stage gets each microbatch's
    output, equal to the single-process model's."""
    x, lengths, _ = batch(7, 6, 5)
    with torch.no_grad():
        out = predict(pmodel, x, lengths)
        if pmodel.stage == pmodel.stages - 1:
            for got, xs, ls in zip(out.outputs, x.tensor_split(3), lengths.tensor_split(3),
                                   strict=True):
                assert torch.allclose(got, reference_model(xs, ls), rtol=1e-5, atol=1e-6)
        else:
            assert out.outputs == []
    assert all(p.grad is not None for p in pmodel.parameters())  # untouched by evaluation


def check_checkpoint(comm, pmodel: hp.PipelineModel, reference_model: nn.Module) -> None:
    """After one Adam step on both, the pipelined model's full checkpoint (model and optimizer
    state) equals the reference in one process, and loads into another layout (pure data
    parallel, or 4 pinned stages)."""
    import tempfile
    from pathlib import Path

    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (pmodel, reference_model)]
    for opt in optimizers:
        opt.step()
    folder = Path(comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None))
    pmodel.save(folder / "full.pt")
    pmodel.save_optimizer(optimizers[0], folder / "adam.pt")
    plain = SkipNet()
    hp.load_full_state(plain, folder / "full.pt")
    for name, tensor in reference_model.state_dict().items():
        assert torch.allclose(plain.state_dict()[name], tensor, rtol=1e-5, atol=1e-6), name
    plain_adam = torch.optim.Adam(plain.parameters(), lr=0.5)
    hp.load_full_optimizer_state(plain, plain_adam, folder / "adam.pt")
    reference_state = dict(zip(plain.parameters(), optimizers[1].state.values(), strict=True))
    assert plain_adam.param_groups[0]["lr"] == 0.01
    for p, saved in plain_adam.state.items():
        for key, value in reference_state[p].items():
            assert torch.allclose(saved[key], value, rtol=1e-5, atol=1e-8), key
    torch.manual_seed(1)
    stages = 1 if pmodel.mesh.sizes["data"] == 1 else comm.size
    other = hp.PipelineModel(SkipNet(), hp.Mesh(comm, pipeline=stages),
                             sample=batch(99, 2, 5)[:2], partition={"blocks.1": min(1, stages - 1)})
    pinned = {other.plan.stage_of[k] for k, c in enumerate(other.trace.calls)
              if c.unit.startswith("blocks.1")}
    assert pinned == {min(1, stages - 1)}
    hp.load_full_state(other, folder / "full.pt")
    other_adam = torch.optim.Adam(other.parameters())
    hp.load_full_optimizer_state(other, other_adam, folder / "adam.pt")
    plain_state = dict(zip([n for n, _ in plain.named_parameters()], plain_adam.state.values(),
                           strict=True))
    for name, p in other.named_parameters():
        assert torch.equal(p.data, plain.state_dict()[name]), name
        assert torch.equal(other_adam.state[p]["exp_avg"], plain_state[name]["exp_avg"]), name


def check_transformer(comm) -> None:
    """The hpcml transformer (tied embedding: used by the first and the last stage) on 2
    stages, times 2 data replicas at 4 ranks, with stage 0's activations recomputed."""
    torch.manual_seed(0)
    model = Transformer(40, 16, 2, 2, 32, dropout=0.0, sparse=False)
    reference_model = Transformer(40, 16, 2, 2, 32, dropout=0.0, sparse=False)
    reference_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(1, 40, (4, 6), generator=g), torch.randint(1, 40, (4, 5), generator=g)
    data = comm.size // 2

    @hp.step
    def nmt_step(m, s, t_in, t_out):
        loss = smoothed_loss_sum(m(s, t_in), t_out, 0.1) * data  # replicas average gradients
        m.backward(loss)
        return loss

    mesh = hp.Mesh(comm, data=data, pipeline=2)
    pmodel = hp.PipelineModel(model, mesh, sample=(src[:1], tgt[:1, :-1]), microbatches=2,
                              checkpoint_stages=[0])
    assert "embed.weight" in pmodel.plan.shared
    replica = [t.tensor_split(data)[mesh.coords["data"]] for t in (src, tgt)]
    out = nmt_step(pmodel, replica[0], replica[1][:, :-1], replica[1][:, 1:])
    loss = mesh.data.allreduce(out.reduce_sum()) / data
    ref = smoothed_loss_sum(reference_model(src, tgt[:, :-1]), tgt[:, 1:], 0.1)
    ref.backward()
    assert abs(loss - float(ref)) <= 1e-5 * float(ref)
    assert_matches(pmodel, {n: p.grad for n, p in reference_model.named_parameters()})


@mpi_test(ranks=[2, 4], in_process=True)
def test_pipeline_matches_single_process_and_checkpoints_load_anywhere(comm):
    torch.set_num_threads(1)
    for data, stages, schedule in layouts(comm.size):
        pmodel, reference_model = run_layout(comm, data, stages, schedule)
        assert pmodel.plan.holders["scale"] == frozenset(range(stages))  # summed gradients
        if stages == 4:  # the module called twice runs on two stages: gradients summed
            assert any("shared" in n for n in pmodel.plan.shared)
        assert pmodel.parameters(), "every stage holds parameters"
        assert pmodel.stats["in_flight"] == (3 if schedule == "gpipe"
                                             else min(stages - pmodel.stage, 3))
        assert "theoretical (S-1)/(M+S-1)" in pmodel.stage_table()
        check_forward_only(pmodel, reference_model)
    assert "pipeline.Isend" in comm.ledger.totals()
    check_checkpoint(comm, pmodel, reference_model)
    check_transformer(comm)


def test_activation_checkpointing_saves_memory_and_keeps_gradients():
    """One process (a 1-stage pipeline): recomputing the blocks' activations in backward
    holds fewer saved bytes and gives the same gradients."""
    from hpcml.comm import world

    torch.set_num_threads(1)
    x, lengths, y = batch(5, 8, 6)
    grads, peaks = [], []
    for modules in ([], ["blocks"]):
        torch.manual_seed(0)
        pmodel = hp.PipelineModel(SkipNet(), hp.Mesh(world()), sample=(x[:2], lengths[:2]),
                                  microbatches=2, checkpoint_modules=modules)
        train_step(pmodel, x, lengths, y)
        grads.append({n: p.grad for n, p in pmodel.named_parameters()})
        peaks.append(pmodel.stats["peak_activation_bytes"])
    assert peaks[1] < 0.6 * peaks[0], peaks
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if bool(x.sum() > 0) else self.b(x)


def test_bad_use_is_a_one_line_error():
    """One process: wrong arguments are UsageErrors naming the field; a forward whose module
    calls depend on the data stops with the call it did not expect."""
    import pytest

    from hpcml.comm import world
    from hpcml.errors import UsageError

    mesh = hp.Mesh(world())
    x = batch(0, 4, 3)[:2]
    with pytest.raises(UsageError, match="schedule: 'zb' is not one of"):
        hp.PipelineModel(SkipNet(), mesh, sample=x, schedule="zb")
    with pytest.raises(UsageError, match=r"partition\['decoder'\]: no module of that name"):
        hp.PipelineModel(SkipNet(), mesh, sample=x, partition={"decoder": 0})
    pmodel = hp.PipelineModel(SkipNet(), mesh, sample=x, microbatches=2)
    with pytest.raises(UsageError, match="a batch of 1 does not split into 2 equal"):
        train_step(pmodel, *batch(0, 1, 3))
    with pytest.raises(UsageError, match="inside a function decorated"):
        pmodel(*x)
    positive = torch.ones(2, 4)
    branchy = hp.PipelineModel(Branchy(), mesh, sample=(positive,), microbatches=1)

    @hp.step
    def run(model, inputs):
        model.backward(model(inputs).sum())

    run(branchy, positive)
    with pytest.raises(RuntimeError, match="made 0 of the 1 traced module calls"):
        run(branchy, -positive)
