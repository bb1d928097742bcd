"""A Horovod-style training script (the API surface of Horovod's pytorch_synthetic_benchmark.py
and pytorch_mnist.py) on hpcml.horovod: the only hpcml line is the import.

    hpcml horovodrun -np 4 python examples/horovod_train.py [--fp16-allreduce] [--check]

A small CNN on synthetic 16x16 images: init, seed, broadcast of parameters and optimizer state,
DistributedOptimizer with named parameters (and fp16 compression), timed steps, the metric
averaged with allreduce, throughput summed over ranks. ``--check`` (float64): every rank also
trains one process's copy on the concatenated batch and the script fails unless the parameters
agree to 1e-10 (1e-3 with ``--fp16-allreduce``: gradients travel rounded to float16).
"""

import argparse
import copy
import timeit

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's convention)
from torch import nn

import hpcml.horovod as hvd  # was: import horovod.torch as hvd


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--fp16-allreduce", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(42)
    dtype = torch.float64 if args.check else torch.float32
    model = Net().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size(), momentum=0.9)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    reference = Net().to(dtype)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01 * hvd.size(), momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not sharing buffers

    n, r, b = hvd.size(), hvd.rank(), args.batch_size
    g = torch.Generator().manual_seed(7)

    def benchmark_step() -> float:
        data = torch.randn(n * b, 3, 16, 16, generator=g, dtype=dtype)
        target = torch.randint(0, 10, (n * b,), generator=g)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data[r * b:(r + 1) * b]), target[r * b:(r + 1) * b])
        loss.backward()
        optimizer.step()
        if args.check:
            ref_opt.zero_grad()
            F.cross_entropy(reference(data), target).backward()
            ref_opt.step()
        return loss.item()

    seconds = timeit.timeit(benchmark_step, number=args.num_iters)
    loss = hvd.allreduce(torch.tensor(benchmark_step()), name="loss").item()
    rate = hvd.allreduce(torch.tensor(b * args.num_iters / seconds), op=hvd.Sum).item()
    if args.check:
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            if not torch.allclose(p, q, atol=1e-3 if args.fp16_allreduce else 1e-10, rtol=0):
                raise SystemExit(f"rank {r}: {name} differs from one process by "
                                 f"{(p - q).abs().max().item():.3g}")
    if r == 0:
        print(f"ranks {n}: loss {loss:.4f}, {rate:.1f} img/sec in total (loaded machine: not a "
              "benchmark)" + (", parameters: matches one process" if args.check else ""))


if __name__ == "__main__":
    main()
