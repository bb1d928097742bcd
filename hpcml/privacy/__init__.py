"""Private release of linear-regression data (Showkatbakhsh, Karakus & Diggavi, arXiv
1902.04688; shared/PAPERS.md §5): additive noise and random projection plus noise, measured by
mutual-information differential privacy and the relative objective error of least squares."""
