"""Sparse allgather of assumed-sparse gradients: the baseline that arXiv 1905.04035
replaced (Horovod's gather of TensorFlow ``IndexedSlices``).

Each rank contributes its gradient's row indices and rows as they are (uncoalesced, as
Horovod's allgather of ``IndexedSlices`` did); every rank receives all P payloads
(``Allgatherv`` of indices, then of values), so the receive buffers hold
``sum_r nnz_r x (row_bytes + 8)`` bytes — growing linearly with P — before they are summed
(coalesced) into one sparse tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcml.comm import Communicator
from hpcml.nmt.exchange.memory import ExchangeMemory
from hpcml.nmt.exchange.strategy import ALLGATHER, Strategy


def allgather_sparse(comm: Communicator, grad: torch.Tensor,
                     memory: ExchangeMemory | None = None) -> torch.Tensor:
    """Sum over ranks of the sparse COO ``grad`` (rows = dim 0), coalesced. Collective.

    ``memory`` (if given) is charged with the received payloads and the coalesced result while
    they are alive."""
    memory = memory if memory is not None else ExchangeMemory()
    idx = grad._indices()[0].contiguous()
    vals = grad._values().contiguous()
    row = int(np.prod(grad.shape[1:]))
    counts = np.zeros(comm.size, dtype=np.int64)
    comm.Allgather(np.array([idx.numel()], dtype=np.int64), counts)
    total = int(counts.sum())
    all_idx = torch.empty(total, dtype=torch.long)
    all_vals = torch.empty((total, *grad.shape[1:]), dtype=vals.dtype)
    payload = all_idx.nbytes + all_vals.nbytes + counts.nbytes
    memory.alloc(payload)
    comm.Allgatherv(idx, all_idx, counts.tolist())
    comm.Allgatherv(vals.view(-1), all_vals.view(-1), (counts * row).tolist())
    summed = torch.sparse_coo_tensor(all_idx.unsqueeze(0), all_vals, grad.shape,
                                     check_invariants=False).coalesce()
    result_bytes = summed._indices().nbytes + summed._values().nbytes
    memory.alloc(result_bytes)
    memory.free(payload + result_bytes)
    return summed


class SparseAllgather(Strategy):
    """Sparse gradients by allgather; dense ones in fused allreduce buckets (Horovod default)."""

    name = "sparse_allgather"

    def fused(self, sparse: bool) -> bool:
        return not sparse

    def choose(self, nnz_max: int, rows: int, row_bytes: int, size: int) -> str:
        return ALLGATHER
