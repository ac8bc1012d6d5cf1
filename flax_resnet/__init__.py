"""ResNets in Flax NNX with PyTorch semantics, a PyTorch reference and proven parity."""

from flax_resnet import convert, init, norms
from flax_resnet.models import (
    ARCHS,
    DEPTHS,
    SHORTCUTS,
    STEMS,
    BasicBlock,
    BottleNeck,
    ResNet,
    ZeroPadShortcut,
    create_resnet,
)
from flax_resnet.norms import (
    NORMS,
    BatchNorm2d,
    GroupNorm,
    InstanceNorm2d,
    LayerNorm,
    RMSNorm,
    RMSNorm2d,
    make_norm,
)

__all__ = [
    "ARCHS", "DEPTHS", "NORMS", "SHORTCUTS", "STEMS", "BasicBlock", "BatchNorm2d", "BottleNeck",
    "GroupNorm", "InstanceNorm2d", "LayerNorm", "RMSNorm", "RMSNorm2d", "ResNet",
    "ZeroPadShortcut", "convert", "create_resnet", "init", "make_norm", "norms",
]
