"""Data-parallel transformer NMT with sparse-allgather vs dense-allreduce gradient exchange
(arXiv 1905.04035; see shared/PAPERS.md §1).

Modules: :mod:`vocab` (tokenizer, vocabulary), :mod:`corpus` (deterministic parallel corpus ->
HDF5), :mod:`data` (rank-sharded HDF5 loader), :mod:`model` (encoder-decoder transformer with
tied, sparse-gradient embeddings), :mod:`qsparse` (the ``[qsparse]`` section:
Qsparse-local-SGD instead of :mod:`hpcml.parallel` data parallelism), :mod:`state` (broadcast,
checkpoints), :mod:`decode` (greedy decoding + BLEU), :mod:`train` (job kind
``transformer-nmt``), :mod:`bench` (job kind ``bench-reduction``).
"""
