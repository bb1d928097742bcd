"""Variable-length allgather, and the sparse-gradient exchange built on it.

:func:`allgatherv` concatenates every rank's rows whatever their number (``Allgather`` of the
counts, then ``Allgatherv``); the sparse-gradient reduction and Qsparse's payload exchange both
use it. :func:`allgather_sparse` is Horovod's gather of TensorFlow ``IndexedSlices`` that arXiv
1905.04035 replaced: each rank contributes its gradient's row indices and rows as they are
(uncoalesced), every rank receives all P payloads — ``sum_r nnz_r x (row_bytes + 8)`` bytes,
growing linearly with P — and sums them into one sparse tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpcml.comm import Communicator
from hpcml.parallel.memory import ExchangeMemory


def gather_counts(comm: Communicator, n: int) -> np.ndarray:
    """Every rank's ``n``, in rank order (int64). Collective."""
    counts = np.zeros(comm.size, dtype=np.int64)
    comm.Allgather(np.array([n], dtype=np.int64), counts)
    return counts


def allgatherv(comm: Communicator, send: Any, counts: np.ndarray | None = None) -> Any:
    """Every rank's ``send`` (numpy array or tensor, any number of rows along dim 0, the other
    dimensions equal on all ranks) concatenated in rank order; a new array of the same kind and
    dtype. ``counts`` (rows per rank, from :func:`gather_counts`) saves one ``Allgather`` when
    the caller knows them. Collective."""
    if counts is None:
        counts = gather_counts(comm, len(send))
    rows = int(counts.sum())
    row = int(np.prod(send.shape[1:]))
    if isinstance(send, torch.Tensor):
        recv = torch.empty((rows, *send.shape[1:]), dtype=send.dtype, device=send.device)
        flat_send, flat_recv = send.contiguous().view(-1), recv.view(-1)
    else:
        recv = np.empty((rows, *send.shape[1:]), dtype=send.dtype)
        flat_send, flat_recv = np.ascontiguousarray(send).reshape(-1), recv.reshape(-1)
    comm.Allgatherv(flat_send, flat_recv, (counts * row).tolist())
    return recv


def allgather_sparse(comm: Communicator, grad: torch.Tensor,
                     memory: ExchangeMemory | None = None) -> torch.Tensor:
    """Sum over ranks of the sparse COO ``grad`` (rows = dim 0), coalesced. Collective.

    ``memory`` (if given) is charged with the received payloads and the coalesced result while
    they are alive."""
    memory = memory if memory is not None else ExchangeMemory()
    idx = grad._indices()[0]
    vals = grad._values()
    counts = gather_counts(comm, idx.numel())
    total = int(counts.sum())
    payload = total * 8 + total * int(np.prod(grad.shape[1:])) * vals.element_size() \
        + counts.nbytes
    memory.alloc(payload)
    all_idx = allgatherv(comm, idx, counts)
    all_vals = allgatherv(comm, vals, counts)
    summed = torch.sparse_coo_tensor(all_idx.unsqueeze(0), all_vals, grad.shape,
                                     check_invariants=False).coalesce()
    result_bytes = summed._indices().nbytes + summed._values().nbytes
    memory.alloc(result_bytes)
    memory.free(payload + result_bytes)
    return summed


def densify_into(grad: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> None:
    """Write ``scale * grad`` (``grad`` dense, or sparse COO possibly uncoalesced) into ``out``
    (same numel), in one pass over ``out`` for a dense ``grad``."""
    if grad.is_sparse:
        out.zero_()
        add_into(grad, out.view(grad.shape), scale)
    elif scale == 1.0:
        out.copy_(grad.reshape(-1))
    else:  # detached: out= refuses a gradient with a graph (backward(create_graph=True))
        torch.mul(grad.detach().reshape(-1), scale, out=out)


def add_into(grad: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> None:
    """``out += scale * grad`` for ``grad`` dense or sparse COO (possibly uncoalesced) of
    ``out``'s shape; a COO gradient of whole rows is added by one ``index_add_``."""
    if grad.is_sparse and grad.sparse_dim() == 1:
        # The values are scaled first: bfloat16's index_add_(alpha=) rounds otherwise than the
        # unscaled sum scaled afterwards, even for alpha = 1/2.
        values = grad._values().to(out.dtype)
        out.index_add_(0, grad._indices()[0], values if scale == 1.0 else values * scale)
    elif scale == 1.0:  # no alpha: an integer ``out`` refuses a float one
        out.add_(grad.to(out.dtype))
    else:
        out.add_(grad.to(out.dtype), alpha=scale)
