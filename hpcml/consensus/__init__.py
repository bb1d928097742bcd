"""Differentially private consensus-based distributed optimization (Showkatbakhsh, Karakus &
Diggavi; shared/PAPERS.md §4).

Modules, one job each: :mod:`~hpcml.consensus.topology` (graphs), :mod:`~.mixing` (W and its
checks), :mod:`~.accounting` (noise calibration and the privacy ledger), :mod:`~.tasks` (local
objectives on real data), :mod:`~.algorithm` (the round, the simulation and the MPI run),
:mod:`~.theory` (expected MSE in closed form), :mod:`~.job` (kind ``consensus``) and
:mod:`~.bench` (kind ``bench-consensus``).
"""
