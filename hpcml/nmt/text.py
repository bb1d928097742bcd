"""Aligned parallel text: Moses/WMT layout or TSV (pure functions, no MPI).

- **Moses/WMT layout**: ``PREFIX.SRC`` and ``PREFIX.TGT`` (e.g. ``train.en`` / ``train.fr``),
  UTF-8, one sentence a line, line i of one the translation of line i of the other;
- **TSV**: ``PREFIX.tsv``, one pair a line, ``source<TAB>target``.

:func:`read_pairs` reads whichever exists (the two-file layout first) and refuses misaligned
input with a one-line ``UsageError`` naming the file and the line. Lines are stripped of their
line break only (``\\r\\n`` too) and of surrounding white space; empty pairs are an error, since
they break the alignment of everything after them in WMT data. :func:`write_pairs` writes the
two-file layout, so ``read_pairs(write_pairs(p, ...))`` returns the pairs unchanged (for
stripped, single-line text).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hpcml.errors import UsageError


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); convert it "
                         "with iconv -t utf-8") from None
    return [line.strip() for line in text.splitlines()]


def _check(path: Path, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for i, (src, tgt) in enumerate(pairs, 1):
        if not src or not tgt:
            raise UsageError(f"{path}: line {i} has an empty side (remove the pair from both "
                             "sides to keep the files aligned)")
    return pairs


def read_pairs(prefix: str | Path, src: str, tgt: str) -> list[tuple[str, str]]:
    """(source, target) pairs of ``PREFIX.SRC`` + ``PREFIX.TGT`` or else ``PREFIX.tsv``."""
    prefix = Path(prefix)
    a, b = Path(f"{prefix}.{src}"), Path(f"{prefix}.{tgt}")
    if a.is_file() and b.is_file():
        left, right = _lines(a), _lines(b)
        if len(left) != len(right):
            raise UsageError(f"{b}: {len(right)} lines but {a} has {len(left)} (the two sides "
                             "of a parallel corpus must have one line per sentence each)")
        return _check(a, list(zip(left, right, strict=True)))
    tsv = Path(f"{prefix}.tsv")
    if tsv.is_file():
        pairs = []
        for i, line in enumerate(_lines(tsv), 1):
            fields = line.split("\t")
            if len(fields) != 2:
                raise UsageError(f"{tsv}: line {i} has {len(fields)} tab-separated fields, "
                                 "not 2 (source<TAB>target)")
            pairs.append((fields[0].strip(), fields[1].strip()))
        return _check(tsv, pairs)
    raise UsageError(f"{prefix}: neither {a.name} + {b.name} nor {tsv.name} found (give the "
                     "path without the language suffix)")


def write_pairs(prefix: str | Path, src: str, tgt: str,
                pairs: Sequence[tuple[str, str]]) -> Path:
    """Write ``PREFIX.SRC`` and ``PREFIX.TGT`` (creating the directory); returns ``prefix``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for side, lang in ((0, src), (1, tgt)):
        Path(f"{prefix}.{lang}").write_text("".join(p[side] + "\n" for p in pairs),
                                            encoding="utf-8")
    return prefix
