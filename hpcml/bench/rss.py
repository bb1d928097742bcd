"""Process peak resident memory (Linux ``/proc``), resettable so that phases of one process can
be measured one after the other."""

from __future__ import annotations

from pathlib import Path

from hpcml import heap


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (``VmHWM``) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (writes 5 to ``/proc/self/clear_refs``, Linux >= 4.0)
    after giving the heap's free memory back to the system (:func:`hpcml.heap.release`: blocks
    an earlier phase freed do not count for the next); False when the kernel does not allow it
    (then the peak keeps covering earlier phases)."""
    heap.release()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
