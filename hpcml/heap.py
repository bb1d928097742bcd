"""Freed large blocks stay in the process heap, so a training step reuses last step's memory.

glibc's ``malloc`` serves every allocation above its mmap threshold (dynamic, at most 32 MiB by
default) with a fresh ``mmap`` and gives it back with ``munmap`` when it is freed. A training
step allocates the same large tensors every step (the gradient of a 32,768 x 512 embedding is
64 MiB, so are its optimizer temporaries), so each of them is page-faulted in anew, zero page by
zero page, every step: at the NMT paper preset about 90,000 minor faults and 150-250 ms of
system time per step and rank, a quarter to a third of the step's CPU time (issue 26; the
numbers are in ``docs/guide/reduction-speed.md``). torch on a CPU has no caching allocator
that would hide this, as it does on a GPU.

:func:`configure` raises the mmap threshold and the trim threshold to 1 GiB (``mallopt``), so
freed blocks below that stay in the heap and the next step's allocations of the same sizes
reuse them without faults (after a few steps: while the heap's top grows, the first blocks may
still be mapped anew). The cost: between steps the resident set stays at the step's
high-water mark instead of falling back (the peak, ``VmHWM``, is what it was). Every hpcml job
makes this choice when it starts (:func:`hpcml.launch.execute`) and states it in ``env.json``
(``heap``); a malloc setting of the user's own (``GLIBC_TUNABLES`` naming ``glibc.malloc.``, or
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``) is never overridden. :func:`release`
returns the free heap memory to the system (``malloc_trim``), for code that measures one phase's
resident memory after another's. Not collective; no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import MutableMapping
from typing import Any

THRESHOLD = 1 << 30  # bytes: blocks below stay in the heap when freed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _libc() -> Any:
    """The process's C library when it has glibc's ``mallopt`` and ``malloc_trim``, else None."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def user_setting(environ: MutableMapping[str, str]) -> bool:
    """Whether ``environ`` carries a glibc malloc setting of the user's own."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") \
        or any(name in environ for name in _USER_VARIABLES)


def configure(environ: MutableMapping[str, str] = os.environ) -> dict[str, Any]:
    """Keep freed blocks below :data:`THRESHOLD` in the heap unless the user set malloc up;
    returns the decision for ``env.json``: ``keep_freed_below`` (bytes, None when unchanged)
    and ``set_by`` (``"hpcml"``, ``"user"``, or None where the C library is not glibc).
    Idempotent; affects allocations made after it."""
    global _DECISION
    if user_setting(environ):
        _DECISION = {"keep_freed_below": None, "set_by": "user"}
        return dict(_DECISION)
    libc = _libc()
    if libc is None or not (libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)
                            and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD)):
        _DECISION = {"keep_freed_below": None, "set_by": None}
    else:
        _DECISION = {"keep_freed_below": THRESHOLD, "set_by": "hpcml"}
    return dict(_DECISION)


def record() -> dict[str, Any]:
    """The decision :func:`configure` took in this process (``set_by`` None before it ran)."""
    return dict(_DECISION)


def release() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_DECISION: dict[str, Any] = {"keep_freed_below": None, "set_by": None}
