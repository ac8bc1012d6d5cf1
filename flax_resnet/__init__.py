"""ResNets in Flax NNX with PyTorch semantics, a PyTorch reference and proven parity.

Attributes load on first use, so ``flax_resnet.config`` (the vocabulary and the model
config, which ``torch_ref`` reads too) imports without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = (
    "architecture", "batches", "config", "convert", "data", "init", "library_configs",
    "models", "namings", "norms", "optim", "preprocessing", "program", "sharding",
    "state_dict", "trainer", "training", "weights", "workdir", "writers",
)
_EXPORTS = {
    "config": ("MODEL_NAMES", "ModelConfig", "TrainConfig", "make_config", "named_model"),
    "models": ("ARCHS", "DEPTHS", "SHORTCUTS", "STEMS", "BasicBlock", "BottleNeck", "ResNet",
               "ZeroPadShortcut", "create_resnet", "from_config"),
    "norms": ("NORMS", "BatchNorm2d", "GroupNorm", "InstanceNorm2d", "LayerNorm", "RMSNorm",
              "RMSNorm2d", "make_norm"),
    "weights": ("Weights", "load", "resolve"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_SUBMODULES, *_WHERE])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"flax_resnet.{name}")
    if name in _WHERE:
        value = getattr(importlib.import_module(f"flax_resnet.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flax_resnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
