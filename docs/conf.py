"""Sphinx configuration: MyST Markdown pages, and an API reference that autodoc builds from the
docstrings of hpcml's public modules (docs/api/, generated at every build: every sub-package
that exists is picked up, so a new one needs no edit here)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import hpcml

project = "hpcml"
author = "the hpcml developers"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False  # torch base-class docstrings cite labels of its own docs
html_theme = "alabaster"
html_title = "hpcml"
# README-derived pages cite repository files (jobs/, examples/, hpcml/) as code, not links;
# pages may start at any heading level
suppress_warnings = ["myst.header"]

API = Path(__file__).parent / "api"
# top-level modules a user calls (the CLI, launcher and run-directory internals are not API)
TOP_LEVEL = ["hpcml.errors", "hpcml.jobs", "hpcml.checkpoint", "hpcml.preemption",
             "hpcml.progress", "hpcml.extras", "hpcml.testing"]


def _page(name: str) -> str:
    """The API page of package or module ``name``: the module itself (its ``__all__`` when it
    has one), and for a package without ``__all__`` each of its public submodules."""
    module = importlib.import_module(name)
    lines = [f"# `{name}`", "", "```{eval-rst}", f".. automodule:: {name}"]
    if hasattr(module, "__all__"):
        lines.append("   :imported-members:")
    lines.append("```")
    if hasattr(module, "__path__") and not hasattr(module, "__all__"):
        for sub in pkgutil.iter_modules(module.__path__):
            if not sub.name.startswith("_") and not sub.ispkg:
                lines += ["", f"## `{name}.{sub.name}`", "", "```{eval-rst}",
                          f".. automodule:: {name}.{sub.name}", "```"]
    return "\n".join(lines) + "\n"


def _write_api(app: object) -> None:
    packages = [f"hpcml.{m.name}" for m in pkgutil.iter_modules(hpcml.__path__) if m.ispkg]
    wanted = {f"{name}.md": _page(name) for name in sorted(packages) + TOP_LEVEL}
    for old in API.glob("hpcml.*.md"):
        if old.name not in wanted:
            old.unlink()
    for file, text in wanted.items():
        path = API / file
        if not path.exists() or path.read_text() != text:  # unchanged pages stay up to date
            path.write_text(text)


def setup(app: object) -> None:
    app.connect("builder-inited", _write_api)
