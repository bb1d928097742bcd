"""Test harness: real MPI ranks from plain ``pytest``, failing (never hanging) on timeouts.

``@mpi_test(ranks=[1, 2, 4])`` turns ``def test_x(comm): ...`` into a pytest test parametrized by
the number of ranks. Each case launches ``mpiexec -n N python -m hpcml.testing FILE FUNC`` (one
rank runs plain ``python``, without mpiexec, which also tests singleton MPI), runs the body on
every rank with the world communicator under abort-on-error, and fails with the output of every
rank when any rank raises or the job outlives ``timeout``.

The launcher is ``mpiexec`` beside the interpreter (the wheel MPI in ``.venv``), else the one on
PATH; ``HPCML_MPIEXEC`` overrides it (e.g. ``"srun --mpi=pmi2"``). Oversubscription (4 ranks on
2 cores) needs no flag with MPICH's Hydra.

pytest-mpi: every case is also marked ``pytest.mark.mpi(min_size=N)``, and tests declared
``in_process=True`` run in-process on every rank under
``mpiexec -n N python -m pytest --with-mpi -m mpi`` (see :func:`mpi_test`). Without
``--with-mpi`` pytest-mpi would skip ``mpi``-marked tests; :func:`configure_pytest` (called by
``tests/conftest.py``) turns that skip off, since the harness launches the ranks itself.

Batches: under plain ``pytest`` the selected ``in_process=True`` cases with the same rank count
run their bodies one after another in one launch (``python -m hpcml.testing --batch``: one
mpiexec and one torch import per rank count instead of one per case). Rank 0 records a body as
passed once every rank has finished it (a barrier); a body still running after its case's
``timeout`` ends the batch. When a batch fails, every case it did not record as passed is
launched on its own as above, so a failure is reported with that case's output alone.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def mpiexec() -> list[str]:
    """The launcher command (without ``-n``)."""
    if os.environ.get("HPCML_MPIEXEC"):
        return shlex.split(os.environ["HPCML_MPIEXEC"])
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpiexec found: install the mpich wheel (make dev) or set "
                           "HPCML_MPIEXEC")
    return [found]


def launch(nranks: int, argv: Sequence[str], *, timeout: float = 120,
           cwd: str | Path | None = None, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on ``nranks`` ranks (plain process when 1) and return the finished process.

    On timeout the whole process group is killed and ``TimeoutError`` raised with the output."""
    cmd = _command(nranks, argv)
    proc = subprocess.Popen(cmd, cwd=cwd, env=_environment(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise TimeoutError(f"{shlex.join(cmd)} did not finish in {timeout}s (hang?)\n"
                           f"--- stdout ---\n{out[-4000:]}\n"
                           f"--- stderr ---\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _command(nranks: int, argv: Sequence[str]) -> list[str]:
    return list(argv) if nranks == 1 else [*mpiexec(), "-n", str(nranks), *argv]


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def hpcml_cli(nranks: int, *args: str, timeout: float = 120, cwd: str | Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``hpcml ARGS`` on ``nranks`` ranks."""
    return launch(nranks, [sys.executable, "-m", "hpcml", *args], timeout=timeout, cwd=cwd,
                  env=env)


def mpi_test(ranks: Sequence[int] = (1, 2, 4), timeout: float = 120,
             in_process: bool = False) -> Callable[..., Any]:
    """Decorator: run ``body(comm)`` on each rank count in ``ranks`` (see module docstring).

    Each case carries ``pytest.mark.mpi(min_size=N)`` (pytest-mpi's marker). Under plain
    ``pytest`` it launches its own ranks. Under ``mpiexec -n N python -m pytest --with-mpi``
    (pytest-mpi), a test declared ``in_process=True`` runs the body in the pytest process of
    every rank with the world communicator, for the case whose rank count is the job's (the
    others are skipped); one not so declared is skipped there (it needs its own job: fresh
    processes, aborts, signals). In-process, a body that fails on some ranks only leaves the
    others waiting in their next collective until the watchdog ends the job
    (``HPCML_WATCHDOG_TIMEOUT``).

    Under plain ``pytest`` the ``in_process=True`` cases of one rank count run in one batch
    launch (module docstring), so their bodies must leave no process state behind that changes
    another body's result (seed what they draw, reset the ledger they count).

    A plain (undecorated) function ``f(comm)`` can be launched the same way with
    ``launch(n, [sys.executable, "-m", "hpcml.testing", FILE, "f"])``."""
    import pytest

    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        file = body.__code__.co_filename

        @pytest.mark.parametrize("nranks", [pytest.param(n, marks=pytest.mark.mpi(min_size=n))
                                            for n in ranks])
        def test(nranks: int, request: Any) -> None:
            if request.config.getoption("--with-mpi", default=False):
                _run_in_process(body, nranks, in_process)
                return
            if in_process and _passed_in_batch(request, nranks):
                return
            try:
                res = launch(nranks, [sys.executable, "-m", "hpcml.testing", file,
                                      body.__name__], timeout=timeout)
            except TimeoutError as exc:
                pytest.fail(str(exc), pytrace=False)
            if res.returncode != 0:
                pytest.fail(f"{body.__name__} failed on {nranks} ranks (exit {res.returncode})"
                            f"\n--- stdout ---\n{res.stdout[-6000:]}\n--- stderr ---\n"
                            f"{res.stderr[-6000:]}", pytrace=False)

        test.__name__ = body.__name__
        test.__doc__ = body.__doc__
        test.body = body
        test.in_process = in_process
        test.timeout = timeout
        return test

    return decorate


def _run_in_process(body: Callable[..., Any], nranks: int, in_process: bool) -> None:
    """The body of an ``mpi_test`` case on every rank of the pytest job (``--with-mpi``)."""
    import pytest

    from hpcml.comm import world

    if not in_process:
        pytest.skip("launches its own ranks: run it with plain pytest")
    comm = world()
    if comm.size != nranks:
        pytest.skip(f"the {nranks}-rank case (this job has {comm.size} ranks)")
    _run_fresh(body, comm)


def _run_fresh(body: Callable[..., Any], comm: Any) -> None:
    """``body(comm)`` then a barrier, in the state a process of its own would give it: the
    ledger reset before, torch's thread count put back after (a body may set it). Collective."""
    comm.ledger.reset()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else 0
    body(comm)
    comm.barrier()
    if torch:
        torch.set_num_threads(threads)


_BATCHED: dict[str, bool] = {}   # nodeid -> passed in its batch (absent: not batched yet)


def _batch_key(item: Any) -> tuple[str, str, int] | None:
    """(file, body name, rank count) of an ``in_process`` ``mpi_test`` case that no marker may
    skip or expect to fail (those run on their own), else None."""
    func = getattr(item, "function", None)
    if not getattr(func, "in_process", False) or any(
            item.get_closest_marker(m) for m in ("skip", "skipif", "xfail")):
        return None
    return func.body.__code__.co_filename, func.body.__name__, item.callspec.params["nranks"]


def _batch(items: Sequence[Any], nranks: int) -> list[Any]:
    """The cases among ``items`` that run in the ``nranks`` batch, in order."""
    return [item for item in items
            if (key := _batch_key(item)) is not None and key[2] == nranks]


def _passed_in_batch(request: Any, nranks: int) -> bool:
    """Whether this case passed in its batch; the first case of a batch launches it."""
    node = request.node
    if _batch_key(node) is None:
        return False
    if node.nodeid not in _BATCHED:
        batch = [item for item in _batch(request.session.items, nranks)
                 if item.nodeid not in _BATCHED]
        passed = _launch_batch(nranks, [_batch_key(item)[:2] for item in batch],
                               [item.function.timeout for item in batch])
        for item in batch:
            _BATCHED[item.nodeid] = _batch_key(item)[:2] in passed
        if len(passed) < len(batch):
            warnings.warn(f"the {nranks}-rank batch of in-process tests passed {len(passed)} "
                          f"of {len(batch)}; launching the others one by one", stacklevel=1)
    return _BATCHED.get(node.nodeid, False)


def _launch_batch(nranks: int, bodies: Sequence[tuple[str, str]],
                  timeouts: Sequence[float]) -> set[tuple[str, str]]:
    """Run ``bodies`` (file, name) one after another in one ``nranks`` launch and return those
    that passed on every rank; the launch is killed when a body outlives its timeout."""
    with tempfile.TemporaryDirectory(prefix="hpcml-batch-") as tmp:
        progress = Path(tmp) / "passed"
        progress.touch()
        argv = [sys.executable, "-m", "hpcml.testing", "--batch", str(progress),
                *(f"{file}::{name}" for file, name in bodies)]
        with open(Path(tmp) / "out", "w") as out:
            proc = subprocess.Popen(_command(nranks, argv), env=_environment(None), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            done, deadline = 0, time.monotonic() + timeouts[0]
            while proc.poll() is None:
                now_done = len(progress.read_text().splitlines())
                if now_done > done:
                    done = now_done
                    deadline = time.monotonic() + timeouts[min(done, len(timeouts) - 1)]
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.2)
        passed = {tuple(line.rsplit("::", 1)) for line in progress.read_text().splitlines()}
    # all bodies passed but the job failed (e.g. in MPI_Finalize): no body can be trusted
    return passed if proc.returncode == 0 or len(passed) < len(bodies) else set()


def _run_bodies(bodies: Sequence[tuple[str, str]], progress: str | None = None) -> None:
    """Run each ``(file, name)`` body on every rank with the world communicator
    (:func:`_run_fresh`); rank 0 appends ``file::name`` to ``progress`` (when given) once all
    ranks passed it. Collective; any exception aborts the job."""
    from hpcml.comm import abort_on_error, world

    modules: dict[str, Any] = {}
    with abort_on_error():
        comm = world()
        for file, name in bodies:
            if file not in modules:
                spec = importlib.util.spec_from_file_location(f"_mpi_test_{Path(file).stem}",
                                                              file)
                modules[file] = importlib.util.module_from_spec(spec)
                sys.path.insert(0, str(Path(file).parent))
                spec.loader.exec_module(modules[file])
            func = getattr(modules[file], name)
            _run_fresh(getattr(func, "body", func), comm)
            if progress is not None and comm.rank == 0:
                with open(progress, "a") as f:
                    f.write(f"{file}::{name}\n")


class _BatchTimeouts:
    """pytest plugin: the first case of each batch, which runs the whole batch, gets the sum of
    the batch's timeouts as its pytest-timeout (plus a minute for the launch)."""

    @staticmethod
    def pytest_collection_finish(session: Any) -> None:
        import pytest

        config, items = session.config, session.items
        if config.getoption("--with-mpi", default=False) or not config.pluginmanager.hasplugin(
                "timeout"):
            return
        for nranks in {key[2] for item in items if (key := _batch_key(item)) is not None}:
            batch = _batch(items, nranks)
            total = sum(item.function.timeout for item in batch) + 60
            batch[0].add_marker(pytest.mark.timeout(total))


def configure_pytest(config: Any) -> None:
    """For a ``conftest.py``'s ``pytest_configure``: register the ``mpi`` marker; without
    ``--with-mpi``, unregister pytest-mpi's plugin object (it would skip every ``mpi``-marked
    test), so plain ``pytest`` runs them through mpiexec. Not collective."""
    config.addinivalue_line("markers", "mpi(min_size=N): an MPI test (pytest-mpi)")
    config.pluginmanager.register(_BatchTimeouts(), "hpcml-batch-timeouts")
    if config.getoption("--with-mpi", default=False) or config.getoption("--only-mpi",
                                                                          default=False):
        return
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "MPIPlugin" and type(plugin).__module__ == "pytest_mpi":
            config.pluginmanager.unregister(plugin)


if __name__ == "__main__":
    if sys.argv[1] == "--batch":
        _run_bodies([tuple(arg.rsplit("::", 1)) for arg in sys.argv[3:]], sys.argv[2])
    else:
        _run_bodies([(sys.argv[1], sys.argv[2])])


def expect_error(kind: type[Exception], text: str, call: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> None:
    """Assert that ``call(*args, **kwargs)`` raises ``kind`` with ``text`` in its message (for
    test bodies that run on MPI ranks, where ``pytest.raises`` has no test to report to)."""
    try:
        call(*args, **kwargs)
    except kind as exc:
        assert text in str(exc), str(exc)
    else:
        raise AssertionError(f"{getattr(call, '__name__', call)} did not raise {kind.__name__}")
