"""torch_ref mirrors flax_resnet's tables (written independently from the study); they agree."""

from __future__ import annotations

import dataclasses

import pytest

import torch_ref
import torch_ref.models
import torch_ref.norms
import torch_ref.training
from flax_resnet import config, data, init, norms


def test_architectures_agree():
    flax_archs = {d: (*dataclasses.astuple(spec),) for d, spec in config.ARCHS.items()}
    assert {d: tuple(a) for d, a in torch_ref.ARCHS.items()} == flax_archs


def test_registries_use_the_same_names():
    assert tuple(init._SCHEME_BUILDERS) == tuple(torch_ref.models._SCHEMES) == config.INIT_SCHEMES
    assert tuple(norms.NORM_LAYERS) == tuple(torch_ref.norms.NORM_LAYERS) == config.NORMS


def test_cifar_statistics_agree():
    assert torch_ref.training.CIFAR10_MEAN == data.CIFAR10_MEAN
    assert torch_ref.training.CIFAR10_STD == data.CIFAR10_STD


def test_config_module_imports_without_jax_or_torch():
    import subprocess
    import sys

    code = ("import sys, flax_resnet.config; "
            "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_schedules_and_optimizers_use_the_same_names():
    from flax_resnet.optim import OPTIMIZER_BUILDERS, SCHEDULE_BUILDERS

    assert tuple(torch_ref.training.SCHEDULE_BUILDERS) == config.SCHEDULES
    assert tuple(SCHEDULE_BUILDERS) == config.SCHEDULES
    assert tuple(OPTIMIZER_BUILDERS) == config.OPTIMIZERS
    assert tuple(torch_ref.training.OPTIMIZER_BUILDERS) == config.OPTIMIZERS


@pytest.mark.parametrize("build,needle", [
    (lambda: config.make_config("seed"), "recipe 'seed' is not allowed; choose from study"),
    (lambda: config.make_config(init="seed"), "init scheme 'seed' is not allowed; choose from"),
    (lambda: config.make_config(schedule="seed"), "schedule 'seed' is not allowed; choose from"),
    (lambda: config.TrainConfig.from_dict({"model": {"init": "seed"}}), "init scheme 'seed'"),
    (lambda: config.TrainConfig.from_dict({"model": {}, "schedule": "seed"}),
     "schedule 'seed' is not allowed"),
])
def test_the_study_is_called_study_only(build, needle):
    """"seed", the study's name before the first release, names no recipe, init or schedule."""
    with pytest.raises(config.ConfigError, match=needle) as e:
        build()
    assert "study" in str(e.value)
