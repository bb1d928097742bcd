"""The collective watchdog (hpcml.comm.watchdog): a rank frozen with a real SIGSTOP ends a
synchronous job (transformer NMT at 2 ranks, Qsparse sync at 4, a DistributedOptimizer loop at
2) and the workers of a frozen coded master (5 ranks) or async Qsparse server (4 ranks) within
timeout + 5 s (the issue's bound, the only timed assertion), with at most one line per live
rank naming the call, the step and the frozen rank, exit code 4. A rank slower than the
timeout allows but alive is named as such; a rank slow (or briefly stopped) for less than the
timeout ends nothing; the environment variable wins over the job key.
"""

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import fault_fixture as ff
import pytest

from hpcml.comm import watchdog
from hpcml.comm.ledger import Ledger
from hpcml.comm.watch import Watch
from hpcml.config import load_job_file
from hpcml.errors import UsageError
from hpcml.jobs import job_kind
from hpcml.testing import hpcml_cli, launch

ROOT = Path(__file__).resolve().parents[1]
# seconds: the watchdog timeout of the fault tests: of a plain script (the ranks start their
# loop together) and of hpcml jobs, long enough that the ranks' different set-up times on the
# shared 2 cores (seconds, under load) never look like a hang
TIMEOUT, JOB_TIMEOUT = 5, 8
# the async server waits in its first Bcast while each worker builds its torch optimizer, whose
# first construction imports torch._dynamo (~8 s of one core's share under load, measured)
ASYNC_TIMEOUT = 15
LINE = re.compile(r"^hpcml: watchdog: rank (\d+) blocked (\d+) s in (.+?) "
                  r"(at step (\d+)|after (\d+) DistributedOptimizer steps|before any step); "
                  r"(.+); aborting the job \(exit code 4\)$", re.M)


# -- pure -------------------------------------------------------------------------------------
def test_the_environment_variable_wins_over_the_job_key(monkeypatch):
    monkeypatch.delenv(watchdog.ENV, raising=False)
    assert watchdog.effective_timeout(42.0) == 42.0
    monkeypatch.setenv(watchdog.ENV, "7.5")
    assert watchdog.effective_timeout(42.0) == 7.5
    monkeypatch.setenv(watchdog.ENV, "0")
    assert watchdog.effective_timeout(42.0) == 0.0  # 0: off
    monkeypatch.setenv(watchdog.ENV, " ")
    assert watchdog.effective_timeout(42.0) == 42.0  # empty: unset


@pytest.mark.parametrize("raw", ["ten", "-1", "nan", "inf", "1e400"])
def test_a_bad_environment_value_is_a_usage_error(monkeypatch, raw):
    monkeypatch.setenv(watchdog.ENV, raw)
    with pytest.raises(UsageError, match=f"^{watchdog.ENV}: must be a number of seconds >= 0"):
        watchdog.effective_timeout(600.0)


def test_hpcml_run_refuses_a_bad_environment_value_in_one_line(tmp_path):
    res = hpcml_cli(1, "run", str(ROOT / "jobs" / "bench-collectives.toml"), "--set",
                    f"runs_dir={tmp_path}/runs", env={watchdog.ENV: "ten"}, timeout=120)
    assert res.returncode == 2
    assert res.stderr == (f"hpcml: error: {watchdog.ENV}: must be a number of seconds >= 0, got "
                          "'ten' (0 turns the watchdog off; unset it to use the job's "
                          "watchdog_timeout)\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["transformer-nmt", "qsparse", "coded", "bench-collectives"])
def test_every_kind_validates_the_common_key(kind):
    schema = job_kind(kind).config
    assert load_job_file(schema, {"kind": kind}, "f.toml", 1).watchdog_timeout == 600.0
    assert load_job_file(schema, {"kind": kind, "watchdog_timeout": 5}, "f.toml",
                         1).watchdog_timeout == 5.0
    for bad in (-1, "soon", float("inf")):
        with pytest.raises(UsageError, match="^f.toml: watchdog_timeout: must be"):
            load_job_file(schema, {"kind": kind, "watchdog_timeout": bad}, "f.toml", 1)


def test_the_line_names_the_call_the_step_and_the_silent_or_absent_ranks():
    ledger = Ledger()
    entry = ledger.entry("data.Allreduce")
    watch = Watch()
    watch.what, watch.since = entry, time.perf_counter() - 12.4
    assert watchdog.describe(entry, ledger) == "data.Allreduce"
    assert watchdog.step_text(watch) == "before any step"
    watch.optimizer_steps = 3
    assert watchdog.step_text(watch) == "after 3 DistributedOptimizer steps"
    watch.step = 17
    mine = watchdog.state_of(watch, ledger)
    assert (mine[0], round(mine[1]), mine[2:]) == ("data.Allreduce", 12, ("at step 17", ""))
    silent = watchdog.line(0, mine, [3], {1: mine, 2: mine})
    assert silent == ("hpcml: watchdog: rank 0 blocked 12 s in data.Allreduce at step 17; rank 3 "
                      "stopped answering (no heartbeat within 2 s); aborting the job (exit code "
                      "4)")
    assert "ranks [1, 2] stopped answering" in watchdog.line(0, mine, [1, 2], {})
    watch.what, watch.step = None, 16
    main, states = threading.get_ident(), []
    asker = threading.Thread(target=lambda: states.append(watchdog.state_of(watch, ledger, main)))
    asker.start()
    asker.join()  # the main thread's innermost frame is now in threading.py
    (idle,) = states
    assert idle[:3] == (None, 0.0, "at step 16") and re.fullmatch(r"threading\.py:\d+ in \w+",
                                                                    idle[3])
    elsewhere = watchdog.line(0, mine, [], {1: mine, 2: idle})
    assert (f"every rank answers the heartbeat; rank 2 not blocked in communication, at step 16 "
            f"({idle[3]});" in elsewhere)
    assert "is blocked in the same call" in watchdog.line(0, mine, [], {1: mine})
    assert "unknown (the heartbeat needs MPI_THREAD_MULTIPLE)" in watchdog.line(0, mine, [],
                                                                                   None)
    many = watchdog.line(0, mine, [], {r: idle for r in range(1, 8)})
    assert "rank 4 not blocked" in many and "rank 5" not in many and "and 3 more" in many
    for line in (silent, elsewhere, many):
        assert LINE.fullmatch(line) and "\n" not in line


# -- MPI: a loop of plain calls and a DistributedOptimizer loop (2 ranks) ---------------------
def slow_but_alive(comm):
    """Rank 1 sleeps 1.5 s and is frozen (SIGSTOP, resumed by a helper) for 1.5 s, each less
    than the 3 s timeout: nothing fires and the sums are exact."""
    import numpy as np

    from hpcml.comm.stragglers import freeze_process

    total = np.zeros(1)
    for step in range(6):
        comm.straggle(step)
        if comm.rank == 1 and step in (2, 4):
            (time.sleep if step == 2 else freeze_process)(1.5)
        buf = np.array([float(step + comm.rank)])
        comm.Allreduce(buf)
        total += buf
    assert total[0] == sum(2 * s + 1 for s in range(6))


def alive_elsewhere(comm):
    """Rank 1 computes (sleeps) for 60 s, far longer than the 2 s timeout, while rank 0 waits
    in a barrier."""
    comm.straggle(3)
    if comm.rank == 1:
        time.sleep(60)
    comm.barrier()


def optimizer_loop(comm):
    """A DistributedOptimizer loop (no step declared); rank 1 stops itself for good with
    SIGSTOP in its fourth step, after writing the time to stopped-at.txt."""
    import torch

    from hpcml.parallel import DistributedOptimizer, broadcast_parameters

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, comm=comm)
    broadcast_parameters(model)
    for step in range(100):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        if comm.rank == 1 and step == 3:
            Path("stopped-at.txt").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        opt.step()


def run_body(name, tmp_path, timeout):
    return launch(2, [sys.executable, "-m", "hpcml.testing", __file__, name], cwd=tmp_path,
                  env={watchdog.ENV: str(timeout)}, timeout=120)


def test_a_rank_slow_or_stopped_for_less_than_the_timeout_ends_nothing(tmp_path):
    res = run_body("slow_but_alive", tmp_path, 3)
    assert res.returncode == 0, res.stderr
    assert "watchdog" not in res.stdout + res.stderr


def test_a_rank_alive_but_elsewhere_is_named_as_such(tmp_path):
    start = time.monotonic()
    res = run_body("alive_elsewhere", tmp_path, 2)
    assert res.returncode == 4, res.stderr
    assert time.monotonic() - start < 60, "the job waited for the sleeping rank"
    (line,) = LINE.findall(res.stderr)
    assert (line[0], line[2], line[4]) == ("0", "Barrier", "3") and int(line[1]) >= 2
    sleeping = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1)
                    if text.strip() == "time.sleep(60)")
    assert line[6] == ("every rank answers the heartbeat; rank 1 not blocked in communication, "
                       f"at step 3 (test_watchdog.py:{sleeping} in alive_elsewhere)")


def test_a_frozen_rank_ends_a_distributed_optimizer_loop(tmp_path):
    res = run_body("optimizer_loop", tmp_path, TIMEOUT)
    ended = time.time()
    assert res.returncode == 4, res.stderr
    (line,) = LINE.findall(res.stderr)
    assert (line[0], line[2], line[5]) == ("0", "Iallreduce", "3")
    assert line[6] == "rank 1 stopped answering (no heartbeat within 2 s)"
    took = ended - float((tmp_path / "stopped-at.txt").read_text())
    print(f"DistributedOptimizer loop, 2 ranks: ended {took:.1f} s after the SIGSTOP")
    assert took <= TIMEOUT + 5


# -- MPI: real jobs, a rank frozen for good with SIGSTOP --------------------------------------
def frozen_job(tmp_path, monkeypatch, nranks, frozen, args, ready, env_timeout=None,
               limit=JOB_TIMEOUT):
    """Start ``hpcml run ARGS`` on ``nranks`` ranks, wait for ``ready(tmp_path, proc)``, freeze
    rank ``frozen`` for good; (exit code, output, seconds from the SIGSTOP to the end)."""
    if env_timeout is None:
        monkeypatch.delenv(watchdog.ENV, raising=False)
    else:
        monkeypatch.setenv(watchdog.ENV, str(env_timeout))
    proc = ff.start(nranks, "run", *args, "--set", f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    pid = ff.rank_pid(proc, frozen)
    try:
        ready(tmp_path, proc)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code, out = ff.finish(proc, tmp_path, limit + 60)
        took = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return code, out, took


def check_lines(out, frozen, nranks):
    """At least one watchdog line, at most one per live rank, each naming the frozen rank as
    the one that stopped answering; returns them."""
    lines = LINE.findall(out)
    ranks = [int(line[0]) for line in lines]
    assert lines and len(set(ranks)) == len(ranks), out
    assert set(ranks) <= set(range(nranks)) - {frozen}
    for line in lines:
        assert line[6] == f"rank {frozen} stopped answering (no heartbeat within 2 s)", line
    return lines


def test_a_frozen_rank_ends_transformer_nmt(tmp_path, monkeypatch):
    """2 ranks, rank 1 frozen mid-run; the job key says 600 s but the environment says 8 s
    (it wins). Rank 0 is blocked in step n + 1, n being the last step it logged."""
    args = [str(ROOT / "jobs" / "transformer-nmt.toml"), "--set", "train.steps=100000",
            "--set", "eval.valid_every=0", "--set", "eval.bleu=false", "--set",
            "eval.checkpoint_every=0", "--set", "watchdog_timeout=600", "--set",
            f"data.path={ROOT / 'data' / 'nmt' / 'numbers-en-fr.h5'}"]
    code, out, took = frozen_job(tmp_path, monkeypatch, 2, 1, args,
                                 lambda cwd, proc: ff.wait_for_metrics(cwd, 3, proc),
                                 env_timeout=JOB_TIMEOUT)
    print(f"transformer-nmt, 2 ranks: ended {took:.1f} s after the SIGSTOP")
    assert code == 4, out
    (line,) = check_lines(out, 1, 2)
    assert line[0] == "0" and int(line[4]) == ff.metrics(tmp_path)[-1]["step"] + 1
    run = next(Path(tmp_path, "runs").iterdir())
    assert json.loads((run / "env.json").read_text())["watchdog_timeout"] == JOB_TIMEOUT
    assert not (run / "summary.json").exists()
    assert took <= JOB_TIMEOUT + 5


def test_a_frozen_rank_ends_qsparse_sync(tmp_path, monkeypatch):
    """4 ranks, rank 2 frozen mid-run; the timeout from the job key alone."""
    args = [str(ROOT / "jobs" / "qsparse-sync.toml"), "--set", "train.steps=1000000",
            "--set", "train.eval_every=10", "--set", f"watchdog_timeout={JOB_TIMEOUT}", "--set",
            f"data.path={ROOT / 'data' / 'qsparse' / 'digits.h5'}"]
    code, out, took = frozen_job(tmp_path, monkeypatch, 4, 2, args,
                                 lambda cwd, proc: ff.wait_for_metrics(cwd, 2, proc))
    print(f"qsparse sync, 4 ranks: ended {took:.1f} s after the SIGSTOP; {out.count('watchdog')}"
          " lines")
    assert code == 4, out
    check_lines(out, 2, 4)
    assert took <= JOB_TIMEOUT + 5


def test_a_frozen_coded_master_ends_its_workers(tmp_path, monkeypatch):
    """5 ranks, the master (rank 0) frozen mid-solve: the workers, which poll for its next
    message, end the job naming rank 0."""
    args = [str(ROOT / "jobs" / "coded.toml"), "--set", "solver.iterations=100000", "--set",
            "solver.algorithm=gd", "--set", f"watchdog_timeout={JOB_TIMEOUT}"]

    def ready(cwd, proc):
        ff.wait_for_line(cwd, "solving", proc)
        time.sleep(1.0)  # well into the solve (the master writes its metrics at the end)

    code, out, took = frozen_job(tmp_path, monkeypatch, 5, 0, args, ready)
    print(f"coded master, 5 ranks: ended {took:.1f} s after the SIGSTOP; "
          f"{out.count('watchdog')} lines")
    assert code == 4, out
    for line in check_lines(out, 0, 5):
        assert line[2] == "Recv (peer 0): the master's next message", line
    assert took <= JOB_TIMEOUT + 5


def test_a_frozen_async_server_ends_its_workers(tmp_path, monkeypatch):
    """4 ranks, the server (rank 0) frozen mid-run: the workers, waiting for its model after
    an update, end the job naming rank 0."""
    args = [str(ROOT / "jobs" / "qsparse-async.toml"), "--set", "train.steps=1000000",
            "--set", "train.eval_every=10", "--set", f"watchdog_timeout={ASYNC_TIMEOUT}", "--set",
            f"data.path={ROOT / 'data' / 'qsparse' / 'digits.h5'}"]
    code, out, took = frozen_job(tmp_path, monkeypatch, 4, 0, args,
                                 lambda cwd, proc: ff.wait_for_metrics(cwd, 2, proc),
                                 limit=ASYNC_TIMEOUT)
    print(f"qsparse async server, 4 ranks: ended {took:.1f} s after the SIGSTOP; "
          f"{out.count('watchdog')} lines")
    assert code == 4, out
    for line in check_lines(out, 0, 4):
        assert line[2].startswith("Irecv (peer 0)") or line[2].startswith("Isend (peer 0"), line
    assert took <= ASYNC_TIMEOUT + 5
