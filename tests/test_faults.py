"""Real faults, not seeded delays: a worker frozen with SIGSTOP must not stall the encoded master
(5 ranks, k = 3 of 4) or the asynchronous Qsparse server (4 ranks), a worker frozen for good
must not keep the job from ending once its results are written, and too few live workers
(below k; every async worker) must end the job as failed, or preempted on a signal, never hang.

Timed assertions (the only ones allowed: progress rates of fault tests), with generous margins
because the machine (2 cores) is shared: while one worker is stopped for STOP_S seconds, the
master's / server's progress rate must stay above RATE_FRACTION of its rate in an equally long
undisturbed window just before the stop. Before the fix the rate fell to zero for most of the
stop (MPICH head-of-line blocking behind unreceived sends; a blocking reply to a stopped rank).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_fixture as ff
import pytest

from hpcml.coded.config import CodeConfig, ProblemConfig, SolverConfig
from hpcml.coded.job import make_problem
from hpcml.coded.solver import solve
from hpcml.comm import StragglerConfig, make_delay_model, world

ROOT = Path(__file__).resolve().parents[1]
STOP_S = 1.5
RATE_FRACTION = 0.25
DIGITS = str(ROOT / "data" / "qsparse" / "digits.h5")


def summary(cwd):
    return json.loads(next(Path(cwd, "runs").glob("*/summary.json")).read_text())


def kill_quietly(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def coded(cwd, *sets, nranks=5):
    return ff.start(nranks, "run", str(ROOT / "jobs" / "coded.toml"), "--set",
                    f"runs_dir={cwd}/runs", *(a for s in sets for a in ("--set", s)), cwd=cwd)


def undisturbed_errors(iterations, seeds=3):
    """Final relative errors of the same solve with simulated workers (no fault), one per
    delay seed: the spread erasure patterns alone give."""
    prob = make_problem(ProblemConfig(kind="ridge", data="diabetes", lam=0.001), 0)
    comm, errors = world(), []
    for seed in range(seeds):
        comm.set_delays(make_delay_model(StragglerConfig(kind="exponential", mean=0.01,
                                                         max_delay=0.2, seed=seed)))
        res = solve(comm, prob, CodeConfig(encoder="etf", wait_for=3),
                    SolverConfig(algorithm="gd", iterations=iterations, step=1.0),
                    Path(f"/tmp/hpcml-faults-{os.getpid()}"), 0)
        errors.append(res.relative_error[-1])
    return errors


def test_coded_master_keeps_its_pace_while_a_worker_is_stopped(tmp_path):
    """k = 3 of 4 (ETF, encoded GD): with worker rank 2 stopped the master waits for the other
    three; it keeps iterating, the stopped worker's late answer is discarded, and the solve
    ends as accurate as undisturbed solves (relative error at most 1.2x the largest of three
    simulated runs with other delay seeds; GD's spread over erasure patterns is ~5 %)."""
    iterations = 300
    proc = coded(tmp_path, f"solver.iterations={iterations}", "solver.algorithm=gd",
                 "solver.step=1.0")
    pid = ff.rank_pid(proc, 2)
    try:
        ff.wait_for_line(tmp_path, "solving", proc)
        time.sleep(STOP_S)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        time.sleep(STOP_S)
        os.kill(pid, signal.SIGCONT)
        resumed = time.time()
        code, out = ff.finish(proc, tmp_path, 120)
    finally:
        kill_quietly(pid)
    assert code == 0, out
    got = summary(tmp_path)
    assert got["status"] == "complete" and got["unresponsive_ranks"] == []
    seconds = [r["seconds"] for r in ff.metrics(tmp_path)]
    assert len(seconds) == iterations
    t0, t1 = stopped - got["started_unix"], resumed - got["started_unix"]
    assert t1 < seconds[-1], f"the run ended before the stop was over ({seconds[-1]:.1f} s)"
    before = sum(t0 - (t1 - t0) <= s < t0 for s in seconds) / (t1 - t0)
    during = sum(t0 <= s < t1 for s in seconds) / (t1 - t0)
    assert during >= RATE_FRACTION * before, (during, before)
    assert got["discarded_late_replies"] >= 1
    assert got["final_relative_error"] <= 1.2 * max(undisturbed_errors(iterations))


def test_coded_job_ends_when_a_worker_is_stopped_for_good(tmp_path):
    """Worker rank 2 never comes back: the master finishes its iterations (k = 3 of 4), waits
    solver.close_timeout for the acknowledgement, writes summary.json (status complete, rank 2
    named) and ends the job by aborting it: exit code 3, said in the output."""
    proc = coded(tmp_path, "solver.iterations=60", "solver.close_timeout=1")
    pid = ff.rank_pid(proc, 2)
    try:
        ff.wait_for_line(tmp_path, "solving", proc)
        time.sleep(0.5)  # let the start barrier finish on every worker (it needs rank 2)
        os.kill(pid, signal.SIGSTOP)
        code, out = ff.finish(proc, tmp_path, 90)
    finally:
        kill_quietly(pid)
    assert code == 3, out
    assert "workers on ranks [2] never acknowledged" in out and "exit code 3" in out
    got = summary(tmp_path)
    assert got["status"] == "complete" and got["unresponsive_ranks"] == [2]
    assert len(ff.metrics(tmp_path)) == 60


@contextlib.contextmanager
def frozen(proc, ranks):
    """SIGSTOP the given ranks of ``proc``'s job on entry (their PIDs are found first); on exit
    SIGKILL them and, if the job is still running, its whole session."""
    pids = [ff.rank_pid(proc, r) for r in ranks]
    try:
        yield lambda: [os.kill(pid, signal.SIGSTOP) for pid in pids]
    finally:
        for pid in pids:
            kill_quietly(pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def well_formed_metrics(cwd, got, key):
    """Every line of metrics.jsonl is a whole JSON record, one per iteration done, numbered
    0..n-1, the last equal to the summary's final value."""
    lines = next(Path(cwd, "runs").glob("*/metrics.jsonl")).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r[key] for r in records] == list(range(got["iterations_done"]))
    assert records[-1]["suboptimality"] == got["final_suboptimality"]


# case: (solver.progress_timeout, signal sent to the launcher, status, stopped_by)
BELOW_K = {"progress-timeout": (3, None, "failed", None),
           "signal": (600, signal.SIGUSR1, "preempted", "SIGUSR1")}


@pytest.mark.parametrize("case", list(BELOW_K))
def test_coded_master_below_k_ends_the_job(tmp_path, case):
    """4 ranks, k = 2 of 3: workers 2 and 3 stopped for good leave the master one reply short
    of every round. ``progress-timeout``: after solver.progress_timeout (3 s) with no reply it
    ends the solve as failed; ``signal``: a SIGUSR1 to the launcher ends the wait (the timeout
    is 600 s, so only the signal can). Either way the iterations done are written (whole metrics
    records, summary naming ranks 2 and 3) and the job ends with exit code 3 within a generous
    margin (before the fix the master waited forever, signal or not)."""
    timeout, sig, status, stopped_by = BELOW_K[case]
    proc = coded(tmp_path, "solver.iterations=100000", "code.wait_for=2", "solver.algorithm=gd",
                 f"solver.progress_timeout={timeout}", "solver.close_timeout=1", nranks=4)
    with frozen(proc, (2, 3)) as stop:
        ff.wait_for_line(tmp_path, "solving", proc)
        time.sleep(0.5)  # let the start barrier finish on every worker (it needs ranks 2, 3)
        stop()
        sent = None
        if sig is not None:
            time.sleep(1.0)  # the master is stuck in a round within one iteration (~ms)
            os.kill(proc.pid, sig)
            sent = time.time()
        code, out = ff.finish(proc, tmp_path, timeout + 45 if sig is None else 45)
    assert code == 3, out
    got = summary(tmp_path)
    assert (got["status"], got["stopped_by"]) == (status, stopped_by)
    assert got["unresponsive_ranks"] == [2, 3]
    assert 0 < got["iterations_done"] < 100000
    well_formed_metrics(tmp_path, got, "iteration")
    if sig is None:
        assert f"no reply for {timeout} s" in got["failed_by"] and "[2, 3]" in got["failed_by"]
        assert "workers on ranks [2, 3] stopped answering" in out
    else:
        assert got["failed_by"] is None
        assert got["started_unix"] + got["seconds"] < sent, "the master was not waiting"


def test_coded_worker_frozen_during_setup_ends_the_job(tmp_path):
    """4 ranks, k = 3 of 3: worker rank 3 is stopped for good as soon as the master starts the
    job, while the master generates and encodes a large synthetic problem (~1-2 s here), so
    before the worker can load its shard and report ready. The master waits for the ready
    messages at most solver.progress_timeout (3 s), then writes the results of a solve that
    never started (status failed, failed_by naming the phase and rank 3, no metrics record)
    and the job ends with exit code 3 (before the fix the master waited in a barrier
    forever)."""
    proc = coded(tmp_path, "problem.data=synthetic", "problem.n=200000", "solver.algorithm=gd",
                 "solver.progress_timeout=3", "solver.close_timeout=1", nranks=4)
    with frozen(proc, (3,)) as stop:
        ff.wait_for_line(tmp_path, "coded: ridge on synthetic", proc)
        stop()
        code, out = ff.finish(proc, tmp_path, 60)
    assert code == 3, out
    assert "solving" not in out, "the worker was stopped too late (after its ready message)"
    got = summary(tmp_path)
    assert (got["status"], got["unresponsive_ranks"]) == ("failed", [3])
    assert got["failed_by"].startswith("loading the shards: no ready message for 3 s")
    assert "[3]" in got["failed_by"] and "workers on ranks [3] stopped answering" in out
    assert got["iterations_done"] == 0 and got["final_suboptimality"] is None
    assert not list(Path(tmp_path, "runs").glob("*/metrics.jsonl")), "no iteration, no record"


def test_async_job_fails_when_every_worker_is_stopped(tmp_path):
    """All three workers stopped for good mid-run, none finished: the server, which goes on
    with any live worker by design, has none left; after train.worker_timeout (1 s) it writes
    the results (status failed, ranks 1-3 named) and the job ends with exit code 3."""
    proc = qsparse(tmp_path, "train.steps=100000", "train.worker_timeout=1")
    with frozen(proc, (1, 2, 3)) as stop:
        ff.wait_for_metrics(tmp_path, 1, proc)
        stop()
        code, out = ff.finish(proc, tmp_path, 60)
    assert code == 3, out
    got = summary(tmp_path)
    assert (got["status"], got["unresponsive_ranks"]) == ("failed", [1, 2, 3])
    assert "none finished" in got["failed_by"]


def qsparse(cwd, *sets):
    return ff.start(4, "run", str(ROOT / "jobs" / "qsparse-async.toml"), "--set",
                    f"runs_dir={cwd}/runs", "--set", f"data.path={DIGITS}", "--set",
                    "stragglers.slow_ranks=[1, 2, 3]", "--set", "train.eval_every=10",
                    *(a for s in sets for a in ("--set", s)), cwd=cwd)


def test_async_server_keeps_applying_updates_while_a_worker_is_stopped(tmp_path):
    """Every worker sleeps 5 ms per local step (the job's fixed delay, on all three, so the
    rate depends little on the machine's load). The server's rate of applied updates (one
    metrics record per 10) while worker rank 2 is stopped stays above RATE_FRACTION of the
    rate just before (the other two workers make ~70 % of the updates); the stopped worker resumes,
    finishes its steps and the model ends above the job's accuracy target (0.9, which
    undisturbed runs reach)."""
    proc = qsparse(tmp_path, "train.steps=700")
    pid = ff.rank_pid(proc, 2)
    try:
        ff.wait_for_metrics(tmp_path, 3, proc)
        first = len(ff.metrics(tmp_path))
        time.sleep(STOP_S)
        at_stop = len(ff.metrics(tmp_path))
        os.kill(pid, signal.SIGSTOP)
        time.sleep(STOP_S)
        at_resume = len(ff.metrics(tmp_path))
        os.kill(pid, signal.SIGCONT)
        code, out = ff.finish(proc, tmp_path, 120)
    finally:
        kill_quietly(pid)
    assert code == 0, out
    assert at_resume - at_stop >= RATE_FRACTION * (at_stop - first), (first, at_stop, at_resume)
    got = summary(tmp_path)
    assert got["unresponsive_ranks"] == [] and got["final_accuracy"] >= 0.9


def test_async_job_ends_when_a_worker_is_stopped_for_good(tmp_path):
    """Worker rank 2 never comes back: the others finish, the server waits
    train.worker_timeout, writes summary.json (rank 2 named) and the job ends with exit code 3."""
    proc = qsparse(tmp_path, "train.steps=100", "train.worker_timeout=1")
    pid = ff.rank_pid(proc, 2)
    try:
        ff.wait_for_metrics(tmp_path, 1, proc)
        os.kill(pid, signal.SIGSTOP)
        code, out = ff.finish(proc, tmp_path, 90)
    finally:
        kill_quietly(pid)
    assert code == 3, out
    got = summary(tmp_path)
    assert got["status"] == "complete" and got["unresponsive_ranks"] == [2]
    assert "workers on ranks [2] stopped answering" in out


def test_fault_model_freezes_each_slow_rank_once_per_run_of_iterations():
    """The seeded start lies in [freeze_after, 2 freeze_after]; the freeze fires at the first
    iteration >= start the rank works on (also when it skipped the start itself), once, and
    again after the iteration counter goes back (the next solve); other ranks never freeze."""
    cfg = StragglerConfig(kind="fault", slow_ranks=[1], freeze=2.5, freeze_after=10, seed=4)
    model = make_delay_model(cfg, 5)
    start = model.start(1)
    assert 10 <= start <= 20 and model.freezes
    for _ in range(2):
        delays = [model.delay(1, t) for t in range(0, 40, 3)]
        fired = [t for t, d in zip(range(0, 40, 3), delays, strict=True) if d]
        assert delays.count(2.5) == 1 and fired[0] >= start and fired[0] - 3 < start
    assert all(model.delay(2, t) == 0 for t in range(40))


def test_freeze_process_really_stops_the_process(tmp_path):
    """freeze_process(s) SIGSTOPs the caller (state T in /proc) and it resumes after ~s."""
    code = ("import time; from hpcml.comm.stragglers import freeze_process; "
            "s = time.monotonic(); freeze_process(1.0); print(time.monotonic() - s)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    states = set()
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            states.add(next(line.split()[1] for line in status.splitlines()
                            if line.startswith("State:")))
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=20)
    assert "T" in states
    assert float(out) >= 1.0
