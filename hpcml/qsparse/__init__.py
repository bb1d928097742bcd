"""Qsparse-local-SGD (arXiv 1906.02367): local SGD steps, error-compensated compression
(sparsification composed with quantization) and exact bit accounting, synchronous over
``Allgatherv`` or asynchronous through a server rank.

Public surface: :class:`QsparseLocalSGD` (wraps any torch model + optimizer), the compressors
(:func:`make_compressor`, :class:`Compressor`), :func:`compensate` and :func:`learning_rate`.
Job kinds: ``qsparse`` (:mod:`hpcml.qsparse.train`) and ``bench-qsparse``
(:mod:`hpcml.qsparse.bench`); the ``[qsparse]`` section of ``transformer-nmt`` jobs
(:mod:`hpcml.nmt.qsparse`) trains the hpcml.nmt transformer with the same wrapper. The wrappers
are torch optimizers built on :class:`hpcml.parallel.WrappedOptimizer`.
"""

from hpcml.qsparse.compressors import (
    NAMES,
    Compressor,
    Payload,
    Quantizer,
    Sparsifier,
    make_compressor,
    qsgd_beta,
)
from hpcml.qsparse.error_feedback import compensate, learning_rate
from hpcml.qsparse.exchange import AllgatherExchange, Server, ServerExchange
from hpcml.qsparse.optimizer import QsparseLocalSGD

__all__ = ["NAMES", "AllgatherExchange", "Compressor", "Payload", "QsparseLocalSGD",
           "Quantizer", "Server", "ServerExchange", "Sparsifier", "compensate",
           "learning_rate", "make_compressor", "qsgd_beta"]
