"""The study's ResNets (ImageNet stem; CIFAR stem and BottleNeck) in plain PyTorch.

Written from the seed's code: ``residual_function`` / ``shortcut`` blocks, ``conv1`` stem,
``conv2_x``... stages built by ``_make_layer``, ``AdaptiveAvgPool2d`` and ``fc``. Options the
study leaves as comments (the norm, its init_weights recipe) are arguments here.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from flax_resnet.config import (  # noqa: F401  (the shared vocabulary, re-exported)
    INIT_SCHEMES,
    SHORTCUTS,
    STEMS,
    ModelConfig,
    canonical_init,
)
from torch_ref.norms import make_norm

_IMAGENET = (64, 128, 256, 512)
# depth: (block, blocks per stage, stage channels, default stem, default shortcut); written
# from the study (26: timm's), independently of flax_resnet's table (a test checks that the
# two agree).
ARCHS = {
    18: ("basic", (2, 2, 2, 2), _IMAGENET, "imagenet", "B"),
    34: ("basic", (3, 4, 6, 3), _IMAGENET, "imagenet", "B"),
    50: ("bottleneck", (3, 4, 6, 3), _IMAGENET, "imagenet", "B"),
    101: ("bottleneck", (3, 4, 23, 3), _IMAGENET, "imagenet", "B"),
    152: ("bottleneck", (3, 8, 36, 3), _IMAGENET, "imagenet", "B"),
    26: ("bottleneck", (2, 2, 2, 2), _IMAGENET, "imagenet", "B"),
    **{
        d: ("basic", ((d - 2) // 6,) * 3, (16, 32, 64), "cifar", "A")
        for d in (20, 32, 44, 56, 110)
    },
}


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride, append zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def _shortcut(cin: int, cout: int, stride: int, cfg: ModelConfig) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Sequential()
    if cfg.shortcut == "A":
        return ZeroPadShortcut(cin, cout, stride)
    if cfg.avg_down:  # timm's downsample_avg
        pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                if stride > 1 else nn.Identity())
        return nn.Sequential(pool, nn.Conv2d(cin, cout, kernel_size=1, bias=False),
                             make_norm(cfg.norm, cout, cfg.norm_groups))
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
        make_norm(cfg.norm, cout, cfg.norm_groups),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, out_channels, stride, cfg: ModelConfig):
        super().__init__()
        norm, groups = cfg.norm, cfg.norm_groups
        self.residual_function = nn.Sequential(
            nn.Conv2d(
                in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
            ),
            make_norm(norm, out_channels, groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_channels, groups),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride, cfg)

    def forward(self, x):
        return F.relu(self.residual_function(x) + self.shortcut(x))


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, out_channels, stride, cfg: ModelConfig):
        super().__init__()
        norm, groups = cfg.norm, cfg.norm_groups
        # torchvision's grouped width: int(planes * (base_width / 64.0)) * groups
        width = int(out_channels * (cfg.width_per_group / 64.0)) * cfg.groups
        expanded = out_channels * BottleNeck.expansion
        s1, s3 = (stride, 1) if cfg.bottleneck_stride == "1x1" else (1, stride)
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=1, stride=s1, bias=False),
            make_norm(norm, width, groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, stride=s3, kernel_size=3, padding=1, groups=cfg.groups,
                      bias=False),
            make_norm(norm, width, groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, expanded, kernel_size=1, bias=False),
            make_norm(norm, expanded, groups),
        )
        self.shortcut = _shortcut(in_channels, expanded, stride, cfg)

    def forward(self, x):
        return F.relu(self.residual_function(x) + self.shortcut(x))


def _stem(cfg: ModelConfig, first_stage: int) -> tuple[nn.Sequential, int]:
    """(conv1, its output channels); a deep stem as timm's (stem_width, tiered)."""
    norm, groups, cin = cfg.norm, cfg.norm_groups, cfg.in_channels
    if cfg.stem in ("deep", "deep_tiered"):
        sw = cfg.stem_width or max(1, first_stage // 2)
        chs = (3 * (sw // 4), sw) if cfg.stem == "deep_tiered" else (sw, sw)
        out = 2 * sw
        return nn.Sequential(
            nn.Conv2d(cin, chs[0], 3, stride=2, padding=1, bias=False),
            make_norm(norm, chs[0], groups), nn.ReLU(inplace=True),
            nn.Conv2d(chs[0], chs[1], 3, stride=1, padding=1, bias=False),
            make_norm(norm, chs[1], groups), nn.ReLU(inplace=True),
            nn.Conv2d(chs[1], out, 3, stride=1, padding=1, bias=False),
            make_norm(norm, out, groups), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ), out
    out = cfg.stem_width or first_stage
    if cfg.stem == "imagenet":
        return nn.Sequential(
            nn.Conv2d(cin, out, kernel_size=7, stride=2, padding=3, bias=False),
            make_norm(norm, out, groups),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ), out
    return nn.Sequential(
        nn.Conv2d(cin, out, kernel_size=3, padding=1, bias=False),
        make_norm(norm, out, groups),
        nn.ReLU(inplace=True),
    ), out


class ResNet(nn.Module):
    def __init__(self, block, num_block, stage_channels, cfg: ModelConfig):
        super().__init__()
        self.conv1, self.in_channels = _stem(cfg, stage_channels[0])
        self.stage_names = []
        for i, (n, out) in enumerate(zip(num_block, stage_channels, strict=True)):
            name = f"conv{i + 2}_x"
            stride = 2 if i > 0 or cfg.downsample_in_first_stage else 1
            setattr(self, name, self._make_layer(block, out, n, stride, cfg))
            self.stage_names.append(name)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.in_channels, cfg.num_classes)

    def _make_layer(self, block, out_channels, num_blocks, stride, cfg):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for s in strides:
            layers.append(block(self.in_channels, out_channels, s, cfg))
            self.in_channels = out_channels * block.expansion
        return nn.Sequential(*layers)

    def features(self, x) -> dict[str, torch.Tensor]:
        """The backbone feature maps, named as ``flax_resnet.models.ResNet.features``'s."""
        pooled = isinstance(self.conv1[-1], nn.MaxPool2d)
        out = {}
        x = self.conv1[:-1](x) if pooled else self.conv1(x)
        out["stem_pre_pool"] = x
        out["stem"] = x = self.conv1[-1](x) if pooled else x
        for i, name in enumerate(self.stage_names):
            out[f"stage{i + 1}"] = x = getattr(self, name)(x)
        return out

    def forward(self, x):
        x = self.conv1(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.avg_pool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


_RELU_GAIN = nn.init.calculate_gain("relu")
_SHARED_WEIGHT_INIT = {
    "kaiming_normal": partial(nn.init.kaiming_normal_, nonlinearity="relu"),
    "kaiming_uniform": partial(nn.init.kaiming_uniform_, nonlinearity="relu"),
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
}
# scheme: (conv weight init, linear weight init; None keeps PyTorch's default weight and bias)
_SCHEMES = {
    "torch": (None, None),
    "study": (
        partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu"),
        partial(nn.init.xavier_uniform_, gain=_RELU_GAIN),
    ),
    "torchvision": (partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu"), None),
    **{name: (fn, fn) for name, fn in _SHARED_WEIGHT_INIT.items()},
    "orthogonal": (partial(nn.init.orthogonal_, gain=_RELU_GAIN), nn.init.orthogonal_),
}
assert tuple(_SCHEMES) == INIT_SCHEMES


def init_weights(model: nn.Module, scheme: str) -> None:
    """Apply an init scheme with ``torch.nn.init`` (``torch`` keeps PyTorch's defaults).

    ``study`` is the study's ``init_weights``: Kaiming normal fan_out for convs, zero bias,
    Xavier uniform with ReLU gain for the classifier. Norm layers keep ones/zeros in every
    scheme.
    """
    conv_init, linear_init = _SCHEMES[canonical_init(scheme)]
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and conv_init is not None:
            conv_init(m.weight)
        elif isinstance(m, nn.Linear) and linear_init is not None:
            linear_init(m.weight)
            nn.init.zeros_(m.bias)


def _last_norm(block: nn.Module) -> nn.Module:
    norm = block.residual_function[-1]
    return norm.norm if hasattr(norm, "norm") else norm


def create_resnet(depth: int, **options) -> ResNet:
    """Same arguments as ``flax_resnet.create_resnet`` (less rngs and dtypes), validated by
    the same ``flax_resnet.config.ModelConfig``."""
    return from_config(ModelConfig(depth=depth, **options))


def from_config(cfg: ModelConfig) -> ResNet:
    """The ResNet ``cfg`` describes (see ``create_resnet``)."""
    block, num_block, channels, _, _ = ARCHS[cfg.depth]
    channels = tuple(max(1, round(c * cfg.width)) for c in channels)
    block_cls = BasicBlock if block == "basic" else BottleNeck
    model = ResNet(block_cls, num_block, channels, cfg)
    init_weights(model, cfg.init)
    if cfg.zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, BottleNeck)):
                weight = _last_norm(m).weight
                if weight is not None:
                    nn.init.zeros_(weight)
    return model


__all__ = [
    "BasicBlock", "BottleNeck", "ResNet", "ZeroPadShortcut", "create_resnet", "from_config",
    "init_weights",
]
