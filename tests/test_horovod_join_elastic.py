"""hpcml.horovod's join(), elastic state and launcher.

join at 1, 2 and 4 ranks: ranks leave one by one (in a permuted order) and after each departure
the remaining ranks' allreduces (every op, float and int, async, grouped) and
DistributedOptimizer steps equal the closed form over the ranks still working (a joined rank
contributes zeros to Sum/Average, which still divide by the whole size, and the identity to
Min/Max/Product); other collectives raise on every working rank; join() returns the last rank
to join, the same on every rank. Ranks whose allreduces differ in dtype or shape, or that call
different collectives, raise on every rank.

elastic: a 2-rank job trains, commits, changes its state without committing and is killed;
restarted at 1 and at 4 ranks the state (parameters, optimizer state, attributes) equals the
committed one; restore() undoes uncommitted changes; a SIGUSR1 on one rank makes commit() raise
Preempted (exit 75) on every rank after writing.

horovodrun: argument checks (one line, exit 2) and a 2-rank launch of examples/horovod_train.py.
"""

import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hpcml.horovod as hvd
from hpcml.errors import UsageError
from hpcml.horovodrun import command
from hpcml.testing import expect_error, launch, mpi_test

HERE = Path(__file__).resolve()
EXAMPLE = str(HERE.parents[1] / "examples" / "horovod_train.py")


def check_working(n: int, r: int, working: list[int], opt, w) -> None:
    """The collectives of the ranks in ``working`` while the others are inside join()."""
    values = [k + 1.0 for k in working]
    x = torch.full((2, 3), r + 1.0, dtype=torch.float64)
    want = {hvd.Sum: sum(values), hvd.Average: sum(values) / n, hvd.Min: min(values),
            hvd.Max: max(values), hvd.Product: math.prod(values)}
    for op, value in want.items():
        assert torch.allclose(hvd.allreduce(x, op=op), torch.full_like(x, value)), (op, working)
    i = torch.tensor([r + 1, -(r + 1)], dtype=torch.int32)
    got = hvd.allreduce(i, op=hvd.Average)  # integer average truncates toward zero
    s = int(sum(values))
    assert got.tolist() == [int(s / n), -int(s / n)], got
    assert hvd.allreduce(i, op=hvd.Min).tolist() == [min(values), -max(values)]
    y = x.clone()
    assert hvd.synchronize(hvd.allreduce_async_(y, op=hvd.Sum)) is y
    assert torch.equal(y, torch.full_like(x, sum(values)))
    a, b = hvd.grouped_allreduce([x, x.float()], op=hvd.Max)
    assert torch.equal(a, torch.full_like(x, max(values))) and b.dtype == torch.float32
    # DistributedOptimizer: the gradient averaged over the whole size, zeros from joined ranks
    opt.zero_grad()
    (w * (r + 1.0)).sum().backward()
    opt.synchronize()
    assert torch.allclose(w.grad, torch.full_like(w, sum(values) / n))
    with opt.skip_synchronize():
        opt.step()
    before = w.detach().clone()
    opt.zero_grad()
    (w * (r + 1.0)).sum().backward()
    opt.step()  # lr 1
    assert torch.allclose(w.detach(), before - sum(values) / n)
    if len(working) < n:
        for call, args in ((hvd.allgather, (x,)), (hvd.broadcast, (x, working[0])),
                           (hvd.barrier, ()), (hvd.allgather_object, (r,))):
            expect_error(RuntimeError, "after a rank called join()", call, *args)


@mpi_test(ranks=[1, 2, 4], timeout=180)
def test_join(comm) -> None:
    hvd.init()
    n, r = comm.size, comm.rank
    order = [(3 * k + 1) % n for k in range(n)] if n != 2 else [1, 0]  # a permutation
    assert sorted(order) == list(range(n))
    if n > 1:  # the header catches ranks that disagree, on every rank (MPI would not)
        expect_error(RuntimeError, "differ in dtypes", hvd.allreduce,
                     torch.zeros(3, dtype=torch.float64 if r else torch.float32))
        expect_error(RuntimeError, "differ in shapes", hvd.allreduce, torch.zeros(3 + r))
        expect_error(RuntimeError, "differ in shapes", hvd.allreduce, torch.zeros(1, 2) if r
                     else torch.zeros(2, 1))
        expect_error(RuntimeError, "differ in ops or root ranks", hvd.broadcast, torch.zeros(2),
                     r % 2)
        expect_error(RuntimeError, "differ in shapes", hvd.broadcast_, torch.zeros(2 + r), 0)
        a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
        sum(t.sum() * (r + 1) for t in hvd.grouped_allreduce([a, b], op=hvd.Sum)).backward()
        assert torch.equal(a.grad, torch.full((2,), n * (n + 1) / 2))  # differentiable
        expect_error(RuntimeError, "differ in operations",
                     *((hvd.barrier,) if r else (hvd.allreduce, torch.zeros(1))))
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=1.0), named_parameters=[("w", w)])
    for departed in range(n):
        working = sorted(order[departed:])
        check_working(n, r, working, opt, w)
        if r == order[departed]:
            break
    last = hvd.join()
    assert last == order[-1], (last, order)
    assert hvd.allgather_object(last) == [last] * n  # usable again after everyone joined
    assert torch.equal(hvd.allreduce(torch.ones(1), op=hvd.Sum), torch.full((1,), float(n)))
    hvd.shutdown()


# -- elastic ------------------------------------------------------------------------------------
def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2).double()
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def _flat(state) -> dict:
    return {"params": [p.detach().clone() for p in state.model.parameters()],
            "exp_avg": [state.optimizer.state[p]["exp_avg"].clone()
                        for p in state.model.parameters()],
            "epoch": state.epoch, "batch": state.batch}


def _equal(a: dict, b: dict) -> bool:
    return (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) and all(
        torch.equal(x, y) for key in ("params", "exp_avg") for x, y in zip(a[key], b[key],
                                                                            strict=True))


def _elastic_state(seed: int):
    """``hvd.init()``, then a model, its DistributedOptimizer and their TorchState."""
    hvd.init()
    model, opt = _model(seed)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    return model, opt, hvd.elastic.TorchState(model, opt, epoch=0, batch=0)


def elastic_first(comm) -> None:
    """2 ranks: train, commit at batch 3, change more, check restore(), change again, die."""
    model, opt, state = _elastic_state(1 + comm.rank)

    @hvd.elastic.run
    def train(state) -> None:
        g = torch.Generator().manual_seed(comm.rank)
        for batch in range(6):
            opt.zero_grad()
            (model(torch.randn(4, 3, generator=g, dtype=torch.float64)) ** 2).sum().backward()
            opt.step()
            state.batch, state.epoch = batch + 1, 2
            if batch == 2:
                state.commit()
                committed = _flat(state)
                if comm.rank == 0:
                    torch.save(committed, os.environ["EXPECTED"])
            if batch == 4:
                assert not _equal(_flat(state), committed)
                state.restore()
                assert _equal(_flat(state), committed)
        hvd.barrier()
        os._exit(9)  # killed after uncommitted steps

    train(state)


def elastic_again(comm) -> None:
    """Restarted at another size: the committed state on every rank, then a preemption."""
    model, opt, state = _elastic_state(50 + comm.rank)

    @hvd.elastic.run
    def resume(state) -> None:
        expected = torch.load(os.environ["EXPECTED"], weights_only=True)
        assert _equal(_flat(state), expected)
        assert state.commits == 1
        if comm.rank == comm.size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        try:
            state.commit()
        except hvd.elastic.Preempted as exc:
            assert exc.code == hvd.elastic.PREEMPTED_EXIT
        else:
            raise AssertionError("commit() after SIGUSR1 did not raise Preempted")
        assert state.commits == 2

    resume(state)
    hvd.shutdown()


def test_elastic_restart_at_other_sizes(tmp_path) -> None:
    env = {"HPCML_ELASTIC_DIR": str(tmp_path / "state"), "EXPECTED": str(tmp_path / "e.pt")}
    first = launch(2, [sys.executable, "-m", "hpcml.testing", str(HERE), "elastic_first"],
                   env=env, timeout=120)
    assert first.returncode != 0 and (tmp_path / "e.pt").exists(), first.stderr[-3000:]
    for ranks in (1, 4):  # each restart from a copy of what the killed job left
        shutil.copytree(tmp_path / "state", tmp_path / f"state{ranks}")
        env["HPCML_ELASTIC_DIR"] = str(tmp_path / f"state{ranks}")
        done = launch(ranks, [sys.executable, "-m", "hpcml.testing", str(HERE), "elastic_again"],
                      env=env, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        pointer = tmp_path / f"state{ranks}" / "checkpoint" / "latest"
        assert pointer.read_text().strip() == "step-000000002"  # the preempted commit


# -- horovodrun ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "text"), [
    ((0, None, ["python"]), "-np: 0"),
    ((2, None, []), "COMMAND: nothing to run"),
    ((4, "a:2,b", ["python"]), "offers 3 slots for -np 4"),
    ((1, "a:0", ["python"]), "has no slots"),
    ((1, "a b", ["python"]), "is not HOST or HOST:SLOTS"),
])
def test_horovodrun_refuses(args, text) -> None:
    with pytest.raises(UsageError, match=text):
        command(*args)


def test_horovodrun_command_line() -> None:
    cmd = command(3, "n1:2,n2", ["python", "t.py", "-np", "9"])
    assert cmd[1:] == ["-n", "3", "-hosts", "n1:2,n2:1", "python", "t.py", "-np", "9"]
    bad = subprocess.run([sys.executable, "-m", "hpcml", "horovodrun", "-np", "x", "python"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "-np" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "hpcml", "horovodrun", "-np", "2"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_horovodrun_runs_the_example() -> None:
    """examples/horovod_train.py through hpcml horovodrun at 2 ranks: its own check (the
    parameters equal one process's on the concatenated batch) passes."""
    res = subprocess.run([sys.executable, "-m", "hpcml", "horovodrun", "-np", "2", "-H",
                          "localhost:2", sys.executable, EXAMPLE, "--check"],
                         capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ranks 2" in res.stdout and "matches one process" in res.stdout


FAKE_HOROVOD_TESTS = '''
import unittest

import horovod.torch as hvd
from common import mpi_env_rank_and_size, skip_or_fail_gpu_test, temppath


class T(unittest.TestCase):
    def test_rank(self):
        hvd.init()
        assert (hvd.rank(), hvd.size()) == mpi_env_rank_and_size()
        with temppath() as path:
            open(path, "w").close()

    def test_gpu(self):
        skip_or_fail_gpu_test(self, "No GPUs available")

    def test_fails_on_rank_1(self):
        hvd.init()
        assert hvd.rank() != 1
'''


def test_horovod_test_alias(tmp_path) -> None:
    """examples/horovod_test_alias.py at 2 ranks on a Horovod-style test file: the alias and
    the stand-in helpers work, and outcomes merge over the ranks (a failure on rank 1 only is a
    failure)."""
    fake = tmp_path / "test_fake.py"
    fake.write_text(FAKE_HOROVOD_TESTS)
    script = str(Path(EXAMPLE).with_name("horovod_test_alias.py"))
    res = subprocess.run([sys.executable, "-m", "hpcml", "horovodrun", "-np", "2",
                          sys.executable, script, str(fake)], capture_output=True, text=True,
                         check=False, timeout=120, cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    for line in ("pass  test_rank", "n.a.  test_gpu", "fail  test_fails_on_rank_1",
                 "2 ranks: 1 pass, 1 fail, 1 n.a.; 1 of 2 applicable pass (50.0 %)"):
        assert line in res.stdout, res.stdout[-3000:]
    spec = importlib.util.spec_from_file_location("horovod_test_alias", script)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    assert harness.main([str(tmp_path / "missing.py")]) == 2  # before any MPI or pytest run
