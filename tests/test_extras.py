"""Install extras: setup.cfg and hpcml.extras agree, and a job kind whose extra is missing is
refused with one line naming the extra before its module is imported."""

import configparser
import importlib.util
from pathlib import Path

import pytest

from hpcml import extras, jobs
from hpcml.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_declares_every_extra_and_all_holds_them():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = cfg["options.extras_require"]
    assert set(extras.EXTRAS) <= set(declared)
    assert declared["all"].strip() == f"hpcml[{','.join(sorted(extras.EXTRAS))}]"
    assert "hpcml[all,docs]" in declared["dev"]
    core = cfg["options"]["install_requires"]
    for heavy in ("sacrebleu", "scikit-learn", "matplotlib", "dp-accounting", "pytorch_optimizer"):
        assert heavy not in core
    assert set(jobs.KINDS) >= set(extras.KIND_EXTRAS)
    assert all(set(needs) <= set(extras.EXTRAS) for needs in extras.KIND_EXTRAS.values())


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    with pytest.raises(UsageError) as err:
        jobs.job_kind("bench-reduction")
    assert str(err.value) == ("kind 'bench-reduction' needs the 'nmt' extra (sacrebleu is not "
                              "installed): pip install 'hpcml[nmt]'")
    assert "(not installed) pip install 'hpcml[nmt]'" in jobs.describe()
    jobs.job_kind("qsparse")                     # core kinds are unaffected


def test_adam_family_builds_without_the_optim_extra_lion_names_it(monkeypatch):
    """transformer-nmt's Adam needs only the core; Lion/Adan/Yogi name the ``optim`` extra."""
    import torch

    from hpcml.optim import build_optimizer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "pytorch_optimizer" else real(name, *a))
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("adam", "adamw", "amsgrad", "avgrad", "mada"):
        build_optimizer(name, params)
    with pytest.raises(UsageError, match=r"pip install 'hpcml\[optim\]'"):
        build_optimizer("lion", params)
