"""The code blocks of the project's Markdown files and how each is run (docs/guide/testing.md):

* a ```python block runs in one process (no mpiexec) in a fresh temporary directory, with the
  repository root in ``HPCML_REPO``; every block is independent (a fresh namespace);
* a block preceded by the line ``<!-- run: mpiexec -n N -->`` runs as ``mpiexec -n N python
  file.py`` through :func:`hpcml.testing.launch`;
* a block preceded by ``<!-- run: shell -->`` runs with ``bash -e`` in a temporary directory,
  the interpreter's directory (``.venv/bin``) first on PATH;
* other blocks (bash, console, toml, text, output) are not executed; ``<!-- skip: reason -->``
  before a python block skips it.

Blank lines may stand between the comment and the block's opening fence.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

DIRECTIVE = re.compile(r"^<!--\s*(run|skip):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
MPIEXEC = re.compile(r"^mpiexec -n (\d+)$")


@dataclasses.dataclass(frozen=True)
class Block:
    file: Path
    line: int           # 1-based line of the opening fence
    lang: str
    code: str
    action: str         # "python", "mpiexec", "shell", "skip" or "none"
    ranks: int = 1
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.file.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, with what the convention does with each. Raises
    ``ValueError`` naming the line for a directive that is malformed, does not stand before a
    block, or asks to run a block of the wrong language."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, directive, i = [], None, 0
    while i < len(lines):
        text = lines[i].strip()
        match = DIRECTIVE.match(text)
        if match:
            if directive is not None:
                raise ValueError(f"{path}:{directive[0]}: directive not followed by a code block")
            directive = (i + 1, match.group(1), match.group(2))
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            if text and directive is not None:
                raise ValueError(f"{path}:{directive[0]}: directive not followed by a code block")
            i += 1
            continue
        indent, ticks, lang = fence.group(1), fence.group(2), fence.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(ticks):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        code = "\n".join(body) + "\n"
        found.append(_classify(path, i + 1, lang, code, directive))
        directive, i = None, j + 1
    if directive is not None:
        raise ValueError(f"{path}:{directive[0]}: directive not followed by a code block")
    return found


def _classify(path: Path, line: int, lang: str, code: str,
              directive: tuple[int, str, str] | None) -> Block:
    if directive is None:
        return Block(path, line, lang, code, "python" if lang == "python" else "none")
    where, kind, arg = directive
    if kind == "skip":
        if not arg:
            raise ValueError(f"{path}:{where}: <!-- skip: --> needs a reason")
        return Block(path, line, lang, code, "skip", reason=arg)
    if arg == "shell":
        return Block(path, line, lang, code, "shell")
    ranks = MPIEXEC.match(arg)
    if ranks and lang == "python":
        return Block(path, line, lang, code, "mpiexec", ranks=int(ranks.group(1)))
    raise ValueError(f"{path}:{where}: unknown directive 'run: {arg}' before a {lang or 'plain'} "
                     f"block (use 'run: mpiexec -n N' before python, or 'run: shell')")


def markdown_files(root: Path) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
