"""Encoded distributed optimization with stragglers treated as erasures.

Karakus, Sun, Diggavi and Yin, "Straggler Mitigation in Distributed Optimization Through Data
Encoding" (NeurIPS 2017) and "Redundancy Techniques for Straggler Mitigation in Distributed
Optimization and Learning" (JMLR 20(72), 2019, arXiv 1803.05397).

Modules, one job each:
  fwht        fast Walsh-Hadamard transform (O(n log n))
  etf         Paley equiangular tight frames, coherence, Welch bound
  encoders    S and its worker row blocks: uncoded, replication, Gaussian, SRHT, ETF, sparse
  shards      streaming HDF5 -> one encoded HDF5 shard per worker
  problems    ridge / LASSO / logistic objectives, data sets, exact solutions
  ratings     collaborative-filtering data: MovieLens-like generator, digits, train/test split
  cf          per-user / per-item encoding, worker gradient, exact ALS (pure)
  runtime     master (rank 0) + workers (ranks 1..m): first k of m, late answers discarded
  algorithms  encoded GD, L-BFGS, proximal gradient, FISTA, asynchronous, encoded BCD
  solver      one collective solve: encode, distribute, optimize, evaluate
  mf          one collective collaborative-filtering solve on encoded data
  job, bench  job kinds ``coded`` and ``bench-coded``
  cf_bench    job kind ``bench-cf``
"""
