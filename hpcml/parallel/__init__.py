"""hpcml.parallel: every way of splitting a model or its gradients across ranks, one module per
parallelism, all over one :class:`Mesh` and on :mod:`hpcml.comm` only."""

from hpcml.parallel.mesh import Mesh
from hpcml.parallel.pipeline import PipelineModel, StepOutput, load_full_state, step

__all__ = ["Mesh", "PipelineModel", "StepOutput", "load_full_state", "step"]
