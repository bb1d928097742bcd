"""Runs python code blocks for tests/test_docs_snippets.py, one process for all of them (torch
and MPI are imported once). Reads one JSON request a line, ``{"code", "cwd", "name"}``, runs
the code in a fresh ``__main__`` namespace with ``cwd`` as working directory, and answers one
JSON line ``{"ok", "output"}`` (the block's stdout and stderr, and the traceback on failure)."""

import contextlib
import io
import json
import os
import sys
import traceback


def main() -> None:
    reply = sys.stdout
    for request in sys.stdin:
        job = json.loads(request)
        os.chdir(job["cwd"])
        out, ok = io.StringIO(), True
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                exec(compile(job["code"], job["name"], "exec"), {"__name__": "__main__"})
            except SystemExit as stop:
                ok = stop.code in (0, None)
            except BaseException:
                ok = False
                traceback.print_exc()
        reply.write(json.dumps({"ok": ok, "output": out.getvalue()}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
