"""Job-file sections shared by the ``consensus`` job and the ``bench-consensus`` benchmark."""

from __future__ import annotations

import dataclasses

from hpcml.config import option
from hpcml.consensus.mixing import RULES
from hpcml.consensus.tasks import TASKS
from hpcml.consensus.topology import GRAPHS
from hpcml.errors import ConfigError
from hpcml.privacy.noise import NOISE_MODES


@dataclasses.dataclass
class GraphConfig:
    kind: str = option("ring", choices=GRAPHS, help="communication graph over the ranks")
    mixing: str = option("metropolis", choices=RULES, help="mixing-weight rule")
    degree: int = option(3, min=1, help="degree of the random regular graph")
    p: float = option(0.5, gt=0.0, max=1.0, help="edge probability of the Erdős–Rényi graph")
    seed: int = option(0, min=0, help="seed of the random graphs")
    edges: str = option("", help="edge-list file ('i j' per line) for kind = \"file\"")


@dataclasses.dataclass
class PrivacyConfig:
    mechanism: str = option("gaussian", choices=("gaussian", "laplace", "none"),
                            help="message noise: gaussian for (epsilon, delta)-DP, laplace for "
                                 "pure epsilon-DP, none for no privacy")
    epsilon: float = option(10.0, help="privacy budget of the whole run (> 0)")
    delta: float = option(1e-5, help="delta of (epsilon, delta)-DP, in (0, 1)")
    clip: float = option(2.0, gt=0.0, help="gradient clipping bound C (the sensitivity scale)")
    noise: str = option("secret", choices=NOISE_MODES,
                        help="secret: noise from OS entropy, never written anywhere (private); "
                             "reproducible: noise regenerated from the job's seed, for "
                             "debugging (anyone can subtract it: the run is not private)")

    def check(self) -> None:
        if self.mechanism == "none":
            return
        if not self.epsilon > 0:
            raise ConfigError("privacy.epsilon", f"must be > 0, got {self.epsilon}",
                              "a positive budget, e.g. 1.0; or mechanism = \"none\"")
        if self.mechanism == "gaussian" and not 0 < self.delta < 1:
            raise ConfigError("privacy.delta", f"must be in (0, 1), got {self.delta}",
                              "e.g. 1e-5, below 1 / number of nodes")


@dataclasses.dataclass
class OptimConfig:
    task: str = option("mean", choices=TASKS, help="local objectives f_i")
    rounds: int = option(50, min=1, help="communication rounds T")
    alpha: float = option(0.5, gt=0.0, max=1.0, help="first step size alpha_0")
    decay: float = option(0.5, min=0.0, help="alpha_t = alpha / (1 + t)^decay")
    lam: float = option(1e-2, min=0.0, help="L2 regularization of ridge and logistic tasks")
