"""Run Horovod's own PyTorch tests against ``hpcml.horovod``, through an import alias.

Usage (every rank runs the same pytest session; nothing is downloaded)::

    mpiexec -n 2 python examples/horovod_test_alias.py /path/to/horovod/test/parallel/test_torch.py
    mpiexec -n 4 python examples/horovod_test_alias.py TEST_FILE -k reducescatter --timeout 100

``TEST_FILE`` is a file of a local Horovod checkout (``test/parallel/test_torch.py``); further
arguments go to pytest (``-k``, ``--deselect``). Before the file is imported,
``horovod`` / ``horovod.torch`` are aliased to :mod:`hpcml.horovod` and the module ``common``
(Horovod's ``test/utils/common.py``, whose three helpers the file imports) is replaced by a
stand-in written here. Rank 0 prints every test's outcome over all ranks (``fail`` if it failed
on any rank, ``n.a.`` if it skipped itself on every rank) and the counts; the exit status is 0
when nothing failed. ``--timeout S`` (default 120): a test running longer ends the whole job
(exit status 3, its name printed), so a hang is reported instead of waiting forever; rerun with
``--deselect FILE::CLASS::TEST`` for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

import hpcml.horovod
from hpcml.comm import world


def _common_stand_in() -> types.ModuleType:
    """The helpers ``test_torch.py`` imports from Horovod's ``common``."""
    common = types.ModuleType("common")

    def mpi_env_rank_and_size() -> tuple[int, int]:
        comm = world()
        return comm.rank, comm.size

    def skip_or_fail_gpu_test(test: Any, message: str) -> None:
        if int(os.environ.get("HOROVOD_TEST_GPU", "0")):
            test.fail(message)
        test.skipTest(message)

    @contextlib.contextmanager
    def temppath() -> Iterator[str]:
        with tempfile.TemporaryDirectory() as d:
            yield os.path.join(d, "temp_test_file")

    common.mpi_env_rank_and_size = mpi_env_rank_and_size
    common.skip_or_fail_gpu_test = skip_or_fail_gpu_test
    common.temppath = temppath
    return common


class _Outcomes:
    """A pytest plugin: this rank's outcome per test, and a watchdog per test."""

    def __init__(self, timeout: float) -> None:
        self.timeout, self.outcomes = timeout, {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> Iterator[None]:
        def expire() -> None:
            print(f"horovod_test_alias: {item.nodeid} ran over {self.timeout} s: ending the "
                  "job (rerun with --deselect for it)", file=sys.stderr, flush=True)
            os._exit(3)

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def pytest_runtest_logreport(self, report: Any) -> None:
        name = report.nodeid.split("::")[-1]
        if report.failed:
            self.outcomes[name] = "fail"
        elif report.skipped and self.outcomes.get(name) != "fail":
            self.outcomes[name] = "n.a."
        elif report.when == "call" and report.passed:
            self.outcomes[name] = "pass"


def main(argv: list[str]) -> int:
    args = list(argv)
    timeout = 120.0
    if "--timeout" in args:
        i = args.index("--timeout")
        timeout = float(args[i + 1])
        del args[i:i + 2]
    if not args or not os.path.isfile(args[0]):
        print("horovod_test_alias: error: the first argument must be Horovod's test file "
              "(test/parallel/test_torch.py of a local checkout)", file=sys.stderr)
        return 2
    package = types.ModuleType("horovod")
    package.torch = hpcml.horovod
    sys.modules.update({"horovod": package, "horovod.torch": hpcml.horovod,
                        "common": _common_stand_in()})
    comm = world()
    if comm.rank > 0:  # one rank's pytest report is enough; rank 0 prints everyone's outcomes
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    plugin = _Outcomes(timeout)
    pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[plugin])
    everyone = comm.allgather(plugin.outcomes)
    names = {name for outcomes in everyone for name in outcomes}
    merged = {name: next(o for o in ("fail", "pass", "n.a.")
                         if any(outcomes.get(name) == o for outcomes in everyone))
              for name in names}
    counts = {k: sum(v == k for v in merged.values()) for k in ("pass", "fail", "n.a.")}
    if comm.rank == 0:
        for name in sorted(merged):
            print(f"{merged[name]:5} {name}")
        applicable = counts["pass"] + counts["fail"]
        print(f"{comm.size} ranks: {counts['pass']} pass, {counts['fail']} fail, "
              f"{counts['n.a.']} n.a.; {counts['pass']} of {applicable} applicable pass "
              f"({100 * counts['pass'] / max(applicable, 1):.1f} %)", flush=True)
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
