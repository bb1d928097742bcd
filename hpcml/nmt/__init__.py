"""Data-parallel transformer NMT with sparse-allgather vs dense-allreduce gradient exchange
(arXiv 1905.04035; see shared/PAPERS.md §1).

Modules: :mod:`vocab` (tokenizer, vocabulary), :mod:`corpus` (deterministic parallel corpus ->
HDF5), :mod:`data` (rank-sharded HDF5 loader), :mod:`model` (encoder-decoder transformer with
tied, sparse-gradient embeddings), :mod:`qsparse` (the ``[qsparse]`` section:
Qsparse-local-SGD instead of :mod:`hpcml.parallel` data parallelism), :mod:`state` (broadcast,
checkpoints), :mod:`decode` (greedy/beam decoding + BLEU), :mod:`train` (job kind
``transformer-nmt``), :mod:`bench` (job kind ``bench-reduction``).
At the paper's scale: :mod:`synthetic` (Zipf token batches, 32k vocabulary), :mod:`projection`
(measured rows -> Stampede2), :mod:`peers` (torch DDP, Horovod). Real text: :mod:`text`
(aligned Moses/TSV files), :mod:`subword` (joint SentencePiece model -> HDF5 corpus),
:mod:`catalogs` (English-French corpus from Debian's message catalogs), :mod:`buckets`
(length-bucketed token batches), :mod:`beam` (beam search).
"""
