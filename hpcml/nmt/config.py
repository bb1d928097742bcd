"""Job-file schema shared by the ``transformer-nmt`` job and the ``bench-reduction`` benchmark."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hpcml.comm import StragglerConfig
from hpcml.config import JobConfig, option
from hpcml.errors import ConfigError
from hpcml.nmt.qsparse import QsparseSection, transformer_dimension
from hpcml.optim.registry import OPTIMIZERS
from hpcml.parallel import REDUCTIONS


@dataclasses.dataclass
class ModelConfig:
    d_model: int = option(64, min=2, help="model width (even; divisible by heads)")
    heads: int = option(4, min=1, help="attention heads")
    layers: int = option(2, min=1, help="encoder layers = decoder layers")
    ff: int = option(128, min=1, help="feed-forward inner width")
    dropout: float = option(0.1, min=0.0, max=0.9, help="dropout rate")


@dataclasses.dataclass
class DataConfig:
    path: str = option("data/nmt/numbers-en-fr.h5",
                       help="HDF5 corpus written by python -m hpcml.nmt.corpus")


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = option(64, min=1, help="global sentences per step (divisible by ranks)")
    steps: int = option(1000, min=1, help="optimizer steps in total")
    warmup: int = option(200, min=1, help="learning-rate warm-up steps (Vaswani Eq. 3)")
    lr_scale: float = option(1.0, gt=0.0, help="factor on the Vaswani Eq. 3 learning rate")
    label_smoothing: float = option(0.1, min=0.0, max=0.99, help="label smoothing epsilon")
    grad_reduction: str = option("dense_allreduce", choices=tuple(REDUCTIONS),
                                 help="gradient exchange: sparse_allgather, dense_allreduce, "
                                      "auto")
    bucket_kib: int = option(1024, min=1, help="fused allreduce bucket size (KiB)")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="optimizer (hpcml.optim): adam, "
                            "mada, lion, ...; Vaswani's betas (0.9, 0.98) and eps 1e-9 where "
                            "it has them, the learning rate from Eq. 3")
    batch_tokens: int = option(0, min=0, help="length-bucketed batches of at most this many "
                                              "padded tokens per rank (0 = batch_size "
                                              "sentences)")


@dataclasses.dataclass
class EvalConfig:
    valid_every: int = option(100, min=0, help="validate every N steps (0 = only at the end)")
    checkpoint_every: int = option(200, min=0, help="checkpoint every N steps (0 = at the end "
                                                    "and on SIGTERM/SIGUSR1 only)")
    batch_size: int = option(128, min=1, help="sentences per evaluation batch per rank")
    bleu: bool = option(True, help="decode the test split and report corpus BLEU")
    beam: int = option(1, min=1, help="beam size of the test translations (1 = greedy)")
    length_penalty: float = option(0.6, min=0.0, help="GNMT length-penalty alpha of the beam")


def check_model(model: ModelConfig) -> None:
    """The model's widths fit together (raise ``ConfigError``)."""
    if model.d_model % model.heads or model.d_model % 2:
        raise ConfigError("model.d_model", f"{model.d_model} must be even and divisible by "
                          f"model.heads = {model.heads}", "choose e.g. d_model = 16 * heads")


def check_model_data(model: ModelConfig, data: DataConfig, batch_size: int, size: int,
                     batch_key: str) -> None:
    """Rules shared by both job kinds (raise ``ConfigError``)."""
    check_model(model)
    if batch_size % size:
        raise ConfigError(batch_key, f"{batch_size} sentences do not split evenly over {size} "
                          "ranks", f"use a multiple of {size}")
    if not Path(data.path).is_file():
        raise ConfigError("data.path", f"corpus file {data.path!r} not found",
                          "create it with: python -m hpcml.nmt.corpus data/nmt/numbers-en-fr.h5")


@dataclasses.dataclass
class NMTConfig(JobConfig):
    model: ModelConfig = option(ModelConfig())
    data: DataConfig = option(DataConfig())
    train: TrainConfig = option(TrainConfig())
    eval: EvalConfig = option(EvalConfig())
    stragglers: StragglerConfig = option(StragglerConfig())
    qsparse: QsparseSection = option(QsparseSection())

    def check(self, size: int) -> None:
        check_model_data(self.model, self.data, self.train.batch_size, size, "train.batch_size")
        self.qsparse.check(self.train.steps, self.eval.valid_every,
                           lambda: transformer_dimension(self.model, self.data.path))
