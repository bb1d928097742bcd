"""Shared output of benchmarks: markdown tables, statistics and plots."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a markdown table; ``columns`` = (key, header, format spec like ``.3f``)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r[k] is not None else "-" for k, _, f in columns)
            + " |" for r in rows]
    return "\n".join([head, rule, *body])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n} B"


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (ranks have no display); imported
    on first use so that jobs which never plot do not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Any) -> None:
    """Save a matplotlib figure atomically (PNG) and close it (frees its memory)."""
    import io

    from hpcml.rundir import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
    pyplot().close(fig)
