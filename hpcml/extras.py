"""Optional dependencies: which ``pip install 'hpcml[EXTRA]'`` a capability needs.

The core (``hpcml.comm``, ``hpcml.parallel``, the job runner, Slurm) needs only what
``install_requires`` lists. Job kinds that need more name their extras in :data:`KIND_EXTRAS`;
:func:`require` turns a missing one into a one-line :class:`~hpcml.errors.UsageError` naming
the extra, before the kind's module is imported and before anything is written.
"""

from __future__ import annotations

import importlib.util

from hpcml.errors import UsageError

#: extra name -> the importable modules it installs (setup.cfg's ``[options.extras_require]``)
EXTRAS: dict[str, tuple[str, ...]] = {
    "nmt": ("sacrebleu", "sentencepiece", "num2words"),
    "privacy": ("dp_accounting", "sklearn"),
    "optim": ("pytorch_optimizer",),
    "coded": ("sklearn",),
    "plots": ("matplotlib",),
}

#: job kind -> the extras it needs (kinds not listed need only the core)
KIND_EXTRAS: dict[str, tuple[str, ...]] = {
    "bench-collectives": ("plots",),
    "bench-qsparse": ("plots",),
    "consensus": ("privacy",),
    "bench-consensus": ("privacy", "plots"),
    "bench-privacy": ("privacy", "plots"),
    "transformer-nmt": ("nmt",),
    "bench-reduction": ("nmt", "plots"),
    "coded": ("coded",),
    "bench-coded": ("coded", "plots"),
    "bench-cf": ("coded", "plots"),
    "bench-optimizers": ("optim", "plots"),
    "bench-model-parallel": ("plots",),
}


def missing(extra: str) -> str | None:
    """The first module of ``extra`` that cannot be imported, or None when all can. Pure
    (looks the modules up without importing them); not collective."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def require(*extras: str, what: str) -> None:
    """Raise a one-line ``UsageError`` naming the first of ``extras`` that is not installed
    (``what`` says who needs it, e.g. ``"kind 'transformer-nmt'"``); return otherwise."""
    for extra in extras:
        module = missing(extra)
        if module is not None:
            raise UsageError(f"{what} needs the '{extra}' extra ({module} is not installed): "
                             f"pip install 'hpcml[{extra}]'")
