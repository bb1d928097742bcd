"""``import hpcml.horovod as hvd``: a drop-in for ``import horovod.torch as hvd`` in pure
Python, a face over :mod:`hpcml.comm` (collectives, ledger, abort) and :mod:`hpcml.parallel`
(``DistributedOptimizer``, buckets, broadcasts). Launch with ``mpiexec -n N python train.py``.

:mod:`.basics`: ``init`` and the process model; :mod:`.ops`: tensor collectives;
:mod:`.optimizer`: ``DistributedOptimizer`` and the broadcasts (and where they differ from
Horovod); :mod:`.compression`: ``Compression``; :mod:`.join`: ``join()``; :mod:`.elastic`:
``TorchState`` and ``run`` over checkpoints and restarts; :mod:`.sync_batch_norm`:
``SyncBatchNorm``. Not implemented (refused with one line where called): Adasum. The launcher:
``hpcml horovodrun -np N python train.py`` (:mod:`hpcml.horovodrun`) or ``mpiexec -n N``.
"""

from hpcml.horovod import elastic
from hpcml.horovod.basics import (
    Adasum,
    Average,
    HorovodInternalError,
    Max,
    Min,
    ProcessSet,
    Product,
    Sum,
    add_process_set,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    global_process_set,
    gloo_built,
    gloo_enabled,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    poll,
    rank,
    remove_process_set,
    rocm_built,
    shutdown,
    size,
    synchronize,
)
from hpcml.horovod.compression import Compression
from hpcml.horovod.join import join
from hpcml.horovod.ops import (
    allgather,
    allgather_async,
    allgather_object,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    alltoall,
    alltoall_async,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    broadcast_object,
    grouped_allgather,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter,
    reducescatter,
    reducescatter_async,
    sparse_allreduce_async,
)
from hpcml.horovod.optimizer import (
    DistributedOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from hpcml.horovod.sync_batch_norm import SyncBatchNorm

__all__ = [
    "Adasum", "Average", "Compression", "DistributedOptimizer", "HorovodInternalError", "Max",
    "Min", "ProcessSet",
    "Product", "Sum", "SyncBatchNorm", "add_process_set", "allgather", "allgather_async",
    "allgather_object", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "alltoall", "alltoall_async", "barrier", "broadcast", "broadcast_", "broadcast_async",
    "broadcast_async_", "broadcast_object", "broadcast_optimizer_state", "broadcast_parameters",
    "elastic",
    "ccl_built", "cross_rank", "cross_size", "cuda_built", "ddl_built", "global_process_set",
    "gloo_built", "gloo_enabled", "grouped_allgather", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "grouped_reducescatter", "init", "is_homogeneous", "is_initialized", "join", "local_rank",
    "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll",
    "rank", "reducescatter", "reducescatter_async", "remove_process_set", "rocm_built",
    "shutdown", "size", "sparse_allreduce_async", "synchronize",
]
