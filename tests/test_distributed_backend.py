"""The torch.distributed backend "hpcml" at 1, 2 and 4 ranks, one launch per rank count.

Every collective against its closed form for every CPU dtype torch accepts for it (reductions
with every reduce op torch allows on that dtype, AVG included), uneven all-to-all, point to
point (ring, batch_isend_irecv, any source), object collectives, sub-groups and a 2 x 2 device
mesh, monitored_barrier (passing and timing out), the one-line refusals and the ledger's byte
count; then torch's tools over "hpcml" against an independent reference: DDP against DDP over
gloo (find_unused_parameters on and off, no_sync accumulation), FSDP2 ``fully_shard`` and a
DTensor tensor-parallel plan against one process on the whole batch, and a 2-stage
``torch.distributed.pipelining`` split (GPipe and 1F1B) against one process.
"""

from __future__ import annotations

import copy
import functools
import operator
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import hpcml.distributed as hd
from hpcml.distributed.ops import cpu
from hpcml.testing import expect_error, launch, mpi_test

R = dist.ReduceOp
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
COMPLEX = [torch.complex64, torch.complex128]
MOVABLE = [*FLOATS, *INTS, *COMPLEX, torch.bool, torch.uint16, torch.uint32, torch.uint64]


def value(r: int, dtype: torch.dtype, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """Rank r's tensor: small values (1..3; products of 4 ranks fit int8), exact in 16 bits."""
    base = (torch.arange(int(torch.tensor(shape).prod())).reshape(shape) + r) % 3 + 1
    if dtype == torch.bool:
        return base % 2 == 0
    if dtype.is_complex:
        return (base + 1j * (base - r)).to(dtype)
    return base.to(dtype)


def closed_form(op, dtype: torch.dtype, n: int) -> torch.Tensor:
    xs = [value(k, dtype) for k in range(n)]
    if dtype == torch.bool:
        combine = {R.SUM: operator.or_, R.MAX: operator.or_, R.BOR: operator.or_,
                   R.PRODUCT: operator.and_, R.MIN: operator.and_, R.BAND: operator.and_,
                   R.BXOR: operator.xor}[op]
        return functools.reduce(combine, xs)
    if op in (R.BAND, R.BOR, R.BXOR):
        combine = {R.BAND: torch.bitwise_and, R.BOR: torch.bitwise_or,
                   R.BXOR: torch.bitwise_xor}[op]
        return functools.reduce(combine, xs)
    wide = [x.to(torch.complex128 if dtype.is_complex else torch.float64) for x in xs]
    stacked = torch.stack(wide)
    out = {R.SUM: lambda: stacked.sum(0), R.AVG: lambda: stacked.sum(0) / n,
           R.PRODUCT: lambda: stacked.prod(0), R.MIN: lambda: stacked.real.min(0).values,
           R.MAX: lambda: stacked.real.max(0).values}[op]()
    return out.to(dtype)


def ops_for(dtype: torch.dtype) -> list:
    if dtype == torch.bool:
        return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]
    if dtype.is_complex:
        return [R.SUM, R.AVG]  # torch refuses the others on complex tensors itself
    if dtype.is_floating_point:
        return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.AVG]
    return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]


def check_reductions(n: int, r: int) -> None:
    for dtype in [*FLOATS, *INTS, *COMPLEX, torch.bool]:
        for op in ops_for(dtype):
            want = closed_form(op, dtype, n)
            t = value(r, dtype)
            dist.all_reduce(t, op=op)
            assert torch.equal(t, want), (dtype, op, t, want)
            t = value(r, dtype).t()  # a non-contiguous view, written back
            dist.all_reduce(t, op=op, async_op=True).wait()
            assert torch.equal(t, want.t()), (dtype, op, "view")
            root = n - 1
            t = value(r, dtype)
            dist.reduce(t, dst=root, op=op)
            assert torch.equal(t, want if r == root else value(r, dtype)), (dtype, op, "reduce")
            if dtype.is_complex:
                continue  # torch has no complex reduce_scatter
            rows = torch.cat([value(r, dtype)] * n)  # block k goes to rank k
            out = torch.empty(2, 3, dtype=dtype)
            dist.reduce_scatter_tensor(out, rows, op=op)
            assert torch.equal(out, want), (dtype, op, "reduce_scatter_tensor")
            out = torch.empty(2, 3, dtype=dtype)
            dist.reduce_scatter(out, [value(r, dtype).clone() for _ in range(n)], op=op)
            assert torch.equal(out, want), (dtype, op, "reduce_scatter")


def check_movement(n: int, r: int) -> None:
    root = n - 1
    for dtype in MOVABLE:
        mine = value(r, dtype)
        t = mine.clone()
        dist.broadcast(t, src=root)
        assert torch.equal(t, value(root, dtype)), (dtype, "broadcast")
        outs = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(outs, mine)
        assert all(torch.equal(outs[k], value(k, dtype)) for k in range(n)), (dtype, "gather")
        whole = torch.empty(2 * n, 3, dtype=dtype)
        dist.all_gather_into_tensor(whole, mine, async_op=True).wait()
        assert torch.equal(whole, torch.cat([value(k, dtype) for k in range(n)])), dtype
        inplace = torch.zeros(2 * n, 3, dtype=dtype)  # FSDP2's way: input inside the output
        inplace[2 * r:2 * r + 2] = mine
        dist.all_gather_into_tensor(inplace, inplace[2 * r:2 * r + 2])
        assert torch.equal(inplace, whole), (dtype, "in place")
        gathered = [torch.empty_like(mine) for _ in range(n)] if r == root else None
        dist.gather(mine, gathered, dst=root)
        if r == root:
            assert all(torch.equal(gathered[k], value(k, dtype)) for k in range(n)), dtype
        out = torch.empty_like(mine)
        dist.scatter(out, [value(k, dtype) for k in range(n)] if r == root else None, src=root)
        assert torch.equal(out, value(r, dtype)), (dtype, "scatter")
        check_alltoall(n, r, dtype)


def check_alltoall(n: int, r: int, dtype: torch.dtype) -> None:
    """Uneven: rank r sends (r + j) % 3 rows to rank j; row values say (sender, receiver)."""
    def rows(src: int, dst: int) -> torch.Tensor:
        k = (src + dst) % 3
        return value(src + 10 * dst, dtype, (max(k, 1), 2))[:k]

    send = torch.cat([rows(r, j) for j in range(n)])
    want = torch.cat([rows(i, r) for i in range(n)])
    out = torch.empty_like(want)
    dist.all_to_all_single(out, send, output_split_sizes=[(i + r) % 3 for i in range(n)],
                           input_split_sizes=[(r + j) % 3 for j in range(n)])
    assert torch.equal(out, want), (dtype, "all_to_all_single")
    even_send = torch.cat([value(r * n + j, dtype, (1, 2)) for j in range(n)])
    even_out = torch.empty_like(even_send)
    dist.all_to_all_single(even_out, even_send)
    assert torch.equal(even_out, torch.cat([value(i * n + r, dtype, (1, 2)) for i in range(n)]))
    outs = [torch.empty_like(rows(i, r)) for i in range(n)]
    dist.all_to_all(outs, [rows(r, j) for j in range(n)])
    assert all(torch.equal(outs[i], rows(i, r)) for i in range(n)), (dtype, "all_to_all")


def check_point_to_point(n: int, r: int) -> None:
    right, left = (r + 1) % n, (r - 1) % n
    got = torch.empty(4)
    ops = [dist.P2POp(dist.isend, torch.full((4,), float(r)), right),
           dist.P2POp(dist.irecv, got, left)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    assert torch.equal(got, torch.full((4,), float(left)))
    if n == 1:
        return
    if r == 0:  # receive from any source: every other rank sends once
        seen = set()
        for _ in range(n - 1):
            t = torch.empty(2, dtype=torch.int64)
            src = dist.recv(t, tag=7)
            assert torch.equal(t, torch.full((2,), src)), (t, src)
            seen.add(src)
        assert seen == set(range(1, n))
    else:
        dist.send(torch.full((2,), r, dtype=torch.int64), dst=0, tag=7)
    if r % 2 == 0 and r + 1 < n:
        dist.isend(torch.arange(3.0) + r, r + 1).wait()
    elif r % 2 == 1:
        t = torch.empty(3)
        dist.irecv(t, r - 1).wait()
        assert torch.equal(t, torch.arange(3.0) + r - 1)


def check_groups_and_objects(n: int, r: int) -> None:
    objs = [None] * n
    dist.all_gather_object(objs, {"rank": r})
    assert objs == [{"rank": k} for k in range(n)]
    box = [f"from {n - 1}"] if r == n - 1 else [None]
    dist.broadcast_object_list(box, src=n - 1)
    assert box == [f"from {n - 1}"]
    outs = [[torch.empty(2), torch.empty(3)] for _ in range(n)]  # [rank][tensor]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in torch, still used
        dist.all_gather_coalesced(outs, [torch.full((2,), float(r)), torch.full((3,), -1.0 * r)])
    assert all(torch.equal(outs[k][0], torch.full((2,), float(k))) and
               torch.equal(outs[k][1], torch.full((3,), -1.0 * k)) for k in range(n))
    evens = dist.new_group([k for k in range(n) if k % 2 == 0])
    if r % 2 == 0:
        t = torch.tensor([float(r)])
        dist.all_reduce(t, group=evens)
        assert t.item() == sum(k for k in range(n) if k % 2 == 0)
        assert hd.communicator(evens).size == (n + 1) // 2
    dist.barrier()
    if n == 4:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for dim, peers in (("dp", [r % 2, r % 2 + 2]), ("tp", [r // 2 * 2, r // 2 * 2 + 1])):
            t = torch.tensor([float(r)])
            dist.all_reduce(t, group=mesh.get_group(dim))
            assert t.item() == sum(peers), (dim, t)
            assert isinstance(mesh.get_group(dim), hd.ProcessGroupHpcml)


def check_barriers_refusals_ledger(n: int, r: int) -> None:
    hd.monitored_barrier(timeout=timedelta(seconds=60))
    if n > 1:  # rank n-1 stays away: rank 0 names it, the others pass a later barrier
        if r == 0:
            expect_error(RuntimeError, f"rank(s) [{n - 1}] did not reach", hd.monitored_barrier,
                         timeout=0.3, wait_all_ranks=True)
        elif r < n - 1:
            expect_error(RuntimeError, "rank 0 did not release", hd.monitored_barrier,
                         timeout=0.6)
        dist.barrier()
    expect_error(ValueError, "only implemented for GLOO", dist.monitored_barrier)
    expect_error(ValueError, "bitwise reductions need an integer", dist.all_reduce,
                 torch.ones(2), op=R.BAND)
    expect_error(ValueError, "AVG of a torch.int32 tensor", dist.all_reduce,
                 torch.ones(2, dtype=torch.int32), op=R.AVG)
    expect_error(ValueError, "moves CPU tensors only", cpu, torch.empty(1, device="meta"))
    ledger = hd.communicator().ledger.totals()
    before = ledger.get("torch.Iallreduce", {}).get("bytes_sent", 0)
    dist.all_reduce(torch.ones(250, dtype=torch.float64))
    after = hd.communicator().ledger.totals()["torch.Iallreduce"]["bytes_sent"]
    assert after - before == 2000, (before, after)


# -- torch's tools over "hpcml" -------------------------------------------------------------------
class Branchy(nn.Module):
    """Two layers, and with ``branch`` a third that replaces the second on some steps (its
    parameters, or the second's, then get no gradient: find_unused_parameters' case)."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.unused = nn.Linear(8, 2) if branch else None

    def forward(self, x: torch.Tensor, use_unused: bool = False) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.unused(h) if use_unused else self.b(h)


def check_ddp_against_gloo(n: int, r: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    gloo = dist.new_group(backend="gloo")
    for find_unused in (False, True):
        torch.manual_seed(0)
        base = Branchy(find_unused)
        models = [DDP(copy.deepcopy(base), process_group=g, find_unused_parameters=find_unused)
                  for g in (dist.group.WORLD, gloo)]
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
        for step in range(20):
            g = torch.Generator().manual_seed(step * 100 + r)
            x, y = torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)
            for model, opt in zip(models, opts, strict=True):
                opt.zero_grad()
                if step % 4 == 3:  # accumulate one micro-batch without syncing
                    with model.no_sync():
                        nn.functional.mse_loss(model(x[:1]), y[:1]).backward()
                nn.functional.mse_loss(model(x, find_unused and step % 2 == 1), y).backward()
                opt.step()
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert (p - q).abs().max() <= 1e-6, (find_unused, (p - q).abs().max())


class Block(nn.Module):
    """A tiny pre-norm transformer block: 4 heads of 4, MLP 16 -> 32 -> 16."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.hd = d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.w1, self.w2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, -1, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.w2(torch.relu(self.w1(self.norm2(x))))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tokens(step: int, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 11, (batch, 6), generator=torch.Generator().manual_seed(step))


def lm_loss(model: nn.Module, toks: torch.Tensor) -> torch.Tensor:
    logits = model(toks[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 11), toks[:, 1:].reshape(-1))


def train_reference(steps: int) -> nn.Module:
    torch.manual_seed(1)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        lm_loss(model, tokens(step)).backward()
        opt.step()
    return model


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def assert_same(model: nn.Module, reference: nn.Module, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        gap = (full(p.detach()) - q.detach()).abs().max().item()
        assert gap <= 1e-5, (what, name, gap)


def check_fsdp2_and_tensor_parallel(n: int, r: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    steps = 4
    reference = train_reference(steps)
    mesh = init_device_mesh("cpu", (n,))
    # FSDP2: each rank a quarter of the batch; gradients averaged = the whole batch's
    torch.manual_seed(1)
    model = Tiny()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = 4 // n
    for step in range(steps):
        opt.zero_grad()
        lm_loss(model, tokens(step)[r * per:(r + 1) * per]).backward()
        opt.step()
    assert_same(model, reference, "fsdp2")
    # tensor parallel: heads and MLP columns split over the ranks, the whole batch everywhere
    torch.manual_seed(1)
    model = Tiny()
    plan = {**{f: ColwiseParallel() for f in ("q", "k", "v", "w1")},
            **{f: RowwiseParallel() for f in ("o", "w2")}}
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        lm_loss(model, tokens(step)).backward()
        opt.step()
    assert_same(model, reference, "tensor parallel")


def check_pipeline(n: int, r: int) -> None:
    """Two stages on ranks 0 and 1 (the other ranks do not take part)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if n < 2:
        return
    pair = dist.new_group([0, 1])
    torch.manual_seed(2)
    whole = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 2))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(6))
    for schedule in (ScheduleGPipe, Schedule1F1B):
        reference = copy.deepcopy(whole)
        nn.functional.mse_loss(reference(x), y).backward()
        if r > 1:
            continue
        part = copy.deepcopy(whole[:2] if r == 0 else whole[2:])
        stage = PipelineStage(part, r, 2, torch.device("cpu"), group=pair)
        run = schedule(stage, n_microbatches=4, loss_fn=nn.functional.mse_loss)
        if r == 0:
            run.step(x)
        else:
            losses: list[torch.Tensor] = []
            out = run.step(target=y, losses=losses)
            assert torch.allclose(out, whole(x), atol=1e-6), schedule.__name__
            want = nn.functional.mse_loss(whole(x), y)
            assert abs(torch.stack(losses).mean() - want) < 1e-6, schedule.__name__
        mine = reference[:2] if r == 0 else reference[2:]
        for p, q in zip(part.parameters(), mine.parameters(), strict=True):
            assert (p.grad - q.grad).abs().max() <= 1e-6, schedule.__name__
    dist.barrier()


@mpi_test(ranks=[1, 2, 4], timeout=240)
def test_distributed_backend(comm) -> None:
    dist.init_process_group("hpcml")
    n, r = dist.get_world_size(), dist.get_rank()
    assert (n, r) == (comm.size, comm.rank)
    assert dist.get_backend() == "hpcml"
    check_reductions(n, r)
    check_movement(n, r)
    check_point_to_point(n, r)
    check_groups_and_objects(n, r)
    check_barriers_refusals_ledger(n, r)
    check_ddp_against_gloo(n, r)
    check_fsdp2_and_tensor_parallel(n, r)
    check_pipeline(n, r)
    dist.destroy_process_group()


ABORTS = """
import torch
import torch.distributed as dist
import hpcml.distributed
dist.init_process_group("hpcml")
if dist.get_rank() == 1:
    raise RuntimeError("boom on rank 1")
dist.all_reduce(torch.ones(1))  # rank 0 would wait here for ever
print("unreachable")
"""


def test_uncaught_exception_ends_the_job(tmp_path) -> None:
    """A plain script (no hpcml wrapper): rank 1 raises while rank 0 waits in an allreduce; the
    job ends at once with rank 1's traceback instead of hanging."""
    script = tmp_path / "aborts.py"
    script.write_text(ABORTS)
    res = launch(2, [sys.executable, str(script)], timeout=120)
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert "hpcml: rank 1 of 2 failed; aborting the job." in res.stderr, res.stderr[-3000:]
    assert "RuntimeError: boom on rank 1" in res.stderr and "unreachable" not in res.stdout
