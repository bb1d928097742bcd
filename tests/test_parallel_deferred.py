"""Deferred initialization (hpcml.parallel.deferred): the documented rule against torch.nn.init
run by hand; every layout's materialized shards against the one-process deferred model, bit for
bit; loading a one-process checkpoint into a layout (memory-mapped, slices only) against the
file and its round trip; one-line refusals; the big-model bench row end to end at 4 ranks."""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import hpcml.parallel as hp
from hpcml.errors import UsageError
from hpcml.nmt.model import Transformer, sinusoids
from hpcml.parallel.deferred import deferred_init, materialize, param_seed
from hpcml.parallel.tensor import parallelize
from hpcml.testing import hpcml_cli, mpi_test

BIG_JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "bench-model-parallel-big.toml")


def tiny() -> Transformer:
    return Transformer(50, d_model=16, heads=4, layers=2, ff=32, dropout=0.0, sparse=False,
                       max_len=10)


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(param_seed(seed, name))


def test_rule_replays_the_constructors_init_from_a_generator_per_name():
    lin = deferred_init(lambda: nn.Linear(4, 3), seed=5)
    assert lin.weight.is_meta and lin.bias.is_meta
    materialize(lin)
    want_w = nn.init.kaiming_uniform_(torch.empty(3, 4), a=math.sqrt(5),
                                      generator=generator(5, "weight"))
    want_b = torch.empty(3).uniform_(-0.5, 0.5, generator=generator(5, "bias"))
    assert torch.equal(lin.weight.detach(), want_w) and torch.equal(lin.bias.detach(), want_b)
    emb = deferred_init(lambda: nn.Embedding(6, 2, padding_idx=2), seed=1)
    materialize(emb)
    want = torch.empty(6, 2).normal_(generator=generator(1, "weight"))
    want[2] = 0
    assert torch.equal(emb.weight.detach(), want)


def test_deferred_transformer_has_no_parameter_storage_and_real_buffers():
    model = deferred_init(tiny, seed=3)
    assert all(p.is_meta for p in model.parameters())
    assert torch.equal(model.pe, sinusoids(10, 16))
    materialize(model)
    again = deferred_init(tiny, seed=3)
    materialize(again)
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert not p.is_meta and torch.equal(p, q), name
    # the parent's own init ran after the Embedding's (std d^-1/2), and cloned layers differ
    assert abs(float(model.embed.weight.detach().std()) - 16 ** -0.5) < 0.05
    layers = model.encoder.layers
    assert not torch.equal(layers[0].linear1.weight, layers[1].linear1.weight)


def test_tie_by_assignment_stays_a_tie():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = deferred_init(Tied, seed=0)
    materialize(model)
    assert model.head.weight is model.embed.weight and not model.embed.weight.is_meta
    assert torch.equal(model.embed.weight.detach(),
                       torch.empty(5, 3).normal_(generator=generator(0, "embed.weight")))


class ReadsData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = float(self.lin.weight.detach().abs().max())


class NoInit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


class StorageTie(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight.data = self.a.weight.data


class CopiesParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)


class BufferFromParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("w0", self.lin.weight.detach() * 2)


@pytest.mark.parametrize("cls, words", [
    (ReadsData, ["ReadsData.__init__ reads parameter values", "materialize()"]),
    (NoInit, ["parameter 'w' of <root> (NoInit)", "torch.nn.init"]),
    (StorageTie, ["'b.weight' of b (Linear)", "sharing storage", "head.weight = embed.weight"]),
    (CopiesParameter, ["'b.weight' of b (Linear)", "written from another parameter (copy_)"]),
    (BufferFromParameter, ["buffer 'w0'", "after materialize()"]),
])
def test_refusals_name_the_module_and_the_fix(cls, words):
    with pytest.raises(UsageError) as exc:
        deferred_init(cls)
    message = str(exc.value)
    assert "\n" not in message and all(w in message for w in words), message


def shard_of(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    return p.shard.local(full, p.comm.size, p.comm.rank) if hasattr(p, "shard") else full


# (data, pipeline, tensor): data replicas materialize equal values without a broadcast, and a
# ZeRO-1 optimizer built afterwards holds its shard of the state
LAYOUTS = {1: [(1, 1, 1)], 2: [(1, 2, 1), (1, 1, 2)],
           4: [(1, 4, 1), (1, 1, 4), (1, 2, 2), (2, 2, 1)]}


@mpi_test(ranks=[1, 2, 4], timeout=240)
def test_layouts_materialize_slices_of_one_process_and_load_checkpoints(comm):
    torch.set_num_threads(1)
    src = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    one = deferred_init(tiny, seed=7)
    materialize(one)
    full = dict(one.named_parameters())
    total = sum(p.numel() for p in full.values())
    folder = Path(comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None))
    other = deferred_init(tiny, seed=99)  # a one-process checkpoint of other weights
    materialize(other)
    if comm.rank == 0:
        hp.save_checkpoint(folder / "one.pt", other)
    comm.barrier()
    saved = dict(other.named_parameters())
    for dp, pp, tp in LAYOUTS[comm.size]:
        mesh = hp.Mesh(comm, data=dp, pipeline=pp, tensor=tp)
        model = deferred_init(tiny, seed=7)
        if tp > 1:
            parallelize(model, mesh.tensor)
        pmodel = hp.PipelineModel(model, mesh, sample=(src[:2], src[:2]), microbatches=2,
                                  data_reduction="optimizer" if dp > 1 else "allreduce")
        held = dict(pmodel.named_parameters())
        assert not any(p.is_meta for p in model.parameters())
        for name, p in held.items():  # bit for bit
            assert torch.equal(p.detach(), shard_of(p, full[name].detach())), (pp, tp, name)
        mine = sum(p.numel() for p in held.values())
        assert mine == sum(p.numel() for p in model.parameters() if p.numel())
        if pp * tp > 1:
            assert mine < 0.75 * total, (pp, tp, mine, total)
        if dp > 1:
            zero = hp.ShardedOptimizer(pmodel.parameters(), torch.optim.Adam, mesh.data)
            assert zero.shard_numel * dp >= mine > zero.shard_numel * (dp - 1)
        # a one-process checkpoint streams into the layout; saving it again gives the file
        hp.load_checkpoint(folder / "one.pt", pmodel, mesh=mesh)
        for name, p in pmodel.named_parameters():
            assert torch.equal(p.detach(), shard_of(p, saved[name].detach())), (pp, tp, name)
        hp.save_checkpoint(folder / f"pp{pp}tp{tp}.pt", pmodel, mesh=mesh)
        if comm.rank == 0:
            back = torch.load(folder / f"pp{pp}tp{tp}.pt", weights_only=True)["model"]
            assert all(torch.equal(back[k], v) for k, v in other.state_dict().items())
    if comm.size > 1:  # a deferred tensor-parallel module (no pipeline) loads its shards
        mesh = hp.Mesh(comm, tensor=comm.size)
        model = parallelize(deferred_init(tiny, seed=7), mesh.tensor)
        hp.load_checkpoint(folder / "one.pt", model, mesh=mesh)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), shard_of(p, saved[name].detach())), name


def test_big_bench_job_tiny_version_four_ranks(tmp_path):
    """The big job's path (deferred pp2xtp2) on a tiny model: equal to one process, and the
    memory-at-scale fields with their ratio."""
    sets = ["models=['base']", "unchecked_models=[]", "vocab=50", "steps=1",
            f"runs_dir={tmp_path / 'runs'}"]
    res = hpcml_cli(4, "bench", "model-parallel", BIG_JOB,
                    *[x for kv in sets for x in ("--set", kv)], cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    (row,) = json.loads((run / "summary.json").read_text())["rows"]
    assert row["layout"] == "pp2xtp2" and row["deferred"]
    assert row["grad_max_rel_diff"] <= 1e-5 and row["loss_abs_diff"] <= 1e-5 * row["loss"]
    params = sum(p.numel() for p in Transformer(50, dropout=0.0, sparse=False, max_len=9,
                                                d_model=64, heads=4, layers=2,
                                                ff=256).parameters())
    assert row["model_state_bytes"] == 16 * params
    assert 50 * 2 ** 20 < row["peak_rss_bytes_per_rank"] < 4 * 2 ** 30
    assert row["state_over_rss"] == row["model_state_bytes"] / row["peak_rss_bytes_per_rank"]
    assert "state / RSS" in (run / "table.md").read_text()
