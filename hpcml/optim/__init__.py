"""Optimizers: MADA and AVGrad (arXiv 2401.08893), the baselines they are compared with, and
the language-model benchmark ``hpcml bench optimizers``."""

from hpcml.optim.avgrad import AVGrad
from hpcml.optim.mada import COEFFICIENTS, MADA, RANGES

__all__ = ["AVGrad", "COEFFICIENTS", "MADA", "RANGES"]
