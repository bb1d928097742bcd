"""Checkpoints across layouts: Adam trained in one layout, saved, loaded into another layout,
trained on, saved again, ... and finally loaded into one process. Every checkpoint -- parameters,
buffers and Adam's state (exp_avg, exp_avg_sq, step) and hyper-parameters -- must equal the
single-process model trained on the same global batches for the same number of steps, and the
last step in one process must land where the reference lands.

The model has a vocabulary-parallel embedding (13 rows: uneven shards at T = 2 and 4), column-
and row-parallel Linears, replicated LayerNorm and head, and a buffer. Each new layout starts
from other weights and another learning rate, so only the checkpoint can make it match.
"""

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import hpcml.parallel as hp
from hpcml.errors import UsageError
from hpcml.parallel.layout_checkpoint import gather_full
from hpcml.parallel.tensor import parallelize
from hpcml.testing import mpi_test

LR = 0.01
BATCH = 8


class Net(nn.Module):
    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(),
                                 nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        return self.head(self.mlp(h) + h) + self.offset


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 13, (BATCH, 5), generator=g), torch.randn(BATCH, 5, 4, generator=g)


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


@hp.step
def pipeline_step(model, ids, y, scale):
    loss = ((model(ids) - y) ** 2).sum() * scale
    model.backward(loss)
    return loss


# name: (data, pipeline, tensor, ZeRO-1)
LAYOUTS = {"pp4": (1, 4, 1, False), "dp2xtp2": (2, 1, 2, False), "pp2xtp2": (1, 2, 2, False),
           "dp2xtp2-zero1": (2, 1, 2, True), "tp4": (1, 1, 4, False),
           "dp2xpp2-zero1": (2, 2, 1, True),
           "dp2-zero1": (2, 1, 1, True), "pp2": (1, 2, 1, False), "tp2": (1, 1, 2, False)}
CHAINS = {2: ["dp2-zero1", "pp2", "tp2"],
          4: ["pp4", "dp2xtp2", "pp2xtp2", "dp2xtp2-zero1", "dp2xpp2-zero1", "tp4"]}


def build(comm, name: str, seed: int, lr: float):
    data, stages, tensor, zero = LAYOUTS[name]
    mesh = hp.Mesh(comm, data=data, pipeline=stages, tensor=tensor)
    model = net(seed)
    if tensor > 1:
        parallelize(model, mesh.tensor)
    if stages > 1:  # under ZeRO-1 the optimizer reduces the gradients over the data group
        model = hp.PipelineModel(model, mesh, sample=(batch(0)[0][:2],), microbatches=2,
                                 data_reduction="optimizer" if zero else "allreduce")
    if zero:
        return mesh, model, hp.ShardedOptimizer(list(model.parameters()), torch.optim.Adam,
                                                mesh.data, lr=lr)
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    if data > 1 and stages == 1:
        return mesh, model, hp.DistributedOptimizer(adam, model, comm=mesh.data)
    return mesh, model, adam


def train(mesh, model, optimizer, step: int) -> None:
    """One Adam step on global batch ``step``: each data replica takes its rows, and the loss is
    scaled so that the replicas' average gradient is that of the global mean loss."""
    data, replica = mesh.sizes["data"], mesh.coords["data"]
    ids, y = (t.tensor_split(data)[replica] for t in batch(step))
    scale = data / BATCH
    optimizer.zero_grad()
    if isinstance(model, hp.PipelineModel):
        pipeline_step(model, ids, y, scale)
    else:
        (((model(ids) - y) ** 2).sum() * scale).backward()
    optimizer.step()


def reference(steps: int) -> tuple[Net, torch.optim.Adam]:
    model = net(0)
    adam = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(steps):
        adam.zero_grad()
        ids, y = batch(step)
        (((model(ids) - y) ** 2).sum() / BATCH).backward()
        adam.step()
    return model, adam


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert got.shape == want.shape and err <= 1e-5 * float(want.abs().max()) + 1e-9, (what, err)


def assert_checkpoint_is_reference(state: dict, steps: int) -> None:
    ref, adam = reference(steps)
    assert state["model"].keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        close(state["model"][key], value, key)
    saved = state["optimizer"]
    assert [g["lr"] for g in saved["param_groups"]] == [LR]
    assert saved["param_groups"][0]["params"] == [n for n, _ in ref.named_parameters()]
    for name, p in ref.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            close(saved["state"][name][key], adam.state[p][key], f"{name}.{key}")


@mpi_test(ranks=[2, 4], timeout=240, in_process=True)
def test_checkpoints_move_between_layouts(comm):
    torch.set_num_threads(1)
    folder = Path(comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None))
    chain = CHAINS[comm.size]
    steps = 0
    for i, name in enumerate(chain):
        mesh, model, optimizer = build(comm, name, seed=0 if i == 0 else 10 + i,
                                       lr=LR if i == 0 else 0.5)
        if i > 0:
            hp.load_checkpoint(folder / f"{chain[i - 1]}.pt", model, optimizer, mesh)
        for _ in range(2 if i == 0 else 1):
            train(mesh, model, optimizer, steps)
            steps += 1
        hp.save_checkpoint(folder / f"{name}.pt", model, optimizer, mesh)
        pieces = gather_full(model, dict(model.named_parameters()), mesh)  # the same mechanism
        if comm.rank == 0:
            state = torch.load(folder / f"{name}.pt", weights_only=True)
            assert_checkpoint_is_reference(state, steps)
            assert pieces.keys() == dict(net(0).named_parameters()).keys()
            assert all(torch.equal(v, state["model"][k]) for k, v in pieces.items())
        else:
            assert pieces is None
    # one process (every rank on its own): load the last layout's checkpoint, one more step
    single = net(99)
    adam = torch.optim.Adam(single.parameters(), lr=0.5)
    hp.load_checkpoint(folder / f"{chain[-1]}.pt", single, adam)
    adam.zero_grad()
    ids, y = batch(steps)
    (((single(ids) - y) ** 2).sum() / BATCH).backward()
    adam.step()
    ref, ref_adam = reference(steps + 1)
    for (name, p), q in zip(single.named_parameters(), ref.parameters(), strict=True):
        close(p.detach(), q.detach(), name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            close(adam.state[p][key], ref_adam.state[q][key], f"{name}.{key}")
    check_refusal_changes_nothing(comm, mesh, model, optimizer, folder / f"{chain[-1]}.pt")


def check_refusal_changes_nothing(comm, mesh, model, optimizer, good: Path) -> None:
    """The checkpoint of a model with one vocabulary row more: in the last layout (T = 2 or 4:
    13 rows split 7,6 or 4,3,3,3; 14 rows 7,7 or 4,4,3,3) rank 0's shard still fits, rank 1's
    does not; every rank must raise rank 1's error and keep its parameters and optimizer state."""
    other = good.with_name("other.pt")
    if comm.rank == 0:
        state = torch.load(good, weights_only=True)
        state["model"]["embed.weight"] = torch.zeros(14, 8)
        embed = state["optimizer"]["state"]["embed.weight"]
        embed.update({k: torch.zeros(14, 8) for k in ("exp_avg", "exp_avg_sq")})
        torch.save(state, other)
    comm.barrier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                    for p, s in optimizer.state.items()}
    with pytest.raises(UsageError, match=r"checkpoint\['embed.weight'\]: shape \[14, 8\]"):
        hp.load_checkpoint(other, model, optimizer, mesh)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    for p, s in optimizer.state.items():
        for k, v in state_before[id(p)].items():
            assert torch.equal(s[k], v), k


def test_refused_loads_name_the_key_and_change_nothing(tmp_path):
    model, adam = reference(2)
    hp.save_checkpoint(tmp_path / "ok.pt", model, adam)
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    target = net(7)
    target_adam = torch.optim.Adam(target.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def refused(payload: dict, match: str, optimizer=None) -> None:
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(UsageError, match=match):
            hp.load_checkpoint(tmp_path / "bad.pt", target, optimizer)
        for k, v in target.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert not target_adam.state and target_adam.param_groups[0]["lr"] == 0.5

    missing = {**state, "model": {k: v for k, v in state["model"].items() if k != "head.bias"}}
    refused(missing, "checkpoint lacks 'head.bias'")
    extra = {**state, "model": {**state["model"], "extra.weight": torch.zeros(2)}}
    refused(extra, "checkpoint has 'extra.weight', which this model lacks")
    shape = {**state, "model": {**state["model"], "mlp.2.weight": torch.zeros(8, 15)}}
    refused(shape, r"checkpoint\['mlp.2.weight'\]: shape \[8, 15\]")
    ghost = {**state, "optimizer": {**state["optimizer"],
                                    "state": {**state["optimizer"]["state"], "ghost": {}}}}
    refused(ghost, "optimizer state for 'ghost'", target_adam)
    refused({k: v for k, v in state.items() if k != "optimizer"}, "no optimizer state",
            target_adam)
    refused(state["model"], "not a hpcml.parallel.full/1 checkpoint")
    with pytest.raises(UsageError, match=r"gather_full: \['nope'\] are not keys"):
        gather_full(model, {"nope": torch.zeros(1)})
    torch.save({"evil": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(UsageError, match="refused to load"):
        hp.load_checkpoint(tmp_path / "pickled.pt", target)
    with pytest.raises(UsageError, match="cannot write the checkpoint"):
        hp.save_checkpoint(tmp_path / "ok.pt" / "under-a-file.pt", model, adam)
    with pytest.raises(UsageError, match="model: expected a PipelineModel or an nn.Module, "
                                         "got OrderedDict"):
        hp.save_checkpoint(tmp_path / "never.pt", model.state_dict(), adam)
    assert not (tmp_path / "never.pt").exists()
    # and the good one loads: model and optimizer equal the saved ones
    hp.load_checkpoint(tmp_path / "ok.pt", target, target_adam)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert target_adam.param_groups[0]["lr"] == LR
    for p, q in zip(target.parameters(), model.parameters(), strict=True):
        assert torch.equal(target_adam.state[p]["exp_avg_sq"], adam.state[q]["exp_avg_sq"])
