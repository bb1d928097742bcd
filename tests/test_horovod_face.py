"""hpcml.horovod at 1, 2 and 4 ranks: every function against its closed form with Horovod's
semantics (ops, scale factors, uneven allgather, alltoall splits, reducescatter's split,
gradients of the differentiable ops, handles), and training loops written the Horovod way
(init, broadcast_parameters, broadcast_optimizer_state, DistributedOptimizer, backward, step)
against one process on the concatenated batch, Horovod's zero-gradient start-up step
included. One launch per rank count."""

import math
import warnings

import torch
from torch import nn

import hpcml.horovod as hvd
from hpcml.testing import expect_error, mpi_test

G = 8  # global batch: divisible by every rank count used here


def check_basics(n: int, r: int) -> None:
    assert hvd.is_initialized()
    assert (hvd.size(), hvd.rank()) == (n, r)
    # one node: every rank is local, and each is alone across nodes
    assert (hvd.local_size(), hvd.local_rank(), hvd.cross_size(), hvd.cross_rank()) == (n, r, 1, 0)
    assert hvd.mpi_enabled() and hvd.mpi_built()
    assert not (hvd.gloo_enabled() or hvd.gloo_built() or hvd.nccl_built())
    assert not (hvd.ccl_built() or hvd.cuda_built() or hvd.ddl_built() or hvd.rocm_built())
    assert hvd.is_homogeneous()  # one node
    assert isinstance(hvd.mpi_threads_supported(), bool)
    assert len({hvd.Average, hvd.Sum, hvd.Min, hvd.Max, hvd.Product, hvd.Adasum}) == 6


def check_allreduce(n: int, r: int) -> None:
    base = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    x = base + 10 * r
    ranks = range(n)
    expected = {
        hvd.Average: base + 10 * (n - 1) / 2,
        hvd.Sum: n * base + 10 * n * (n - 1) / 2,
        hvd.Min: base,
        hvd.Max: base + 10 * (n - 1),
        hvd.Product: math.prod(base + 10 * k for k in ranks) * torch.ones(()),
    }
    for op, want in expected.items():
        got = hvd.allreduce(x, op=op)
        assert torch.allclose(got, want, rtol=1e-12), (op, got, want)
    assert torch.equal(x, base + 10 * r)  # not modified
    assert torch.allclose(hvd.allreduce(x), expected[hvd.Average])  # default op
    assert torch.allclose(hvd.allreduce(x, average=False), expected[hvd.Sum])  # deprecated
    got = hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=3.0)
    assert torch.allclose(got, 6 * expected[hvd.Sum])
    got = hvd.allreduce(x, op=hvd.Average, postscale_factor=0.5)
    assert torch.allclose(got, 0.5 * expected[hvd.Average])
    y = x.clone()
    assert hvd.allreduce_(y, op=hvd.Max) is y and torch.equal(y, expected[hvd.Max])
    handle = hvd.allreduce_async(x, op=hvd.Sum)
    while not hvd.poll(handle):
        pass
    assert torch.allclose(hvd.synchronize(handle), expected[hvd.Sum])
    expect_error(ValueError, "unknown or already synchronized", hvd.synchronize, handle)
    y = x.clone()
    handle = hvd.allreduce_async_(y, op=hvd.Min)
    assert hvd.synchronize(handle) is y and torch.equal(y, expected[hvd.Min])
    ints = torch.tensor([r, 1])
    assert torch.equal(hvd.allreduce(ints, op=hvd.Sum), torch.tensor([n * (n - 1) // 2, n]))
    # integers are scaled in float64 and truncated toward zero, as Horovod does
    assert torch.equal(hvd.allreduce(ints), torch.tensor([(n - 1) // 2, 1]))
    got = hvd.allreduce(torch.tensor([7, -7]), op=hvd.Sum, prescale_factor=0.5)
    assert torch.equal(got, torch.tensor([3 * n, -3 * n]))
    check_adasum(n, r)
    expect_error(ValueError, "supersedes", hvd.allreduce, x, average=True, op=hvd.Sum)
    # fp16 on the wire, float32 back
    f = (base + 10 * r).float()
    got = hvd.allreduce(f, compression=hvd.Compression.fp16)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected[hvd.Average].float(), rtol=1e-3)
    # gradient of a sum-allreduce: the sum-allreduce of the gradient
    w = x.clone().requires_grad_()
    (hvd.allreduce(w, op=hvd.Sum) * (r + 1)).sum().backward()
    assert torch.allclose(w.grad, torch.full_like(w, n * (n + 1) / 2))
    # grouped
    a, b = x.clone(), torch.full((4,), float(r))
    ga, gb = hvd.grouped_allreduce([a, b], op=hvd.Sum)
    assert torch.allclose(ga, expected[hvd.Sum])
    assert torch.equal(gb, torch.full((4,), n * (n - 1) / 2))
    assert torch.equal(a, x)
    out = hvd.grouped_allreduce_([a, b], op=hvd.Max)
    assert out[0] is a and torch.equal(a, expected[hvd.Max])
    assert torch.equal(b, torch.full((4,), float(n - 1)))
    handle = hvd.grouped_allreduce_async([x, x], postscale_factor=2.0)
    while not hvd.poll(handle):
        pass
    assert all(torch.allclose(t, 2 * expected[hvd.Average]) for t in hvd.synchronize(handle))
    a, b = x.clone(), x.clone()
    got = hvd.synchronize(hvd.grouped_allreduce_async_([a, b], op=hvd.Min))
    assert got[0] is a and got[1] is b
    # sparse: rank r holds row r (of 5) = r + 1; Horovod's handle is a callable
    dense = torch.zeros(5, 2)
    dense[r] = r + 1.0
    got = hvd.sparse_allreduce_async(dense.to_sparse(), op=hvd.Sum)()
    assert got.is_sparse and torch.equal(got.to_dense(), hvd.allreduce(dense, op=hvd.Sum))
    got = hvd.sparse_allreduce_async(dense.to_sparse(), op=hvd.Average)().to_dense()
    assert torch.allclose(got, hvd.allreduce(dense))
    assert torch.equal(a, expected[hvd.Min]) and torch.equal(b, expected[hvd.Min])


def check_adasum(n: int, r: int) -> None:
    """Adasum (n is a power of two here): orthogonal gradients add, equal ones stay, and in
    general the binary tree of Horovod's pairwise rule, written out here."""
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(hvd.allreduce(3 * eye[r], op=hvd.Adasum), 3 * eye.sum(0))
    same = torch.tensor([1.0, -2.0, 0.5])
    assert torch.allclose(hvd.allreduce(same, op=hvd.Adasum), same)

    def rule(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.dot(a, b)
        return (1 - d / (2 * torch.dot(a, a))) * a + (1 - d / (2 * torch.dot(b, b))) * b

    grads = [torch.tensor([1.0 + k, 2.0 - k * k, 0.5 * k], dtype=torch.float64)
             for k in range(n)]
    level = grads
    while len(level) > 1:
        level = [rule(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    got = hvd.allreduce(grads[r], op=hvd.Adasum, postscale_factor=2.0)
    assert torch.allclose(got, 2 * level[0], rtol=1e-12), (got, level[0])
    y = grads[r].clone()
    assert torch.allclose(hvd.synchronize(hvd.allreduce_async_(y, op=hvd.Adasum)), level[0])
    expect_error(ValueError, "floating-point tensor", hvd.allreduce, torch.tensor([r]),
                 op=hvd.Adasum)
    ps = hvd.add_process_set(list(range(n - 1))) if n > 2 else None  # 3 ranks of 4
    if ps is not None and ps.included():
        expect_error(ValueError, "power-of-two", hvd.allreduce, same, op=hvd.Adasum,
                     process_set=ps)
    if ps is not None:
        hvd.remove_process_set(ps)


def check_allgather(n: int, r: int) -> None:
    t = torch.full((r + 1, 2), float(r))  # uneven first dimension
    want = torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)])
    assert torch.equal(hvd.allgather(t), want)
    assert torch.equal(hvd.synchronize(hvd.allgather_async(t.long())), want.long())
    a, b = hvd.grouped_allgather([t, t[:, :1]])
    assert torch.equal(a, want) and torch.equal(b, want[:, :1])
    # gradient: this rank's rows of the ranks' averaged gradient
    w = t.clone().requires_grad_()
    weights = torch.arange(float(want.numel())).view_as(want)
    (hvd.allgather(w) * weights * (r + 1)).sum().backward()
    offset = r * (r + 1) // 2
    assert torch.allclose(w.grad, (n + 1) / 2 * weights[offset:offset + r + 1])
    if n > 1:
        expect_error(RuntimeError, "differ in shapes", hvd.allgather,
                     torch.zeros(1, 2 + r))
    expect_error(ValueError, "0-dimensional", hvd.allgather, torch.tensor(1.0))


def check_broadcast(n: int, r: int) -> None:
    root = n - 1
    t = torch.full((3,), float(r))
    assert torch.equal(hvd.broadcast(t, root), torch.full((3,), float(root)))
    assert torch.equal(t, torch.full((3,), float(r)))
    assert hvd.broadcast_(t, root) is t and torch.equal(t, torch.full((3,), float(root)))
    u = torch.full((2,), float(r))
    assert torch.equal(hvd.synchronize(hvd.broadcast_async_(u, 0)), torch.zeros(2))
    v = torch.full((2,), float(r))
    assert torch.equal(hvd.synchronize(hvd.broadcast_async(v, root)), torch.full((2,), float(root)))
    assert torch.equal(v, torch.full((2,), float(r)))  # not in place
    w = torch.full((3,), float(r), requires_grad=True)
    (hvd.broadcast(w, root) * (r + 1)).sum().backward()  # averaged gradient on the root only
    assert torch.allclose(w.grad, torch.full((3,), (n + 1) / 2 if r == root else 0.0))
    assert hvd.broadcast_object({"rank": r, "list": [r]}, root_rank=root) == {
        "rank": root, "list": [root]}
    assert hvd.allgather_object(("r", r)) == [("r", k) for k in range(n)]
    expect_error(ValueError, "is not in", hvd.broadcast, t, n)
    hvd.barrier()


def check_alltoall(n: int, r: int) -> None:
    # rank r sends j + 1 rows of value 100 r + j to rank j
    t = torch.cat([torch.full((j + 1, 2), 100.0 * r + j) for j in range(n)])
    out, received = hvd.alltoall(t, splits=[j + 1 for j in range(n)])
    assert torch.equal(out, torch.cat([torch.full((r + 1, 2), 100.0 * i + r) for i in range(n)]))
    assert received.dtype == torch.int32 and received.tolist() == [r + 1] * n
    # no splits: equal blocks, the result alone
    t = torch.cat([torch.full((2, 3), 100.0 * r + j) for j in range(n)])
    out = hvd.alltoall(t)
    assert torch.equal(out, torch.cat([torch.full((2, 3), 100.0 * i + r) for i in range(n)]))
    assert torch.equal(hvd.synchronize(hvd.alltoall_async(t)), out)
    # gradient: each received row's gradient goes back to the rank and row it came from
    w = t.clone().requires_grad_()
    (hvd.alltoall(w) * (r + 1)).sum().backward()
    assert torch.equal(w.grad, torch.cat([torch.full((2, 3), j + 1.0) for j in range(n)]))
    if n > 1:
        expect_error(ValueError, "does not divide", hvd.alltoall, torch.zeros(n + 1, 1))
    expect_error(ValueError, "non-negative row counts", hvd.alltoall, torch.zeros(2, 1), [3] * n)


def check_reducescatter(n: int, r: int) -> None:
    rows = 2 * n + 1
    base = torch.arange(rows * 3, dtype=torch.float64).view(rows, 3)
    x = base + r
    total = n * base + n * (n - 1) / 2
    start = 0 if r == 0 else 3 + 2 * (r - 1)  # rank 0 gets the extra row
    mine = total[start:start + (3 if r == 0 else 2)]
    assert torch.allclose(hvd.reducescatter(x, op=hvd.Sum), mine)
    assert torch.allclose(hvd.reducescatter(x), mine / n)  # default Average
    got = hvd.reducescatter(x, op=hvd.Sum, prescale_factor=0.5, postscale_factor=4.0)
    assert torch.allclose(got, 2 * mine)
    assert torch.allclose(hvd.synchronize(hvd.reducescatter_async(x, op=hvd.Sum)), mine)
    for call in (hvd.reducescatter, hvd.reducescatter_async):  # Horovod refuses Adasum here
        expect_error(RuntimeError, "Adasum is not supported", call, x, op=hvd.Adasum)
    a, b = hvd.grouped_reducescatter([x, x], op=hvd.Sum)
    assert torch.allclose(a, mine) and torch.allclose(b, mine)
    # Horovod's gradient: the allgather of the blocks' gradients, times the size for Sum
    w = x.clone().requires_grad_()
    (hvd.reducescatter(w, op=hvd.Sum, postscale_factor=2.0) * (r + 1)).sum().backward()
    owner = torch.tensor([k for k in range(n) for _ in range(3 if k == 0 else 2)][:rows])
    want = (2.0 * n * (owner + 1).double()).view(-1, 1).expand(rows, 3)
    assert torch.allclose(w.grad, want)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return (torch.randn(G, 5, generator=g, dtype=torch.float64),
            torch.randn(G, 3, generator=g, dtype=torch.float64))


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def same_everywhere(model: nn.Module) -> None:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert all(torch.equal(flat, other) for other in hvd.allgather_object(flat))


def check_training_sgd(n: int, r: int) -> None:
    """pytorch_mnist's pattern, with Horovod's start-up step (weight decay moves the
    parameters in it), synchronize + clip + skip_synchronize on odd steps, predivide."""
    steps, lr, clip = 4, 0.1, 0.05
    model = net(1 + r)  # the ranks start apart; broadcast_parameters fixes that
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         gradient_predivide_factor=2.0)
    ref = net(1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
    for p in ref.parameters():  # Horovod's start-up step, by hand
        p.grad = torch.zeros_like(p)
    ref_opt.step()
    lo, hi = r * G // n, (r + 1) * G // n
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad()
        loss_of(model, x[lo:hi], y[lo:hi]).backward()
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        if step % 2:
            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            with optimizer.skip_synchronize():
                optimizer.step()
        else:
            optimizer.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-10, rtol=0), (name, (p - q).abs().max())
    same_everywhere(model)


def check_training_adam(n: int, r: int) -> None:
    """No names, two micro-batches per step set after construction, no start-up step."""
    steps = 3
    model = net(7 + r)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01 * (r + 1))
    hvd.broadcast_parameters(model.named_parameters(), root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer)
    optimizer.set_backward_passes_per_step(2)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0, horovod_start=False)
    assert optimizer.param_groups[0]["lr"] == 0.01  # the root's hyperparameters
    ref = net(7)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    per = G // n
    for step in range(steps):
        x, y = batch(10 + step)
        optimizer.zero_grad()
        for half in range(2):
            lo = r * per + half * per // 2
            (loss_of(model, x[lo:lo + per // 2], y[lo:lo + per // 2]) / 2).backward()
        optimizer.step()
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-10, rtol=0), (p - q).abs().max()
    same_everywhere(model)


def check_optimizer_misc(n: int, r: int) -> None:
    model = net(3)
    x, y = batch(0)
    lo, hi = r * G // n, (r + 1) * G // n
    # Sum and fp16 compression: the summed local gradients, float32 back
    fmodel = net(3).float()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(fmodel.parameters(), lr=0.1),
                                   named_parameters=fmodel.named_parameters(),
                                   compression=hvd.Compression.fp16, op=hvd.Sum)
    assert {p: n for n, p in fmodel.named_parameters()} == opt._parameter_names
    loss_of(fmodel, x[lo:hi].float(), y[lo:hi].float()).backward()
    opt.synchronize()
    ref = net(3)
    for k in range(n):
        a, b = k * G // n, (k + 1) * G // n
        loss_of(ref, x[a:b], y[a:b]).backward()  # accumulates the sum of the ranks' gradients
    for p, q in zip(fmodel.parameters(), ref.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        assert torch.allclose(p.grad.double(), q.grad, rtol=2e-3, atol=2e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("skip_synchronize" in str(w.message) for w in caught)
    # step() inside skip_synchronize() before synchronize() is refused
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss_of(model, x[lo:hi], y[lo:hi]).backward()
    with opt.skip_synchronize():
        expect_error(RuntimeError, "before synchronize()", opt.step)
    opt.step()
    expect_error(ValueError, "Adasum", hvd.DistributedOptimizer,
                 torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)
    expect_error(ValueError, "names must be unique", hvd.DistributedOptimizer,
                 torch.optim.SGD(model.parameters(), lr=0.1),
                 named_parameters=[("w", p) for p in model.parameters()])


def check_process_sets(n: int, r: int) -> None:
    """Even and odd global ranks as two sets: operations run within a set, root ranks stay
    global, a rank outside a set is refused."""
    even = hvd.add_process_set(range(0, n, 2))
    odd = hvd.add_process_set(hvd.ProcessSet(range(1, n, 2))) if n > 1 else None
    mine, other = (even, odd) if r % 2 == 0 else (odd, even)
    members = mine.ranks
    assert mine.included() and mine.size() == len(members) and mine.rank() == members.index(r)
    x = torch.tensor([float(r)])
    assert torch.equal(hvd.allreduce(x, op=hvd.Sum, process_set=mine),
                       torch.tensor([float(sum(members))]))
    assert torch.equal(hvd.broadcast(x, members[-1], process_set=mine),
                       torch.tensor([float(members[-1])]))
    got = hvd.allgather(torch.full((r + 1,), float(r)), process_set=mine)
    assert torch.equal(got, torch.cat([torch.full((k + 1,), float(k)) for k in members]))
    model = net(20 + r)
    hvd.broadcast_parameters(model.state_dict(), root_rank=members[-1], process_set=mine)
    root_model = net(20 + members[-1])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), root_model.parameters(),
                                                 strict=True))
    if other is not None:
        assert not other.included()
        # an optimizer over the other set: this rank is outside it and steps alone
        w = torch.ones(2, requires_grad=True)
        opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=1.0), process_set=other)
        (w * (r + 1.0)).sum().backward()
        opt.synchronize()
        with opt.skip_synchronize():
            opt.step()
        assert torch.equal(w.detach(), torch.full((2,), -float(r)))
        expect_error(ValueError, "does not include this rank", hvd.allreduce, x,
                     process_set=other)
    expect_error(ValueError, "is not in", hvd.broadcast, x, (r + 1) % n if n > 1 else 1,
                 process_set=mine)
    assert not hvd.remove_process_set(hvd.global_process_set)
    assert hvd.remove_process_set(even)
    expect_error(ValueError, "was not added", hvd.allreduce, x, process_set=hvd.ProcessSet([r]))
    if odd is not None:
        assert hvd.remove_process_set(odd)


def check_sync_batch_norm(n: int, r: int) -> None:
    """Output, input and parameter gradients and running statistics of one process's
    BatchNorm1d on the concatenated batch; two training steps, then eval."""
    g = torch.Generator().manual_seed(5)
    ref = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    sbn = hvd.SyncBatchNorm(3).double()
    sbn.load_state_dict(ref.state_dict())
    lo, hi = r * G // n, (r + 1) * G // n
    for _ in range(2):
        x = torch.randn(G, 3, 4, generator=g, dtype=torch.float64) * 3 + 5
        w = torch.randn(G, 3, 4, generator=g, dtype=torch.float64)
        ref.zero_grad()
        sbn.zero_grad()
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        (yr * w).sum().backward()
        xs = x[lo:hi].clone().requires_grad_()
        ys = sbn(xs)
        assert torch.allclose(ys, yr[lo:hi], atol=1e-10)
        (ys * w[lo:hi]).sum().backward()
        assert torch.allclose(xs.grad, xr.grad[lo:hi], atol=1e-10)
        for p, q in ((sbn.weight, ref.weight), (sbn.bias, ref.bias)):
            assert torch.allclose(hvd.allreduce(p.grad, op=hvd.Sum), q.grad, atol=1e-10)
    assert torch.allclose(sbn.running_mean, ref.running_mean, atol=1e-12)
    assert torch.allclose(sbn.running_var, ref.running_var, atol=1e-12)
    sbn.eval()
    ref.eval()
    assert torch.allclose(sbn(x[lo:hi]), ref(x)[lo:hi], atol=1e-12)


def check_names_and_order(n: int, r: int) -> None:
    """Horovod's names: a second pending operation of one name is refused on the submitting
    rank (ValueError, no communication); ranks may submit asynchronous operations around a
    blocking one or in different orders; operations that differ still fail on every rank."""
    x = torch.full((3,), float(r))
    total = torch.full((3,), float(sum(range(n))))
    h = hvd.allreduce_async(x, name="dup", op=hvd.Sum)
    expect_error(ValueError, "still pending", hvd.allreduce_async, x, name="dup")
    expect_error(ValueError, "still pending", hvd.allgather_async, x, name="dup")
    assert torch.equal(hvd.synchronize(h), total)
    assert hvd.synchronize(hvd.allgather_async(x, name="dup")).shape == (3 * n,)  # free again
    if n == 1:
        return
    # Horovod's own test pattern: rank 0 submits before a barrier, the others after it
    if r == 0:
        h = hvd.allgather_async(x, name="late")
        assert not hvd.poll(h)  # waits, unposted, for the other ranks
        expect_error(ValueError, "still pending", hvd.allgather_async, x, name="late")
    hvd.barrier()
    if r > 0:
        h = hvd.allgather_async(x, name="late")
    assert torch.equal(hvd.synchronize(h), torch.arange(n).double().repeat_interleave(3))
    # opposite submission orders on even and odd ranks, synchronized in one order
    rows = torch.full((n, 2), float(r))
    submit = [lambda: hvd.reducescatter_async(rows, name="rs", op=hvd.Sum),
              lambda: hvd.broadcast_async(x, root_rank=n - 1, name="bc")]
    hs, hb = (submit[0](), submit[1]()) if r % 2 else reversed([submit[1](), submit[0]()])
    assert torch.equal(hvd.synchronize(hs), torch.full((1, 2), float(sum(range(n)))))
    assert torch.equal(hvd.synchronize(hb), torch.full((3,), float(n - 1)))
    # asynchronous operations that differ between ranks raise on every rank when synchronized
    h = hvd.allreduce_async(torch.zeros(r + 1), name="shape")
    expect_error(hvd.HorovodInternalError, "differ in shapes", hvd.synchronize, h)


@mpi_test(ranks=[1, 2, 4], timeout=180)
def test_horovod_face(comm) -> None:
    expect_error(ValueError, "hvd.init()", hvd.size)
    hvd.init()
    n, r = comm.size, comm.rank
    for check in (check_basics, check_allreduce, check_allgather, check_broadcast,
                  check_alltoall, check_reducescatter, check_training_sgd, check_training_adam,
                  check_optimizer_misc, check_process_sets, check_sync_batch_norm,
                  check_names_and_order):
        check(n, r)
    hvd.shutdown()
    assert not hvd.is_initialized()
    expect_error(ValueError, "hvd.init()", hvd.rank)
