"""PyTorch reference of the seed's ResNets (NCHW), the ground truth for parity tests."""

from torch_ref.models import (
    ARCHS,
    INIT_SCHEMES,
    BasicBlock,
    BottleNeck,
    ResNet,
    ZeroPadShortcut,
    create_resnet,
    from_config,
    init_weights,
)
from torch_ref.norms import NORMS, RMSNorm2d, make_norm

__all__ = [
    "ARCHS", "INIT_SCHEMES", "NORMS", "BasicBlock", "BottleNeck", "ResNet", "RMSNorm2d",
    "ZeroPadShortcut", "create_resnet", "from_config", "init_weights", "make_norm",
]
