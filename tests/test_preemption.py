"""Real SIGUSR1/SIGTERM sent to the launcher (plain ``python`` at 1 rank, Hydra's ``mpiexec``,
which forwards them to every rank, at 2 to 4).

Scaling job: a signal that arrives before the loop starts stops the run at its first step
boundary with a checkpoint and ``status = "preempted"`` (which ``hpcml sweep status`` reports),
and the run resumes to the uninterrupted result; a signal during the last step lets the run
finish cleanly (``complete``), never a killed rank.

Every other iterative kind (qsparse sync, allreduce and async, consensus, coded, Qsparse NMT,
bench-optimizers), configured for far more iterations than it does before the signal: it stops
soon after the signal with exit code 0 and ``preempted``, and what it reports is the state of
the iterations it did, checked against an independent count (bits, rounds, privacy in closed
form, metrics lines, the single-process simulation, a resumable checkpoint). A frozen worker
does not block the stop of the master/worker kinds, and a stopped coded solve holds exactly the
iterate of a shorter solve.
"""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fault_fixture as ff
import numpy as np
import pytest
from click.testing import CliRunner

from hpcml import checkpoint
from hpcml.cli import cli
from hpcml.rundir import read_metrics
from hpcml.slurm.scaling import gradient_sum, rows_block
from hpcml.slurm.sweep import write_manifest
from hpcml.testing import hpcml_cli, mpiexec

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "slurm-lsq.toml")
STEPS, SLEEP = 3, 2.0
SETS = ["--set", "rows=64", "--set", "features=4", "--set", "seed=4", "--set", 'mode="strong"',
        "--set", "checkpoint_every=0", "--set", f"steps={STEPS}"]
Ready = Callable[[Path, str], bool]


def interrupt(argv: list[str], nranks: int, sig: signal.Signals, runs: Path, ready: Ready,
              freeze: int | None = None) -> tuple[subprocess.CompletedProcess, Path, float]:
    """Start ``hpcml run ARGV`` (run directories under ``runs``) on ``nranks`` ranks, send
    ``sig`` to the launcher once ``ready(run_dir, stdout so far)`` holds (polled every 20 ms),
    and wait for the end. ``freeze``: a rank to stop with SIGSTOP just before the signal (it
    never resumes). Returns the finished process, its run directory and the seconds from the
    signal to the end."""
    cmd = [sys.executable, "-m", "hpcml", "run", *argv, "--set", f"runs_dir={runs}"]
    if nranks > 1:
        cmd = [*mpiexec(), "-n", str(nranks), *cmd]
    runs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = runs / "stdout.txt", runs / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
    frozen = None
    try:
        frozen = ff.rank_pid(proc, freeze) if freeze is not None else None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            made = list(runs.glob("*/config.toml"))
            if made and ready(made[0].parent, out_path.read_text()):
                break
            time.sleep(0.02)
        if frozen is not None:
            os.kill(frozen, signal.SIGSTOP)
        os.kill(proc.pid, sig)
        sent = time.monotonic()
        proc.wait(timeout=150)
        after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
    (run,) = [p.parent for p in runs.glob("*/config.toml")]
    return (subprocess.CompletedProcess(cmd, proc.returncode, out_path.read_text(),
                                        err_path.read_text()), run, after)


def metrics_lines(at_least: int) -> Ready:
    """Ready once the run's metrics.jsonl has ``at_least`` complete lines."""
    def ready(run: Path, _out: str) -> bool:
        path = run / "metrics.jsonl"
        return path.is_file() and path.read_text().count("\n") >= at_least
    return ready


def interrupted(runs: Path, nranks: int, sig: signal.Signals, when: str
                ) -> tuple[subprocess.CompletedProcess, Path]:
    """The scaling job, sent ``sig`` when its run directory appears (``before``: the job's loop
    has not started, its first step sleeps SLEEP s) or when the last step's metrics line is
    written (``after``: the last step sleeps SLEEP s)."""
    ready = (lambda run, out: True) if when == "before" else metrics_lines(STEPS)
    res, run, _ = interrupt([JOB, *SETS, "--set", f"step_sleep={SLEEP}"], nranks, sig, runs,
                            ready)
    return res, run


def ID(value: object) -> str:
    return getattr(value, "name", str(value))


def reference(steps: int) -> np.ndarray:
    x, y = rows_block(0, 64, 4, 0.01, 4)
    w = np.zeros(4)
    for _ in range(steps):
        w -= 0.5 / 64 * gradient_sum(x, y, w)
    return w


@pytest.mark.parametrize("nranks,sig", [(1, signal.SIGUSR1), (4, signal.SIGTERM)], ids=ID)
def test_signal_before_the_loop_stops_at_the_first_step_and_resumes(tmp_path, nranks, sig):
    sweep = tmp_path / "sweep"
    res, run = interrupted(sweep / "point-0", nranks, sig, "before")
    assert res.returncode == 0, res.stderr
    assert "BAD TERMINATION" not in res.stdout + res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["steps_done"]) == (
        "preempted", sig.name, 1)
    assert checkpoint.latest(run).step == 1
    write_manifest(sweep, {"points": [{"steps": STEPS}], "job_id": None})
    status = CliRunner().invoke(cli, ["sweep", "status", str(sweep)])
    assert status.exit_code == 0 and status.output.split()[:2] == ["0", "preempted"]
    done = hpcml_cli(nranks, "run", JOB, *SETS, "--set", "step_sleep=0", "--set",
                     f"runs_dir={sweep / 'point-0'}", "--resume", str(run), "--allow-config-change")
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("complete", STEPS)
    w = checkpoint.read(checkpoint.latest(run), 0).shared["w"].numpy()
    np.testing.assert_allclose(w, reference(STEPS), rtol=1e-12)


@pytest.mark.parametrize("nranks,sig", [(1, signal.SIGTERM), (4, signal.SIGUSR1)], ids=ID)
def test_signal_in_the_last_step_lets_the_run_finish(tmp_path, nranks, sig):
    res, run = interrupted(tmp_path, nranks, sig, "after")
    assert res.returncode == 0, res.stderr
    assert "BAD TERMINATION" not in res.stdout + res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["steps_done"]) == (
        "complete", None, STEPS)
    assert checkpoint.latest(run).step == STEPS


MANY = 100_000  # iterations configured (20 s to hours of work): the signal arrives mid-run
NMT_JOB = str(ROOT / "jobs" / "qsparse-transformer.toml")
NMT_SETS = ["model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
            "train.batch_size=8", "train.warmup=4", "eval.batch_size=64", "eval.valid_every=0",
            "eval.bleu=false", "qsparse.compressor.k=64", "qsparse.H=2"]


def sets(*pairs: str) -> list[str]:
    return [arg for kv in pairs for arg in ("--set", kv)]


def last_metrics(run: Path) -> dict:
    return read_metrics(run / "metrics.jsonl")[-1]


def check_qsparse_sync(run: Path, summary: dict) -> int:
    steps = summary["steps_done"]
    assert steps % 10 == 0  # the ranks agree at evaluation boundaries (eval_every = 10)
    assert (last_metrics(run)["step"], last_metrics(run)["accuracy"]) == (
        steps, summary["final_accuracy"])
    assert summary["syncs"] == steps // 4  # H = 4
    assert summary["bits_per_worker"] == summary["syncs"] * summary["bits_per_sync"]
    return steps


def check_qsparse_async(run: Path, summary: dict) -> int:
    assert summary["unresponsive_ranks"] == []
    updates = summary["syncs"]  # every update the server applied, each bits_per_sync bits
    assert summary["bits_per_worker"] == round(updates * summary["bits_per_sync"] / 3)
    assert (last_metrics(run)["step"], last_metrics(run)["accuracy"]) == (
        updates, summary["final_accuracy"])
    return summary["steps_done"]


def check_consensus(run: Path, summary: dict) -> int:
    from dp_accounting import get_sigma_gaussian

    rounds = summary["rounds_done"]
    assert rounds % 10 == 0 and last_metrics(run)["round"] == rounds  # log_every = 10
    assert summary["matches_simulation"] is True  # the simulation of the rounds done
    # equal noise-to-sensitivity in each of the MANY planned rounds: the rounds done spent
    # mu = sqrt(rounds / MANY) of the full budget's mu = 1 / sigma(epsilon, delta)
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["releasing_rounds"] == rounds
    assert summary["privacy"]["mu"] == pytest.approx(
        math.sqrt(rounds / MANY) / get_sigma_gaussian(100.0, 1e-5), rel=1e-9)
    assert summary["privacy"]["epsilon"] < 100.0
    return rounds


def check_coded(run: Path, summary: dict) -> int:
    done = summary["iterations_done"]
    assert summary["unresponsive_ranks"] == []
    assert len(read_metrics(run / "metrics.jsonl")) == done
    assert last_metrics(run)["suboptimality"] == summary["final_suboptimality"]
    assert summary["final_relative_error"] < 1.0  # moved towards w* from w = 0
    return done


def check_nmt_resumes(run: Path, summary: dict) -> int:
    steps = summary["steps"]
    assert checkpoint.latest(run).step == steps
    target = 2 * (steps // 2 + 1)  # the next multiple of H = 2 (mid-period stops resume too)
    res = hpcml_cli(2, "run", NMT_JOB, *sets(*NMT_SETS, f"train.steps={target}",
                                              f"runs_dir={run.parent}"),
                    "--resume", str(run), "--allow-config-change", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert f"resumed from step {steps}" in res.stdout
    after = json.loads((run / "summary.json").read_text())
    assert (after["status"], after["steps"]) == ("complete", target)
    return steps


def check_bench_optimizers(run: Path, summary: dict) -> int:
    done = summary["runs_done"]
    assert done < summary["runs_planned"] == 2 * 2 * 1000 and len(summary["runs"]) == done
    assert done % 2 == 0  # whole rounds: one run per rank, never a half-trained run
    assert sum(cell["seeds"] for cell in summary["grid"]) == done
    assert all(r["diverged"] or r["steps"][-1] == 4 for r in summary["runs"])
    table = (run / "table.md").read_text()
    assert f"stopped by {summary['stopped_by']} after {done} of 4000 runs" in table
    assert (run / "val-loss.png").stat().st_size > 0
    return done


# case: (job kind, ranks, signal, hpcml run arguments, when to send it, check of the results)
CASES = {
    "qsparse-sync": ("qsparse", 2, signal.SIGUSR1, ["jobs/qsparse-sync.toml", *sets(
        f"train.steps={MANY}", "train.eval_every=10")], metrics_lines(2), check_qsparse_sync),
    "qsparse-async": ("qsparse", 4, signal.SIGTERM, ["jobs/qsparse-async.toml", *sets(
        f"train.steps={MANY}")], metrics_lines(1), check_qsparse_async),
    "consensus": ("consensus", 2, signal.SIGTERM, ["jobs/consensus-mean.toml", *sets(
        f"optim.rounds={MANY}", "log_every=10", 'privacy.noise="reproducible"', "verify=true",
        'stragglers.kind="fixed"',
        "stragglers.slow_ranks=[0]", "stragglers.delay=0.001")], metrics_lines(3),
        check_consensus),
    "coded": ("coded", 4, signal.SIGUSR1, ["jobs/coded.toml", *sets(
        f"solver.iterations={MANY}", "code.wait_for=2")],
        lambda run, out: "solving (" in out, check_coded),
    "bench-optimizers": ("bench-optimizers", 2, signal.SIGTERM, ["jobs/bench-optimizers.toml",
        *sets("steps=4", "seeds=1000", "eval_every=2", "eval_windows=4", "batch_size=4",
              "model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32",
              "model.context=16", 'optimizers=["adam", "mada"]', "lr_grid=[1.0, 2.0]")],
        lambda run, out: "final val loss" in out, check_bench_optimizers),
    "qsparse-nmt": ("transformer-nmt", 2, signal.SIGUSR1, [NMT_JOB, *sets(
        *NMT_SETS, f"train.steps={MANY}")], metrics_lines(2), check_nmt_resumes),
}


@pytest.mark.parametrize("case", list(CASES))
def test_signal_mid_run_stops_every_iterative_kind_early(tmp_path, case):
    kind, nranks, sig, argv, ready, check = CASES[case]
    res, run, after = interrupt(argv, nranks, sig, tmp_path / "runs", ready)
    assert res.returncode == 0, res.stderr
    assert "BAD TERMINATION" not in res.stdout + res.stderr
    assert f"stopped by {sig.name}" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["kind"], summary["status"], summary["stopped_by"]) == (
        kind, "preempted", sig.name)
    assert 0 < check(run, summary) < MANY
    assert after < 60, f"{after:.1f} s from the signal to the end"  # generous: 2 shared cores


def test_a_frozen_worker_does_not_block_the_stop(tmp_path):
    """Async qsparse, worker rank 2 stopped for good just before the signal: the server stops
    the live workers through its replies, waits train.worker_timeout (1 s) for rank 2, writes
    the results (preempted, rank 2 named) and ends the job with exit code 3. (The coded master
    ends a stopped solve through the same close as a finished one, whose frozen-worker case
    tests/test_faults.py covers.)"""
    _, nranks, sig, argv, ready, _ = CASES["qsparse-async"]
    res, run, after = interrupt([*argv, *sets("train.worker_timeout=1")], nranks, sig,
                                tmp_path / "runs", ready, freeze=2)
    assert res.returncode == 3, res.stdout + res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["unresponsive_ranks"]) == (
        "preempted", sig.name, [2])
    assert after < 60, f"{after:.1f} s from the signal to the end"


def stop_on_call(n: int) -> Callable[[], str | None]:
    """A master's stop flag that is raised at its n-th poll."""
    polls = []

    def stop() -> str | None:
        polls.append(n)
        return "SIGUSR1" if len(polls) >= n else None
    return stop


@pytest.fixture
def simulated():
    """This process's one-rank world communicator with seeded delays (restored afterwards)."""
    from hpcml.comm import StragglerConfig, make_delay_model, world

    comm = world()
    before = comm.delays
    comm.set_delays(make_delay_model(StragglerConfig(kind="exponential", mean=0.01, seed=2)))
    yield comm
    comm.set_delays(before)


@pytest.mark.parametrize("algorithm,problem", [("gd", "ridge"), ("lbfgs", "ridge"),
                                               ("async", "ridge"), ("bcd", "ridge"),
                                               ("fista", "lasso")])
def test_a_stopped_coded_solve_equals_the_shorter_solve(simulated, tmp_path, algorithm,
                                                        problem):
    """Simulated workers (one rank, seeded delays: the same erasures in every run): a solve of
    8 iterations stopped at the master's 3rd poll holds exactly the iterate of a 3-iteration
    solve, and says why it stopped."""
    from hpcml.coded.config import CodeConfig, SolverConfig
    from hpcml.coded.problems import Problem, load_data
    from hpcml.coded.solver import solve

    x, y = load_data("synthetic", kind=problem, n=128, p=8, seed=0)
    prob = Problem(problem, x, y, lam=0.01, l1=0.01 if problem == "lasso" else 0.0)
    code = CodeConfig(encoder="etf", wait_for=3)
    stopped, short = (solve(simulated, prob, code,
                            SolverConfig(algorithm=algorithm, iterations=its),
                            tmp_path / str(its), 0, stop=stop)
                      for its, stop in ((8, stop_on_call(3)), (3, None)))
    assert (stopped.stopped_by, short.stopped_by) == ("SIGUSR1", None)
    assert len(stopped.seconds) == len(short.seconds) == 3
    np.testing.assert_array_equal(stopped.w, short.w)


def test_a_stopped_coded_mf_solve_equals_the_shorter_solve(simulated, tmp_path):
    """Collaborative filtering (simulated workers): 2 sweeps of (2 U-steps, 2 V-steps) stopped
    at the master's 4th poll hold exactly the factors of a 1-sweep solve."""
    from hpcml.coded.config import CodeConfig
    from hpcml.coded.mf import solve_cf
    from hpcml.coded.ratings import split, synthetic_ratings

    train, test = split(synthetic_ratings(120, 40, 3, 0.12, 0.5, 0), 0.1, 0)
    code = CodeConfig(encoder="etf", wait_for=3)
    stopped, short = (solve_cf(simulated, train, test, code, 3, 1e-3, outer, 2, 1.0,
                               tmp_path / str(outer), 0, stop=stop)
                      for outer, stop in ((2, stop_on_call(4)), (1, None)))
    assert (stopped.stopped_by, short.stopped_by) == ("SIGUSR1", None)
    assert len(stopped.seconds) == len(short.seconds) == 4
    np.testing.assert_array_equal(stopped.u, short.u)
    np.testing.assert_array_equal(stopped.v, short.v)


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (/proc SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_a_usr1_while_hpcml_starts_becomes_the_runs_preemption(tmp_path):
    """Slurm's warning can arrive while Python is still importing torch and MPI: the entry point
    catches it from its first line, and the run then stops at its first step boundary instead
    of the rank dying of the signal's default action."""
    cmd = [sys.executable, "-m", "hpcml", "run", JOB, *SETS, "--set", f"step_sleep={SLEEP}",
           "--set", f"runs_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while not catches(proc.pid, signal.SIGUSR1):
            time.sleep(0.002)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        os.kill(proc.pid, signal.SIGUSR1)
        assert "libtorch" not in maps  # caught before torch (and the run's handler) loaded
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    (run,) = [p.parent for p in tmp_path.glob("*/summary.json")]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["steps_done"]) == (
        "preempted", "SIGUSR1", 1)


def test_a_usr1_after_the_run_is_ignored():
    """After a run's Preemption ends, a late SIGUSR1 (the run finished before Slurm's warning)
    leaves the process alive; it is only recorded (a later run in the same process would take
    it as its preemption)."""
    from hpcml.preemption import Preemption, catch_early_usr1
    old = signal.getsignal(signal.SIGUSR1)
    try:
        catch_early_usr1()
        with Preemption() as first:
            pass
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this process without the catcher
        assert first.received is None
        with Preemption() as second:
            assert second.received == "SIGUSR1"  # the pending signal reaches the next run
    finally:
        signal.signal(signal.SIGUSR1, old)
