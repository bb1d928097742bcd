"""``Status``: what a completed receive got (hpcml's own, so callers never touch mpi4py)."""

from __future__ import annotations

from typing import NamedTuple

from mpi4py import MPI

_BYTE = MPI.BYTE


class Status(NamedTuple):
    """What a completed receive got: sender, tag, and the number of elements and bytes."""

    source: int
    tag: int
    count: int
    nbytes: int


new_status = tuple.__new__  # Status(...) without the Python-level __new__ of a NamedTuple


def status_of(st: MPI.Status, itemsize: int) -> Status:
    """The :class:`Status` of a completed MPI operation whose buffer holds ``itemsize``-byte
    items."""
    n = st.Get_count(_BYTE)
    return new_status(Status, (st.Get_source(), st.Get_tag(), n // max(itemsize, 1), n))
