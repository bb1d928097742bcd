"""The hpcml NMT transformer trained tensor x data parallel with ZeRO-1, in plain PyTorch.

    mpiexec -n 4 python examples/tensor_parallel_nmt.py --tensor 2   # data 2 x tensor 2
    mpiexec -n 2 python examples/tensor_parallel_nmt.py --tensor 2   # tensor parallel only
    python examples/tensor_parallel_nmt.py                           # one process works too

The task is synthetic (reverse a random token sequence), so the script needs no data set. Each
tensor-parallel group holds one copy of the model split over its T ranks (attention heads,
feed-forward columns/rows, vocabulary rows of the tied embedding); the D groups see different
batches and the optimizer state of every parameter shard is split D ways again (ZeRO-1). The
hpcml lines are marked ``# hpcml``; the full-state checkpoint loads into one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import hpcml.parallel
from hpcml.comm import install_excepthook, world
from hpcml.nmt.model import Transformer
from hpcml.nmt.vocab import BOS, PAD
from hpcml.parallel import Mesh


def batch(gen: torch.Generator, rows: int, length: int, vocab: int,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source ids and the reversed target (with BOS in front for teacher forcing)."""
    src = torch.randint(4, vocab, (rows, length), generator=gen)
    tgt = torch.cat([torch.full((rows, 1), BOS), src.flip(1)], dim=1)
    return src, tgt[:, :-1], tgt[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree T")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="global batch (divisible by D)")
    parser.add_argument("--d-model", type=int, default=32, help="model width")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="write the full (single-process) state dict here (rank 0)")
    args = parser.parse_args()
    install_excepthook()
    comm = world()
    if comm.size % args.tensor:
        parser.error(f"--tensor {args.tensor} must divide the {comm.size} ranks")
    mesh = Mesh(comm, data=comm.size // args.tensor, tensor=args.tensor)  # hpcml
    tp, dp = mesh["tensor"], mesh["data"]
    if args.batch % dp.size:
        parser.error(f"--batch {args.batch} must be divisible by the data degree {dp.size}")

    torch.manual_seed(0)  # the same full model on every rank; parallelize slices it
    vocab = 40
    model = Transformer(vocab, d_model=args.d_model, heads=4, layers=2, ff=2 * args.d_model,
                        dropout=0.0, sparse=False)
    hpcml.parallel.parallelize(model, tp)  # hpcml
    optimizer = hpcml.parallel.ShardedOptimizer(model.parameters(), torch.optim.Adam,  # hpcml
                                                dp, lr=3e-3)
    data = torch.Generator().manual_seed(1 + dp.rank)  # each data-parallel group its own data
    rows = args.batch // dp.size
    for step in range(args.steps):
        src, tgt_in, tgt_out = batch(data, rows, 8, vocab)
        optimizer.zero_grad()
        loss = hpcml.parallel.vocab_parallel_cross_entropy(  # hpcml
            model(src, tgt_in), tgt_out, tp, vocab_start=model.embed.vocab_start,
            vocab_size=model.embed.num_embeddings, ignore_index=PAD)
        loss.backward()
        optimizer.step()
        if comm.rank == 0 and (step + 1) % 20 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)

    state = hpcml.parallel.full_state_dict(model, tp)  # hpcml: gathers the shards
    if args.checkpoint is not None and comm.rank == 0:
        torch.save(state, args.checkpoint)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    full = sum(v.numel() * v.element_size() for v in state.values())
    if comm.rank == 0:
        print(f"{comm.size} ranks (data {dp.size} x tensor {tp.size}), {args.steps} steps: "
              f"loss {loss.item():.4f}; rank 0 holds {params} of {full} parameter bytes and "
              f"{optimizer.state_bytes()} optimizer-state bytes", flush=True)


if __name__ == "__main__":
    main()
