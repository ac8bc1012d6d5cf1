"""ResNets in Flax NNX whose module tree mirrors ``torch_ref``'s.

Attribute names (``conv1``, ``conv2_x``..., ``residual_function``, ``shortcut``, ``fc``) and
``Sequential`` indices are PyTorch's, so converting weights is a name map plus layout
transposes (see ``flax_resnet.convert``). Images are NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.config import (  # noqa: F401  (re-exported: the model's vocabulary)
    ARCHS,
    DEPTHS,
    SHORTCUTS,
    STEMS,
    ArchSpec,
    ModelConfig,
    stage_widths,
)
from flax_resnet.init import InitScheme, get_init_scheme
from flax_resnet.norms import make_norm, norm_scale

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LayerFactory:
    """Builds convs, norms and the classifier with one init scheme, norm and dtype policy."""

    norm: str
    norm_groups: int
    scheme: InitScheme
    dtype: Dtype | None
    param_dtype: Dtype
    rngs: nnx.Rngs

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1) -> nnx.Conv:
        pad = kernel // 2
        # Explicit symmetric padding: Flax's 'SAME' pads (0, 1) for stride 2 where PyTorch
        # pads (1, 1), which shifts every strided output by a pixel.
        return nnx.Conv(
            cin,
            cout,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=self.scheme.conv_kernel,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def norm_layer(self, channels: int) -> nnx.Module:
        return make_norm(
            self.norm,
            channels,
            groups=self.norm_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def linear(self, fan_in: int, fan_out: int) -> nnx.Linear:
        return nnx.Linear(
            fan_in,
            fan_out,
            kernel_init=self.scheme.linear_kernel,
            bias_init=self.scheme.linear_bias(fan_in),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )


class ZeroPadShortcut(nnx.Module):
    """He et al.'s option A: subsample by the stride, append zero channels. No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x[:, :: self.stride, :: self.stride, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.extra_channels)))


def _shortcut(
    layers: LayerFactory, cin: int, cout: int, stride: int, kind: str
) -> nnx.Module:
    if stride == 1 and cin == cout:
        return nnx.Sequential()
    if kind == "A":
        return ZeroPadShortcut(cin, cout, stride)
    return nnx.Sequential(layers.conv(cin, cout, 1, stride), layers.norm_layer(cout))


class BasicBlock(nnx.Module):
    """Two 3×3 convs (ResNet-18/34 and He's CIFAR nets)."""

    expansion = 1

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, layers: LayerFactory,
        shortcut: str = "B",
    ):
        self.residual_function = nnx.Sequential(
            layers.conv(in_channels, out_channels, 3, stride),
            layers.norm_layer(out_channels),
            nnx.relu,
            layers.conv(out_channels, out_channels, 3),
            layers.norm_layer(out_channels),
        )
        self.shortcut = _shortcut(layers, in_channels, out_channels, stride, shortcut)

    @property
    def last_norm(self) -> nnx.Module:
        return self.residual_function.layers[4]

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.residual_function(x) + self.shortcut(x))


class BottleNeck(nnx.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, layers: LayerFactory,
        shortcut: str = "B",
    ):
        expanded = out_channels * self.expansion
        self.residual_function = nnx.Sequential(
            layers.conv(in_channels, out_channels, 1),
            layers.norm_layer(out_channels),
            nnx.relu,
            layers.conv(out_channels, out_channels, 3, stride),
            layers.norm_layer(out_channels),
            nnx.relu,
            layers.conv(out_channels, expanded, 1),
            layers.norm_layer(expanded),
        )
        self.shortcut = _shortcut(layers, in_channels, expanded, stride, shortcut)

    @property
    def last_norm(self) -> nnx.Module:
        return self.residual_function.layers[7]

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.residual_function(x) + self.shortcut(x))


BLOCKS: dict[str, type[BasicBlock] | type[BottleNeck]] = {
    "basic": BasicBlock,
    "bottleneck": BottleNeck,
}


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    # Explicit padding pads with -inf, like PyTorch's MaxPool2d(3, 2, padding=1).
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nnx.Module):
    """Stem ``conv1``, stages ``conv2_x``..., global average pool, classifier ``fc``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[BottleNeck],
        blocks_per_stage: Sequence[int],
        stage_channels: Sequence[int],
        layers: LayerFactory,
        *,
        stem: str = "imagenet",
        shortcut: str = "B",
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        self.in_channels = in_channels
        width = stage_channels[0]
        if stem == "imagenet":
            self.conv1 = nnx.Sequential(
                layers.conv(in_channels, width, 7, 2),
                layers.norm_layer(width),
                nnx.relu,
                _max_pool_3x3_s2,
            )
        else:
            self.conv1 = nnx.Sequential(
                layers.conv(in_channels, width, 3, 1), layers.norm_layer(width), nnx.relu
            )
        self.stage_names = tuple(f"conv{i + 2}_x" for i in range(len(blocks_per_stage)))
        channels = width
        for i, (name, n, out) in enumerate(
            zip(self.stage_names, blocks_per_stage, stage_channels, strict=True)
        ):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(channels, out, stride, layers, shortcut))
                channels = out * block.expansion
            setattr(self, name, nnx.Sequential(*stage))
        self.fc = layers.linear(channels, num_classes)

    def blocks(self) -> list[BasicBlock | BottleNeck]:
        return [b for name in self.stage_names for b in getattr(self, name).layers]

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet expects NHWC images with {self.in_channels} channels, "
                f"got shape {tuple(x.shape)}"
            )
        x = self.conv1(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


def create_resnet(
    depth: int,
    *,
    norm: str = "bn",
    stem: str | None = None,
    num_classes: int = 10,
    width: float = 1.0,
    shortcut: str | None = None,
    init: str = "torch",
    norm_groups: int = 32,
    zero_init_residual: bool = False,
    in_channels: int = 3,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> ResNet:
    """Build a ResNet by name; ``torch_ref.create_resnet`` takes the same arguments.

    depth: 18/34 (BasicBlock), 50/101/152 (BottleNeck), or He et al.'s CIFAR nets
      20/32/44/56/110 (three stages of 16/32/64 channels).
    norm: ``bn``, ``ln``, ``gn``, ``in``, ``rms`` (see ``flax_resnet.norms.NORMS``).
    stem: ``imagenet`` (7×7/2 conv + 3×3/2 max-pool) or ``cifar`` (3×3/1 conv); default
      ``imagenet`` for 18–152 and ``cifar`` for He's CIFAR depths.
    shortcut: ``B`` (1×1 conv + norm projection) or ``A`` (zero-padded identity); default
      ``B`` for 18–152 and ``A`` for He's CIFAR depths.
    init: a scheme of ``flax_resnet.init.INIT_SCHEMES``; ``torch`` is PyTorch's default.
    width: multiplies every stage's channel count.
    zero_init_residual: zero the scale of each block's last norm, so blocks start as identity.
    dtype / param_dtype: compute and parameter dtypes (norms compute and keep statistics in
      at least float32; float64 throughout for a float64 model).

    The arguments are validated as a ``flax_resnet.config.ModelConfig``; ``from_config``
    builds from one.
    """
    cfg = ModelConfig(
        depth=depth, norm=norm, stem=stem, num_classes=num_classes, width=width,
        shortcut=shortcut, init=init, norm_groups=norm_groups,
        zero_init_residual=zero_init_residual, in_channels=in_channels,
    )
    return from_config(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def from_config(
    cfg: ModelConfig,
    *,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> ResNet:
    """The ResNet ``cfg`` describes (see ``create_resnet``)."""
    spec = ARCHS[cfg.depth]
    layers = LayerFactory(
        cfg.norm, cfg.norm_groups, get_init_scheme(cfg.init), dtype, param_dtype, rngs
    )
    model = ResNet(
        BLOCKS[spec.block],
        spec.blocks_per_stage,
        stage_widths(cfg.depth, cfg.width),
        layers,
        stem=cfg.stem,
        shortcut=cfg.shortcut,
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
    )
    if cfg.zero_init_residual:
        for block in model.blocks():
            scale = norm_scale(block.last_norm)
            if scale is not None:
                scale[...] = jnp.zeros_like(scale[...])
    return model
