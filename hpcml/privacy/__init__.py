"""Private release of linear-regression data (Showkatbakhsh, Karakus & Diggavi, arXiv
1902.04688; shared/PAPERS.md §5): additive noise and random projection plus noise, measured by
mutual-information differential privacy and the relative objective error of least squares
(:mod:`~hpcml.privacy.midp`, :mod:`~hpcml.privacy.release`, :mod:`~hpcml.privacy.bench`); and
where every privacy noise in hpcml comes from (:mod:`~hpcml.privacy.noise`: secret OS entropy
by default)."""
