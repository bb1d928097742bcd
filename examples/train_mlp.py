"""Data-parallel training of an MLP on the digits images with hpcml.parallel, in plain PyTorch.

    mpiexec -n 4 python examples/train_mlp.py            # or: srun python examples/train_mlp.py
    python examples/train_mlp.py --steps 100             # one process works too

Every rank holds the whole model and computes the loss of its slice of each global batch;
``DistributedOptimizer`` averages the gradients over the ranks while ``backward()`` runs, so the
run takes the same steps as one process on the global batch. The only hpcml lines are the three
marked ``# hpcml``; the rest is an ordinary PyTorch loop (scheduler and checkpoint included).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import torch
from torch import nn

import hpcml.parallel
from hpcml.comm import install_excepthook, world

DATA = Path(__file__).resolve().parents[1] / "data" / "qsparse" / "digits.h5"


def load(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with h5py.File(path, "r") as h5:
        x = torch.from_numpy(h5[f"{split}/x"][:]).float() / 16.0
        y = torch.from_numpy(h5[f"{split}/y"][:]).long()
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="digits HDF5 file")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=64, help="global batch (divisible by ranks)")
    parser.add_argument("--micro", type=int, default=1,
                        help="micro-batches accumulated per step (backward_passes_per_step)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="write model + optimizer state here at the end (rank 0)")
    args = parser.parse_args()
    install_excepthook()  # an exception on one rank ends the whole job instead of hanging it
    comm = world()
    if args.batch % (comm.size * args.micro):
        parser.error(f"--batch {args.batch} must be divisible by ranks x --micro = "
                     f"{comm.size * args.micro}")

    x, y = load(args.data, "train")
    torch.manual_seed(comm.rank)  # deliberately different initial weights on every rank ...
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    optimizer = hpcml.parallel.DistributedOptimizer(optimizer, model,  # hpcml
                                                    backward_passes_per_step=args.micro)
    hpcml.parallel.broadcast_parameters(model)  # hpcml: ... made identical here
    hpcml.parallel.broadcast_optimizer_state(optimizer)  # hpcml
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    share = args.batch // comm.size // args.micro  # rows per rank per micro-batch
    order = torch.Generator().manual_seed(0)  # the same global batches on every rank
    for step in range(args.steps):
        batch = torch.randint(len(y), (args.batch,), generator=order)
        mine = batch[comm.rank * args.micro * share:(comm.rank + 1) * args.micro * share]
        optimizer.zero_grad()
        loss_sum = 0.0
        for m in range(args.micro):
            rows = mine[m * share:(m + 1) * share]
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows]) / args.micro
            loss.backward()
            loss_sum += loss.item()
        optimizer.step()
        scheduler.step()
        if comm.rank == 0 and (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss_sum:.4f} (rank 0's share)", flush=True)

    x_test, y_test = load(args.data, "test")
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    checksum = sum(p.double().sum().item() for p in model.parameters())
    if args.checkpoint is not None and comm.rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                   args.checkpoint)
    if comm.rank == 0:
        waited = comm.ledger.totals().get("Iallreduce", {})
        print(f"{comm.size} ranks, {args.steps} steps: test accuracy {accuracy:.4f}, "
              f"parameter checksum {checksum:.6f}; gradient allreduce: "
              f"{waited.get('seconds', 0.0):.3f} s waited, "
              f"{waited.get('outstanding_seconds', 0.0):.3f} s in flight", flush=True)


if __name__ == "__main__":
    main()
