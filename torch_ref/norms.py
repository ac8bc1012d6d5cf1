"""The seed's normalization choices for conv nets, in plain PyTorch (NCHW)."""

from __future__ import annotations

import torch
from torch import nn

NORMS: tuple[str, ...] = ("bn", "ln", "gn", "in", "rms")
_ALIASES = {
    "batch": "bn", "batchnorm": "bn", "layer": "ln", "layernorm": "ln", "group": "gn",
    "groupnorm": "gn", "instance": "in", "instancenorm": "in", "rmsnorm": "rms",
    **{n: n for n in NORMS},
}


def canonical_norm(name: str) -> str:
    key = name.lower() if isinstance(name, str) else name
    if key not in _ALIASES:
        raise ValueError(f"unknown norm {name!r}; allowed: {', '.join(NORMS)}")
    return _ALIASES[key]


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


def make_norm(name: str, num_channels: int, groups: int = 32) -> nn.Module:
    """The seed's comment in Q2: layernorm = GroupNorm(1, C), groupnorm = GroupNorm(32, C),
    instancenorm = GroupNorm(C, C); plus RMSNorm2d from Q1."""
    kind = canonical_norm(name)
    if kind == "bn":
        return nn.BatchNorm2d(num_channels)
    if kind == "ln":
        return nn.GroupNorm(1, num_channels)
    if kind == "gn":
        if num_channels % groups != 0:
            raise ValueError(
                f"norm 'gn' with groups={groups} does not divide {num_channels} channels"
            )
        return nn.GroupNorm(groups, num_channels)
    if kind == "in":
        return nn.GroupNorm(num_channels, num_channels)
    return RMSNorm2d(num_channels)
