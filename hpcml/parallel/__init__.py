"""hpcml.parallel: every way of splitting a model or its gradients across ranks, one module per
parallelism, all over one :class:`Mesh` and on :mod:`hpcml.comm` only.

The torch-based parts are imported on first use, so ``from hpcml.parallel import Mesh`` stays
cheap for numpy-only ranks.
"""

from typing import Any

from hpcml.parallel.mesh import Mesh

_LAZY = {"PipelineModel": "hpcml.parallel.pipeline", "StepOutput": "hpcml.parallel.pipeline",
         "load_full_state": "hpcml.parallel.pipeline", "step": "hpcml.parallel.pipeline"}

__all__ = ["Mesh", "PipelineModel", "StepOutput", "load_full_state", "step"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcml.parallel' has no attribute {name!r}")
