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
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
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
    cmd = list(argv) if nranks == 1 else [*mpiexec(), "-n", str(nranks), *argv]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
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
    body(comm)
    comm.barrier()


def _run_body(file: str, name: str) -> None:
    from hpcml.comm import abort_on_error, world

    spec = importlib.util.spec_from_file_location(f"_mpi_test_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(file).parent))
    with abort_on_error():
        spec.loader.exec_module(module)
        comm = world()
        func = getattr(module, name)
        getattr(func, "body", func)(comm)
        comm.barrier()


def configure_pytest(config: Any) -> None:
    """For a ``conftest.py``'s ``pytest_configure``: register the ``mpi`` marker; without
    ``--with-mpi``, unregister pytest-mpi's plugin object (it would skip every ``mpi``-marked
    test), so plain ``pytest`` runs them through mpiexec. Not collective."""
    config.addinivalue_line("markers", "mpi(min_size=N): an MPI test (pytest-mpi)")
    if config.getoption("--with-mpi", default=False) or config.getoption("--only-mpi",
                                                                          default=False):
        return
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "MPIPlugin" and type(plugin).__module__ == "pytest_mpi":
            config.pluginmanager.unregister(plugin)


if __name__ == "__main__":
    _run_body(sys.argv[1], sys.argv[2])


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
