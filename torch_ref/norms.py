"""The seed's normalization choices for conv nets, in plain PyTorch (NCHW)."""

from __future__ import annotations

import torch
from torch import nn

from flax_resnet.config import NORMS, canonical_norm  # noqa: F401  (re-exported)


class RMSNorm2d(nn.Module):
    """The seed's RMSNorm2d: ``nn.RMSNorm`` over channels, via NHWC and back."""

    def __init__(
        self, num_channels: int, eps: float | None = None, elementwise_affine: bool = True
    ):
        super().__init__()
        self.norm = nn.RMSNorm(
            normalized_shape=num_channels, eps=eps, elementwise_affine=elementwise_affine
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2)


def _group_norm(num_channels: int, groups: int) -> nn.GroupNorm:
    if num_channels % groups != 0:
        raise ValueError(
            f"norm 'gn' with groups={groups} does not divide {num_channels} channels"
        )
    return nn.GroupNorm(groups, num_channels)


# The study's comment: layernorm = GroupNorm(1, C), groupnorm = GroupNorm(32, C),
# instancenorm = GroupNorm(C, C); plus its RMSNorm2d.
NORM_LAYERS = {
    "bn": lambda c, g: nn.BatchNorm2d(c),
    "ln": lambda c, g: nn.GroupNorm(1, c),
    "gn": _group_norm,
    "in": lambda c, g: nn.GroupNorm(c, c),
    "rms": lambda c, g: RMSNorm2d(c),
}


def make_norm(name: str, num_channels: int, groups: int = 32) -> nn.Module:
    return NORM_LAYERS[canonical_norm(name)](num_channels, groups)
