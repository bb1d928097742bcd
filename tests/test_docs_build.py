"""The documentation site builds with warnings as errors (what ``make docs`` runs): every page,
and the API reference autodoc makes from the docstrings of the public modules."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sphinx_builds_the_docs_with_warnings_as_errors(tmp_path):
    res = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q",
                          "-b", "html", str(ROOT / "docs"), str(tmp_path / "html")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"sphinx failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    assert (tmp_path / "html" / "api" / "hpcml.comm.html").exists()
    guide = sorted(p.stem for p in (ROOT / "docs" / "guide").glob("*.md"))
    built = sorted(p.stem for p in (tmp_path / "html" / "guide").glob("*.html"))
    assert built == guide
