"""The hpcml NMT transformer split into pipeline stages, combined with tensor parallelism or with
ZeRO-1 optimizer-state sharding, in plain PyTorch.

    mpiexec -n 4 python examples/pipeline_hybrid_nmt.py --pipeline 2 --tensor 2   # PP x TP
    mpiexec -n 4 python examples/pipeline_hybrid_nmt.py --pipeline 2 --zero       # DP x PP x ZeRO-1
    mpiexec -n 2 python examples/pipeline_hybrid_nmt.py --pipeline 2              # PP only

The task is synthetic (reverse a random token sequence), so the script needs no data set. The
order is the one :mod:`hpcml.parallel.pipeline` documents: (1) ``parallelize`` the whole model
over ``mesh.tensor``, (2) wrap it in a ``PipelineModel`` (``data_reduction="optimizer"`` when a
sharded optimizer reduces the gradients), (3) build the optimizer over ``pmodel.parameters()``.
The last stage computes the vocabulary-parallel loss. The hpcml lines are marked ``# hpcml``;
the checkpoint it writes is the single-process state dict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import hpcml.parallel as hp
from hpcml.comm import install_excepthook, world
from hpcml.nmt.model import Transformer
from hpcml.nmt.vocab import BOS, PAD

VOCAB = 40


def batch(gen: torch.Generator, rows: int, length: int,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source ids and the reversed target (with BOS in front for teacher forcing)."""
    src = torch.randint(4, VOCAB, (rows, length), generator=gen)
    tgt = torch.cat([torch.full((rows, 1), BOS), src.flip(1)], dim=1)
    return src, tgt[:, :-1], tgt[:, 1:]


@hp.step  # hpcml: runs once per microbatch on every stage
def train_step(model, src, tgt_in, tgt_out, tp, tokens):
    logits = model(src, tgt_in)  # this tensor rank's vocabulary slice of the logits
    embed = model.module.embed  # its vocabulary slice: [vocab_start, vocab_start + local)
    loss = hp.vocab_parallel_cross_entropy(logits, tgt_out, tp, ignore_index=PAD,  # hpcml
                                           vocab_start=embed.vocab_start,
                                           vocab_size=embed.num_embeddings,
                                           reduction="sum") / tokens
    model.backward(loss)  # hpcml: instead of loss.backward()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=int, default=2, help="pipeline stages S")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree T")
    parser.add_argument("--zero", action="store_true",
                        help="shard Adam's state over the data replicas (ZeRO-1)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="global batch (divisible by 4 D)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="write the full (single-process) state dict here")
    args = parser.parse_args()
    install_excepthook()
    comm = world()
    mesh = hp.Mesh(comm, pipeline=args.pipeline, tensor=args.tensor)  # hpcml; data: the rest
    data, replica = mesh.sizes["data"], mesh.coords["data"]
    if args.batch % (4 * data):
        parser.error(f"--batch {args.batch} must split into {data} replicas x 4 microbatches")

    torch.manual_seed(0)  # the same full model on every rank
    model = Transformer(VOCAB, d_model=32, heads=4, layers=2, ff=64, dropout=0.0, sparse=False)
    hp.parallelize(model, mesh.tensor)  # hpcml (1): heads, feed-forward, vocabulary split
    sample = batch(torch.Generator().manual_seed(0), args.batch // (4 * data), 8)[:2]
    gen = torch.Generator().manual_seed(1)  # the same global batches on every rank
    pmodel = hp.PipelineModel(model, mesh, sample=sample, microbatches=4,  # hpcml (2)
                              data_reduction="optimizer" if args.zero else "allreduce")
    if args.zero:  # hpcml (3): this rank's parameters, Adam state split over mesh.data
        opt = hp.ShardedOptimizer(pmodel.parameters(), torch.optim.Adam, mesh.data, lr=3e-3)
    else:
        opt = torch.optim.Adam(pmodel.parameters(), lr=3e-3)
    for step in range(args.steps):
        src, tgt_in, tgt_out = (t.tensor_split(data)[replica] for t in batch(gen, args.batch, 8))
        opt.zero_grad()
        out = train_step(pmodel, src, tgt_in, tgt_out, mesh.tensor, tgt_out.numel())
        opt.step()
        # the last stage's loss (collective over the pipeline), averaged over the replicas
        loss = mesh.data.allreduce(out.reduce_sum()) / data
        if comm.rank == 0 and (step + 1) % 20 == 0:
            print(f"step {step + 1}: loss {loss:.4f}", flush=True)
    if args.checkpoint is not None:
        pmodel.save(args.checkpoint)  # hpcml: tensor shards and stages gathered
    held = comm.allgather(sum(p.numel() * p.element_size() for p in pmodel.parameters()))
    if comm.rank == 0:
        full = sum(p.numel() * p.element_size() for p in
                   Transformer(VOCAB, d_model=32, heads=4, layers=2, ff=64).parameters())
        print(pmodel.partition_table())
        print(f"{comm.size} ranks ({mesh}), {args.steps} steps: loss {loss:.4f}; parameter "
              f"bytes per rank {held} of {full}", flush=True)


if __name__ == "__main__":
    main()
