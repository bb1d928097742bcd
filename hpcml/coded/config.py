"""Job-file sections shared by ``hpcml run`` (kind ``coded``) and ``hpcml bench coded``."""

from __future__ import annotations

import dataclasses

from hpcml.coded.algorithms import DATA_PARALLEL
from hpcml.coded.encoders import ENCODERS
from hpcml.coded.etf import is_prime
from hpcml.coded.problems import DATASETS, PROBLEMS
from hpcml.config import option
from hpcml.errors import ConfigError

ALGORITHMS = (*DATA_PARALLEL, "bcd", "als")
ALLOWED = {"ridge": ("gd", "lbfgs", "async", "bcd"), "lasso": ("prox", "fista"),
           "logistic": ("bcd",), "mf": ("als",)}


@dataclasses.dataclass
class ProblemConfig:
    kind: str = option("ridge", choices=PROBLEMS, help="objective to minimize")
    data: str = option("diabetes", choices=DATASETS, help="data set (sklearn bundled, "
                       "synthetic, or an HDF5 file)")
    path: str = option("", help="hdf5: input file")
    x_key: str = option("X", help="hdf5: dataset of the (n, p) features")
    y_key: str = option("y", help="hdf5: dataset of the (n,) targets")
    n: int = option(2048, min=2, help="synthetic: samples (mf: users)")
    p: int = option(64, min=1, help="synthetic: features (mf: items)")
    noise: float = option(0.5, min=0.0, help="synthetic: noise standard deviation (mf: of "
                          "the ratings before rounding)")
    spread: float = option(0.2, gt=0.0, max=1.0, help="synthetic: smallest/largest singular "
                           "value of the feature covariance")
    order: str = option("given", choices=("given", "by_target"),
                        help="row order before sharding: as loaded, or sorted by target "
                        "(non-i.i.d. worker partitions, like data stored in time order)")
    lam: float = option(1e-3, min=0.0, help="l2 regularization (ridge, logistic, mf)")
    rank: int = option(5, min=1, help="mf: factorization rank")
    true_rank: int = option(0, min=0, help="mf synthetic: latent rank of the generated "
                            "ratings; 0 = rank")
    density: float = option(0.05, gt=0.0, max=1.0, help="mf synthetic: fraction of the "
                            "user x item entries rated (no user rates more than half the items)")
    observed: float = option(0.5, gt=0.0, max=1.0, help="mf digits: fraction of the pixels "
                             "observed (matrix completion)")
    test_fraction: float = option(0.1, gt=0.0, max=1.0, help="mf: fraction of the observed "
                                  "entries held out for the test RMSE, in (0, 1)")
    l1: float = option(1e-2, min=0.0, help="l1 regularization (lasso)")


MF_DATA = ("synthetic", "digits")


def check_problem(cfg: ProblemConfig) -> None:
    """Rules the field ranges cannot express (collaborative filtering only)."""
    if cfg.kind != "mf":
        return
    if cfg.data not in MF_DATA:
        raise ConfigError("problem.data", f"mf runs on ratings, not {cfg.data!r}",
                          f"use one of {', '.join(MF_DATA)}")
    if cfg.test_fraction >= 1:
        raise ConfigError("problem.test_fraction", f"{cfg.test_fraction} leaves no training "
                          "entries", "use a fraction in (0, 1), e.g. 0.1")
    if cfg.data == "synthetic" and (cfg.p < 10 or cfg.n < 5):
        raise ConfigError("problem.p" if cfg.p < 10 else "problem.n", f"{cfg.n} users x "
                          f"{cfg.p} items is too small for >= 5 ratings per user and item",
                          "use n >= 5 users and p >= 10 items")


@dataclasses.dataclass
class CodeConfig:
    encoder: str = option("etf", choices=ENCODERS, help="encoding matrix S")
    beta: float = option(2.0, help="redundancy: encoded rows / original rows (>= 1)")
    workers: int = option(0, min=0, help="m; 0 = ranks - 1 (4 when run on one rank, simulated)")
    wait_for: int = option(0, min=0, help="k: workers the master waits for; 0 = all m")
    etf_q: int = option(13, min=5, help="etf: Paley prime q = 1 mod 4 (blocks of (q+1)/2 rows)")
    sparse_nnz: int = option(2, min=1, help="sparse: nonzeros per column, on distinct workers")
    chunk: int = option(64, min=1, help="columns encoded per streaming chunk (mf: most "
                        "observations of one user or item encoded by one code)")

    def workers_for(self, size: int) -> int:
        return size - 1 if size > 1 else (self.workers or 4)

    def wait_for_k(self, size: int) -> int:
        return self.wait_for or self.workers_for(size)

    def check(self, size: int, prefix: str = "code") -> None:
        m = self.workers_for(size)
        if size > 1 and self.workers not in (0, size - 1):
            raise ConfigError(f"{prefix}.workers", f"{self.workers} workers but {size} ranks "
                              f"give 1 master + {size - 1} workers", "set 0 or ranks - 1")
        if self.wait_for > m:
            raise ConfigError(f"{prefix}.wait_for", f"k = {self.wait_for} > m = {m} workers",
                              "choose k <= m (m = ranks - 1, or code.workers on one rank)")
        if self.beta < 1:
            raise ConfigError(f"{prefix}.beta", f"redundancy beta = {self.beta} < 1 would "
                              "encode fewer rows than the data has", "use beta >= 1, e.g. 2")
        if self.encoder == "uncoded" and self.beta != 1:
            raise ConfigError(f"{prefix}.beta", f"uncoded data have beta = 1, got {self.beta}",
                              "set beta = 1 or choose an encoder")
        if self.encoder == "etf" and self.beta != 2:
            raise ConfigError(f"{prefix}.beta", f"the Paley ETF has beta = 2, got {self.beta}",
                              "set beta = 2")
        if self.encoder == "etf" and (not is_prime(self.etf_q) or self.etf_q % 4 != 1):
            raise ConfigError(f"{prefix}.etf_q", f"{self.etf_q} is not a prime = 1 (mod 4)",
                              "use 5, 13, 17, 29, 37, ...")
        if self.encoder == "hadamard" and self.beta != int(self.beta):
            raise ConfigError(f"{prefix}.beta", f"the Hadamard code uses whole sign copies, "
                              f"got beta = {self.beta}", "use an integer, e.g. beta = 2")
        if self.encoder == "replication" and (self.beta != int(self.beta) or m % self.beta):
            raise ConfigError(f"{prefix}.beta", f"replication factor {self.beta} must be an "
                              f"integer dividing m = {m}", "e.g. beta = 2 with 4 workers")


@dataclasses.dataclass
class SolverConfig:
    algorithm: str = option("gd", choices=ALGORITHMS, help="optimizer run on the encoded data")
    iterations: int = option(100, min=1, help="rounds (async: m updates per iteration)")
    step: float = option(1.0, gt=0.0, help="step size in units of 1 / L (L from the encoded "
                         "data); L-BFGS uses it as its constant step")
    history: int = option(10, min=1, help="lbfgs: curvature pairs kept")
    inner: int = option(10, min=1, help="als: encoded gradient steps per half step "
                        "(iterations = ALS sweeps)")
    close_timeout: float = option(10.0, gt=0.0, help="seconds the master waits at the end "
                                  "for each worker's acknowledgement before it names the "
                                  "worker unresponsive and the job ends without it")
    progress_timeout: float = option(60.0, gt=0.0, max=86400.0, help="seconds the master "
                                     "waits with no reply at all (more than m - k workers "
                                     "frozen or dead) before it ends the solve as failed, "
                                     "names the silent workers and the job exits with code 3")

    def check(self, problem: str, prefix: str = "solver") -> None:
        if self.algorithm not in ALLOWED[problem]:
            raise ConfigError(f"{prefix}.algorithm", f"{self.algorithm!r} does not solve "
                              f"{problem}", f"use one of {', '.join(ALLOWED[problem])}")
