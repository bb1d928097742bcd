"""The reference implementations the reduction benchmark runs beside hpcml's exchanges.

- torch DDP over gloo: ``torch.distributed`` is initialised once per process with rank and size
  from the hpcml communicator and a TCP rendezvous on rank 0 (127.0.0.1 when all ranks share a
  node, else rank 0's host name) at a free port that rank 0 picks and broadcasts. DDP gets the
  all-dense model (``sparse=False``): its buckets are allreduced during backward, the dense
  path of the paper. ``ddp_hpcml`` is the same DDP on a group of every rank on the ``"hpcml"``
  backend (:mod:`hpcml.distributed`), beside gloo's default group.
- Horovod (``hvd.DistributedOptimizer``) with ``sparse_as_dense=True`` (the paper's fix) or
  ``False`` (Horovod's allgather of sparse gradients), only where ``horovod.torch`` imports
  (``make horovod``); :func:`horovod_unavailable` says why not otherwise. The same peer runs
  over ``hpcml.horovod`` (``hvd=hpcml.horovod``) for the benchmark's ``hpcml_horovod`` method.
"""

from __future__ import annotations

import socket
from types import ModuleType

import torch
from torch import nn

from hpcml.comm import Communicator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_gloo(comm: Communicator) -> None:
    """Initialise the default torch.distributed process group (gloo) once. Collective."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    single_node = comm.split_shared().size == comm.size
    host = "127.0.0.1" if single_node else socket.gethostname()
    addr = comm.bcast((host, _free_port()) if comm.rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"tcp://{addr[0]}:{addr[1]}",
                            rank=comm.rank, world_size=comm.size)


DDP_BACKENDS = {"ddp": "gloo", "ddp_hpcml": "hpcml"}  # bench method -> torch backend


def ddp(comm: Communicator, model: nn.Module, bucket_bytes: int,
        backend: str = "gloo") -> nn.Module:
    """``model`` wrapped in DistributedDataParallel over ``backend`` ("gloo": the default
    group; "hpcml": :func:`hpcml.distributed.world_group`). Collective."""
    init_gloo(comm)
    group = None
    if backend == "hpcml":
        import hpcml.distributed

        group = hpcml.distributed.world_group()
    return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_bytes / 2**20,
                                               process_group=group)


def torch_allreduce_bytes(comm: Communicator) -> int:
    """Bytes the ledger counts as received by the allreduces of torch.distributed's ``"hpcml"``
    groups: DDP's gradient exchange (not its per-step broadcast of module buffers, which the
    ``ddp`` row's convention leaves out too)."""
    return sum(v["bytes_received"] for k, v in comm.ledger.totals().items()
               if k.startswith("torch.") and k.endswith("Iallreduce"))


def ddp_bucket_bytes(model: nn.Module) -> int | None:
    """Bytes of DDP's gradient buckets as its reducer reports them (after one backward)."""
    sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
    values = [int(s) for s in sizes.split(",") if s.strip()]
    return sum(values) if values else None


def horovod_unavailable() -> str | None:
    """``None`` when ``horovod.torch`` imports, else the reason (first line of the error)."""
    try:
        import horovod.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip Horovod"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


class HorovodPeer:
    """Horovod's DistributedOptimizer around ``optimizer`` (``sparse_as_dense=True``: the paper's
    fix; ``False``: Horovod's allgather of sparse gradients), after broadcasting rank 0's
    parameters. :meth:`step` waits for Horovod's reductions, densifies the averaged sparse
    gradients (torch's Adam takes dense gradients only) and updates without synchronizing again
    (Horovod's ``skip_synchronize``). Only build it when :func:`horovod_unavailable` is None.
    Collective. ``hvd``: the Horovod module (``None``: ``horovod.torch``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 sparse_as_dense: bool, hvd: ModuleType | None = None) -> None:
        if hvd is None:
            import horovod.torch as hvd

        hvd.init()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.model = model
        self.optimizer = hvd.DistributedOptimizer(optimizer,
                                                  named_parameters=model.named_parameters(),
                                                  sparse_as_dense=sparse_as_dense)
        self.param_groups = self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Horovod's zero_grad takes no arguments and always sets gradients to None."""
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.optimizer.synchronize()
        for p in self.model.parameters():
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()
        with self.optimizer.skip_synchronize():
            self.optimizer.step()
