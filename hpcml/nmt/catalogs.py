"""A real English->French parallel corpus from the French message catalogs of Debian packages.

Every Debian system with French translations installed has ``/usr/share/locale/fr/LC_MESSAGES/
DOMAIN.mo``: the messages of a program (``msgid``, English) and their human translations
(``msgstr``, French) by the Translation Project and Debian's French team. :func:`extract`
reads the catalogs of :data:`DOMAINS` with the standard library's ``gettext`` parser and keeps
single-line pairs of 3 to 150 characters that contain a letter and are really translated
(``msgstr`` differs from ``msgid``; ``msgctxt`` prefixes are dropped; plural forms skipped), the
first occurrence of each English message in domain order. :func:`write` shuffles them with a
fixed seed and writes Moses/WMT layout: ``{train,valid,test}.{en,fr}`` (one sentence a line)
plus ``{split}.domain`` (the catalog each line came from, hence its licence) and
``SOURCES.tsv`` (domain, Debian package, version, licence, pairs kept).

Each translation is distributed under its package's licence (the convention of the catalogs'
headers), listed in :data:`DOMAINS`. Rebuild (same Debian package versions give the same files)::

    python -m hpcml.nmt.catalogs data/nmt/catalogs-en-fr
"""

from __future__ import annotations

import argparse
import gettext
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hpcml.errors import UsageError
from hpcml.nmt.text import write_pairs

LOCALE_DIR = "/usr/share/locale/fr/LC_MESSAGES"
# domain -> (Debian package, licence of the package and so of its translations)
DOMAINS: dict[str, tuple[str, str]] = {
    "coreutils": ("coreutils", "GPL-3+"), "bash": ("bash", "GPL-3+"), "tar": ("tar", "GPL-3+"),
    "grep": ("grep", "GPL-3+"), "sed": ("sed", "GPL-3+"), "findutils": ("findutils", "GPL-3+"),
    "diffutils": ("diffutils", "GPL-3+"), "make": ("make", "GPL-3+"),
    "wget": ("wget", "GPL-3+"), "gettext-tools": ("gettext", "GPL-3+"),
    "libc": ("libc-l10n", "LGPL-2.1+"), "dpkg": ("dpkg", "GPL-2+"), "apt": ("apt", "GPL-2+"),
    "libapt-pkg6.0": ("libapt-pkg6.0", "GPL-2+"), "git": ("git", "GPL-2"),
    "procps-ng": ("procps", "GPL-2+"), "psmisc": ("psmisc", "GPL-2+"),
    "man-db": ("man-db", "GPL-2+"), "adduser": ("adduser", "GPL-2+"),
}


def _keep(src: str, tgt: str) -> bool:
    return (src != tgt and "\n" not in src + tgt and 3 <= len(src) <= 150
            and 1 <= len(tgt) <= 200 and any(c.isalpha() for c in src))


def read_catalog(path: str | Path) -> list[tuple[str, str]]:
    """(English, French) pairs of one ``.mo`` file that pass the filter, in msgid order."""
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog
    pairs = []
    for key in sorted(k for k in catalog if isinstance(k, str) and k):
        src, tgt = key.split("\x04")[-1].strip(), str(catalog[key]).strip()
        if _keep(src, tgt):
            pairs.append((src, tgt))
    return pairs


def package_version(package: str) -> str:
    """The installed Debian version of ``package`` ('' without dpkg)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                             capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return out.stdout.strip()


def extract(locale_dir: str | Path = LOCALE_DIR) -> tuple[list[tuple[str, str, str]],
                                                          list[list[str]]]:
    """(pairs as (domain, English, French), SOURCES rows) from the catalogs in ``locale_dir``;
    the first pair of each English message wins. Raises ``UsageError`` when none is found."""
    seen: set[str] = set()
    pairs, sources = [], []
    for domain, (package, licence) in DOMAINS.items():
        path = Path(locale_dir) / f"{domain}.mo"
        if not path.is_file():
            continue
        kept = 0
        for src, tgt in read_catalog(path):
            if src not in seen:
                seen.add(src)
                pairs.append((domain, src, tgt))
                kept += 1
        sources.append([domain, package, package_version(package), licence, str(kept)])
    if not pairs:
        raise UsageError(f"--locale-dir: no French catalogs of {', '.join(DOMAINS)} in "
                         f"{locale_dir} (install the packages with their translations)")
    return pairs, sources


def write(out: str | Path, locale_dir: str | Path = LOCALE_DIR, valid: int = 500,
          test: int = 500, seed: int = 1234) -> dict[str, int]:
    """Extract, shuffle with ``seed`` and write the corpus into ``out``; returns pairs per
    split."""
    pairs, sources = extract(locale_dir)
    if valid + test >= len(pairs):
        raise UsageError(f"--valid/--test: {valid} + {test} pairs leave no training data out of "
                         f"{len(pairs)}")
    random.Random(seed).shuffle(pairs)
    parts = {"test": pairs[:test], "valid": pairs[test:test + valid],
             "train": pairs[test + valid:]}
    out = Path(out)
    for split, part in parts.items():
        write_pairs(out / split, "en", "fr", [(s, t) for _, s, t in part])
        (out / f"{split}.domain").write_text("".join(d + "\n" for d, _, _ in part))
    header = "domain\tpackage\tversion\tlicence\tpairs\n"
    (out / "SOURCES.tsv").write_text(header + "".join("\t".join(r) + "\n" for r in sources))
    return {split: len(part) for split, part in parts.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Extract the English-French message-catalog "
                                                 "corpus (Moses layout).")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--locale-dir", default=LOCALE_DIR)
    parser.add_argument("--valid", type=int, default=500)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    sizes = write(args.out, args.locale_dir, args.valid, args.test, args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
