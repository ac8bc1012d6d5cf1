"""ResNets in Flax NNX whose module tree mirrors ``torch_ref``'s.

Attribute names (``conv1``, ``conv2_x``..., ``residual_function``, ``shortcut``, ``fc``) and
``Sequential`` indices are PyTorch's, so converting weights is a name map plus layout
transposes (see ``flax_resnet.convert``). Images are NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet.config import (  # noqa: F401  (re-exported: the model's vocabulary)
    ARCHS,
    DEPTHS,
    SHORTCUTS,
    STEMS,
    ArchSpec,
    ModelConfig,
    bottleneck_width,
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

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
             ) -> nnx.Conv:
        pad = kernel // 2
        # Explicit symmetric padding: Flax's 'SAME' pads (0, 1) for stride 2 where PyTorch
        # pads (1, 1), which shifts every strided output by a pixel.
        return nnx.Conv(
            cin,
            cout,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
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


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """PyTorch's ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` (timm's
    avg-down): an odd edge's last window holds one row or column and is averaged over it."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    total = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c).sum(axis=(2, 4))
    rows = np.minimum(2, h - 2 * np.arange((h + 1) // 2))  # static: each window's extent
    cols = np.minimum(2, w - 2 * np.arange((w + 1) // 2))
    count = (rows[:, None] * cols[None, :])[None, :, :, None]
    return total / jnp.asarray(count, x.dtype)


def _shortcut(
    layers: LayerFactory, cin: int, cout: int, stride: int, cfg: ModelConfig
) -> nnx.Module:
    if stride == 1 and cin == cout:
        return nnx.Sequential()
    if cfg.shortcut == "A":
        return ZeroPadShortcut(cin, cout, stride)
    if cfg.avg_down:  # the indices of timm's downsample_avg: pool, conv, norm
        pool = avg_pool_2x2 if stride > 1 else (lambda x: x)
        return nnx.Sequential(pool, layers.conv(cin, cout, 1), layers.norm_layer(cout))
    return nnx.Sequential(layers.conv(cin, cout, 1, stride), layers.norm_layer(cout))


class BasicBlock(nnx.Module):
    """Two 3×3 convs (ResNet-18/34 and He's CIFAR nets)."""

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int, layers: LayerFactory,
        cfg: ModelConfig,
    ):
        self.residual_function = nnx.Sequential(
            layers.conv(in_channels, planes, 3, stride),
            layers.norm_layer(planes),
            nnx.relu,
            layers.conv(planes, planes, 3),
            layers.norm_layer(planes),
        )
        self.shortcut = _shortcut(layers, in_channels, planes, stride, cfg)

    @property
    def last_norm(self) -> nnx.Module:
        return self.residual_function.layers[4]

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.residual_function(x) + self.shortcut(x))


class BottleNeck(nnx.Module):
    """1×1 reduce, 3×3 (grouped for ResNeXt), 1×1 expand to 4 × ``planes``; the stride on
    the 3×3 (v1.5) or the first 1×1 (v1), as ``cfg.bottleneck_stride`` says."""

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int, layers: LayerFactory,
        cfg: ModelConfig,
    ):
        inner = bottleneck_width(planes, cfg.groups, cfg.width_per_group)
        expanded = planes * self.expansion
        on_1x1 = cfg.bottleneck_stride == "1x1"
        self.residual_function = nnx.Sequential(
            layers.conv(in_channels, inner, 1, stride if on_1x1 else 1),
            layers.norm_layer(inner),
            nnx.relu,
            layers.conv(inner, inner, 3, 1 if on_1x1 else stride, groups=cfg.groups),
            layers.norm_layer(inner),
            nnx.relu,
            layers.conv(inner, expanded, 1),
            layers.norm_layer(expanded),
        )
        self.shortcut = _shortcut(layers, in_channels, expanded, stride, cfg)

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


def _stem(layers: LayerFactory, cfg: ModelConfig) -> nnx.Sequential:
    """``conv1``: conv, norm, ReLU (three times for a deep stem), then the max-pool of every
    stem but the CIFAR one. The indices are torch_ref's (and a deep stem's, timm's)."""
    widths = cfg.stem_widths()
    if cfg.stem == "cifar":
        return nnx.Sequential(layers.conv(cfg.in_channels, widths[0], 3, 1),
                              layers.norm_layer(widths[0]), nnx.relu)
    if cfg.stem == "imagenet":
        return nnx.Sequential(layers.conv(cfg.in_channels, widths[0], 7, 2),
                              layers.norm_layer(widths[0]), nnx.relu, _max_pool_3x3_s2)
    convs = []
    for i, (cin, cout) in enumerate(zip((cfg.in_channels, *widths), widths, strict=False)):
        convs += [layers.conv(cin, cout, 3, 2 if i == 0 else 1), layers.norm_layer(cout),
                  nnx.relu]
    return nnx.Sequential(*convs, _max_pool_3x3_s2)


# Backbone feature names, in order: the stem's last activation (before its max-pool: timm's
# features_only index 0, "act1"), the stem's output (Hugging Face ResNetBackbone's "stem"),
# and each stage's output ("stage1"... as in Hugging Face; timm's indices 1...).
STEM_FEATURES: tuple[str, ...] = ("stem_pre_pool", "stem")


class ResNet(nnx.Module):
    """Stem ``conv1``, stages ``conv2_x``..., global average pool, classifier ``fc``."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory):
        self.in_channels = cfg.in_channels
        spec = ARCHS[cfg.depth]
        block = BLOCKS[spec.block]
        self.conv1 = _stem(layers, cfg)
        self.stage_names = tuple(f"conv{i + 2}_x" for i in range(len(spec.blocks_per_stage)))
        channels = cfg.stem_widths()[-1]
        feature_channels = [channels, channels]
        for name, n, planes, stride in zip(self.stage_names, spec.blocks_per_stage,
                                           cfg.stage_widths(), cfg.stage_strides(),
                                           strict=True):
            stage = []
            for j in range(n):
                stage.append(block(channels, planes, stride if j == 0 else 1, layers, cfg))
                channels = planes * block.expansion
            setattr(self, name, nnx.Sequential(*stage))
            feature_channels.append(channels)
        self.feature_names = (*STEM_FEATURES,
                              *(f"stage{i + 1}" for i in range(len(self.stage_names))))
        self.feature_channels = tuple(feature_channels)
        self.fc = layers.linear(channels, cfg.num_classes)

    def blocks(self) -> list[BasicBlock | BottleNeck]:
        return [b for name in self.stage_names for b in getattr(self, name).layers]

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet expects NHWC images with {self.in_channels} channels, "
                f"got shape {tuple(x.shape)}"
            )

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Every backbone feature map (NHWC) by name, see ``feature_names``:
        ``stem_pre_pool`` (timm ``features_only`` index 0), ``stem`` (Hugging Face
        ``ResNetBackbone``'s), ``stage1``... (timm's indices 1...; Hugging Face's names)."""
        self._check_input(x)
        stem = self.conv1.layers
        pooled = stem[-1] is _max_pool_3x3_s2
        out = {}
        for layer in stem[:-1] if pooled else stem:
            x = layer(x)
        out["stem_pre_pool"] = x
        out["stem"] = x = stem[-1](x) if pooled else x
        for i, name in enumerate(self.stage_names):
            out[f"stage{i + 1}"] = x = getattr(self, name)(x)
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check_input(x)
        x = self.conv1(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


def create_resnet(
    depth: int,
    *,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
    **options: Any,
) -> ResNet:
    """Build a ResNet; ``torch_ref.create_resnet`` takes the same arguments (less rngs and
    dtypes). ``options`` are the fields of ``flax_resnet.config.ModelConfig`` (validated by
    it, with errors that name the value and the allowed ones):

    depth: 18/34 (BasicBlock), 26/50/101/152 (BottleNeck), or He et al.'s CIFAR nets
      20/32/44/56/110 (three stages of 16/32/64 channels).
    norm: ``bn``, ``ln``, ``gn``, ``in``, ``rms`` (see ``flax_resnet.norms.NORMS``).
    stem: ``imagenet`` (7×7/2 conv + 3×3/2 max-pool), ``cifar`` (3×3/1 conv), ``deep`` or
      ``deep_tiered`` (timm's three 3×3 convs + max-pool); default ``imagenet`` for 18–152
      and ``cifar`` for He's CIFAR depths. ``stem_width``: the stem's conv width.
    shortcut: ``B`` (1×1 conv + norm projection) or ``A`` (zero-padded identity); default
      ``B`` for 18–152 and ``A`` for He's CIFAR depths. ``avg_down``: ResNet-D's 2×2 average
      pool before a stride-1 projection.
    groups / width_per_group: ResNeXt's cardinality and group width (bottlenecks only;
      Wide ResNet-50-2 is width_per_group=128). ``width`` instead multiplies every stage's
      channels, the stem's and the expanded ones included.
    bottleneck_stride: ``3x3`` (v1.5) or ``1x1`` (v1); downsample_in_first_stage: stride 2
      in the first stage too (Hugging Face's options).
    init: a scheme of ``flax_resnet.init.INIT_SCHEMES``; ``torch`` is PyTorch's default.
    zero_init_residual: zero the scale of each block's last norm, so blocks start as identity.
    dtype / param_dtype: compute and parameter dtypes (norms compute and keep statistics in
      at least float32; float64 throughout for a float64 model).
    """
    cfg = ModelConfig(depth=depth, **options)
    return from_config(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def from_config(
    cfg: ModelConfig,
    *,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> ResNet:
    """The ResNet ``cfg`` describes (see ``create_resnet``)."""
    layers = LayerFactory(
        cfg.norm, cfg.norm_groups, get_init_scheme(cfg.init), dtype, param_dtype, rngs
    )
    model = ResNet(cfg, layers)
    if cfg.zero_init_residual:
        for block in model.blocks():
            scale = norm_scale(block.last_norm)
            if scale is not None:
                scale[...] = jnp.zeros_like(scale[...])
    return model
