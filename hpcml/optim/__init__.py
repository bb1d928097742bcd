"""Optimizers: MADA and AVGrad (arXiv 2401.08893), the baselines they are compared with, and
the language-model benchmark ``hpcml bench optimizers``."""

from hpcml.optim.avgrad import AVGrad
from hpcml.optim.distributed import average_hypergradient
from hpcml.optim.mada import COEFFICIENTS, MADA, RANGES
from hpcml.optim.registry import OPTIMIZERS, build_optimizer

__all__ = ["AVGrad", "COEFFICIENTS", "MADA", "OPTIMIZERS", "RANGES", "average_hypergradient",
           "build_optimizer"]
