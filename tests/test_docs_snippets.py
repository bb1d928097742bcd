"""Every code block of README.md and docs/**/*.md runs as the convention in tests/snippets.py
(and docs/guide/testing.md) says, so the documentation cannot rot: python blocks in one worker
process, ``<!-- run: mpiexec -n N -->`` blocks on N ranks, ``<!-- run: shell -->`` blocks in
bash. New pages are picked up without editing this file."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from snippets import blocks, markdown_files

from hpcml.testing import launch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def _collect():
    found, errors = [], []
    for path in markdown_files(ROOT):
        try:
            found += [b for b in blocks(path) if b.action not in ("none", "skip")]
        except ValueError as exc:
            errors.append(str(exc))
    return found, errors


BLOCKS, ERRORS = _collect()


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "HPCML_REPO": str(ROOT),
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


class Worker:
    """The one process that runs the python blocks (restarted after a hang)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def run(self, code: str, cwd: Path, name: str) -> tuple[bool, str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("snippet_worker.py"))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
                start_new_session=True)
        self.proc.stdin.write(json.dumps({"code": code, "cwd": str(cwd), "name": name}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            return False, f"no answer within {TIMEOUT} s (hang?) or the worker died"
        reply = json.loads(line)
        return reply["ok"], reply["output"]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def test_every_directive_is_well_formed():
    assert not ERRORS, "\n".join(ERRORS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_code_block_runs(block, worker, tmp_path):
    where = f"{block.file.relative_to(ROOT)}:{block.line}"
    if block.action == "python":
        ok, output = worker.run(block.code, tmp_path, where)
        assert ok, f"{where} failed:\n{output[-6000:]}"
        return
    script = tmp_path / ("snippet.py" if block.action == "mpiexec" else "snippet.sh")
    script.write_text(block.code)
    argv = [sys.executable, str(script)] if block.action == "mpiexec" else [
        "bash", "-e", str(script)]
    try:
        res = launch(block.ranks, argv, timeout=TIMEOUT, cwd=tmp_path, env=_env())
    except TimeoutError as exc:
        pytest.fail(f"{where}: {exc}", pytrace=False)
    assert res.returncode == 0, (f"{where} exited {res.returncode}\n--- stdout ---\n"
                                 f"{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}")
