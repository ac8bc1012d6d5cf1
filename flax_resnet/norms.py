"""Normalization layers with PyTorch's semantics, channel-last (NHWC) where channels matter.

Every layer computes in ``compute_dtype(x.dtype)`` = ``promote_types(dtype, float32)``:
float32 for 16-bit compute (bf16 means and variances over large reductions lose the
precision BatchNorm depends on) and float32 input, float64 for float64 input (so a float64
model is float64 throughout: the parity proof runs there). Running statistics are stored in
``promote_types(param_dtype, float32)``.

Parameter names follow Flax (``scale``, ``bias``, ``mean``, ``var``); ``flax_resnet.convert``
maps them to PyTorch's (``weight``, ``bias``, ``running_mean``, ``running_var``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.config import NORM_ALIASES, NORMS, canonical_norm  # noqa: F401  (re-exported)

Dtype = Any

def _check_input(layer: str, x: jax.Array, ndims: Sequence[int], channels: int | None) -> None:
    if x.ndim not in ndims:
        allowed = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{layer} expects a {allowed}-D input, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(
            f"{layer} expects {channels} channels in the last axis (NHWC), "
            f"got shape {tuple(x.shape)}"
        )


def compute_dtype(dtype: Dtype) -> jnp.dtype:
    """The dtype a norm computes in for ``dtype`` input: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance in ``compute_dtype(x.dtype)``.

    float32/float64 input: two passes over ``x`` (mean, then the mean squared deviation),
    PyTorch's accuracy. 16-bit input (bf16/fp16 compute): one pass, both sums in one
    multi-output fusion, which saves a read of every activation on the GPU; its float32
    rounding stays orders of magnitude below the input's own 16-bit rounding.
    """
    if jnp.dtype(x.dtype).itemsize < 4:
        return _moments_one_pass(x, axes)
    return _moments_two_pass(x, axes)


def _moments_two_pass(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    xf = x.astype(compute_dtype(x.dtype))
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    return mean, jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)


def _moments_one_pass(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Shifted one-pass moments in float32.

    With ``K`` one element of ``x`` per reduced group and ``d = x - K``: ``mean = K + E[d]``
    and ``var = E[d²] - E[d]²``, exact for any ``K``. Taking ``K`` from the data keeps
    ``E[d]`` of the order of the spread, so the subtraction does not cancel the way the
    textbook ``E[x²] - E[x]²`` does for a channel whose mean dwarfs its spread.
    """
    xf = x.astype(compute_dtype(x.dtype))
    first = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
    # var does not depend on K, so holding K constant leaves the gradients exact.
    shift = jax.lax.stop_gradient(xf[first])
    d = xf - shift
    mean_d = jnp.mean(d, axis=axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(d), axis=axes, keepdims=True) - jnp.square(mean_d), 0.0)
    return shift + mean_d, var


def _affine_params(
    shape: tuple[int, ...], affine: bool, bias: bool, param_dtype: Dtype
) -> tuple[nnx.Param | None, nnx.Param | None]:
    scale = nnx.Param(jnp.ones(shape, param_dtype)) if affine else None
    shift = nnx.Param(jnp.zeros(shape, param_dtype)) if affine and bias else None
    return scale, shift


def _normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    eps: float,
    scale: nnx.Param | None,
    bias: nnx.Param | None,
    dtype: Dtype | None,
) -> jax.Array:
    # Fold the affine into one multiplier and one offset so XLA emits a single fused FMA.
    compute = compute_dtype(x.dtype)
    mean, var = mean.astype(compute), var.astype(compute)
    mul = jax.lax.rsqrt(var + eps)
    if scale is not None:
        mul = mul * scale[...].astype(compute)
    y = x.astype(compute) * mul - mean * mul
    if bias is not None:
        y = y + bias[...].astype(compute)
    return y.astype(dtype or x.dtype)


def _init_tracked_norm(
    norm: nnx.Module,
    num_features: int,
    eps: float,
    momentum: float | None,
    affine: bool,
    track_running_stats: bool,
    dtype: Dtype | None,
    param_dtype: Dtype,
) -> None:
    """The state BatchNorm2d and InstanceNorm2d share, named like PyTorch's buffers."""
    norm.num_features = num_features
    norm.eps = eps
    norm.momentum = momentum
    norm.track_running_stats = track_running_stats
    norm.dtype = dtype
    norm.use_running_average = False
    norm.scale, norm.bias = _affine_params((num_features,), affine, True, param_dtype)
    if track_running_stats:
        stat_dtype = compute_dtype(param_dtype)
        norm.mean = nnx.BatchStat(jnp.zeros((num_features,), stat_dtype))
        norm.var = nnx.BatchStat(jnp.ones((num_features,), stat_dtype))
        norm.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
    else:
        norm.mean = norm.var = norm.num_batches_tracked = None


class BatchNorm2d(nnx.Module):
    """``torch.nn.BatchNorm2d`` on NHWC input.

    PyTorch conventions: ``momentum`` weights the new batch (0.1 by default; ``None`` means
    a cumulative average over ``num_batches_tracked``), and the running variance receives
    the *unbiased* batch variance while the output uses the biased one.

    Under ``jax.jit`` with a batch sharded over devices the statistics are global (SyncBN);
    inside ``shard_map`` they are per device, like PyTorch DDP.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        _init_tracked_norm(
            self, num_features, eps, momentum, affine, track_running_stats, dtype, param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input("BatchNorm2d", x, (4,), self.num_features)
        if self.use_running_average and self.track_running_stats:
            mean = self.mean[...]
            var = self.var[...]
        else:
            if not self.use_running_average and x.shape[0] * x.shape[1] * x.shape[2] < 2:
                raise ValueError(
                    f"BatchNorm2d needs more than 1 value per channel when training, got input "
                    f"shape {tuple(x.shape)}"
                )
            mean, var = _moments(x, (0, 1, 2))
            if self.track_running_stats and not self.use_running_average:
                self._update_running_stats(mean.reshape(-1), var.reshape(-1), x)
        return _normalize(x, mean, var, self.eps, self.scale, self.bias, self.dtype)

    def _update_running_stats(self, mean: jax.Array, var: jax.Array, x: jax.Array) -> None:
        n = x.shape[0] * x.shape[1] * x.shape[2]
        count = self.num_batches_tracked[...] + 1
        self.num_batches_tracked[...] = count
        stat_dtype = self.mean[...].dtype
        if self.momentum is None:
            momentum = 1.0 / count.astype(stat_dtype)
        else:
            momentum = self.momentum
        unbiased = (var * (n / (n - 1))).astype(stat_dtype)
        self.mean[...] = (1 - momentum) * self.mean[...] + momentum * mean.astype(stat_dtype)
        self.var[...] = (1 - momentum) * self.var[...] + momentum * unbiased


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm(num_groups, num_channels)`` on channel-last input ``(N, ..., C)``."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(
                f"GroupNorm: num_groups={num_groups} must be a positive divisor of "
                f"num_channels={num_channels}; allowed: "
                f"{[g for g in range(1, num_channels + 1) if num_channels % g == 0]}"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.dtype = dtype
        self.scale, self.bias = _affine_params((num_channels,), affine, True, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input("GroupNorm", x, (2, 3, 4, 5), self.num_channels)
        n, c = x.shape[0], x.shape[-1]
        grouped = x.reshape(n, -1, self.num_groups, c // self.num_groups)
        mean, var = _moments(grouped, (1, 3))
        compute = compute_dtype(x.dtype)
        mul = jax.lax.rsqrt(var + self.eps)
        y = ((grouped.astype(compute) - mean) * mul).reshape(x.shape)
        if self.scale is not None:
            y = y * self.scale[...].astype(compute) + self.bias[...].astype(compute)
        return y.astype(self.dtype or x.dtype)


class InstanceNorm2d(nnx.Module):
    """``torch.nn.InstanceNorm2d`` on NHWC input: per sample and channel over H and W.

    PyTorch's defaults: no affine parameters and no running statistics. With
    ``track_running_stats=True`` the running stats average the per-instance statistics
    (unbiased variance over H·W) and eval mode uses them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        _init_tracked_norm(
            self, num_features, eps, momentum, affine, track_running_stats, dtype, param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input("InstanceNorm2d", x, (3, 4), self.num_features)
        batched = x if x.ndim == 4 else x[None]
        if self.use_running_average and self.track_running_stats:
            mean, var = self.mean[...], self.var[...]
        else:
            n = batched.shape[1] * batched.shape[2]
            if n < 2:
                raise ValueError(
                    f"InstanceNorm2d needs more than 1 spatial element when using instance "
                    f"statistics, got input shape {tuple(x.shape)}"
                )
            mean, var = _moments(batched, (1, 2))
            if self.track_running_stats:
                # torch's instance_norm passes momentum=None as 0.0 (the running stats stay
                # put) and never counts batches.
                momentum = 0.0 if self.momentum is None else self.momentum
                stat_dtype = self.mean[...].dtype
                inst_mean = mean.mean((0, 1, 2)).astype(stat_dtype)
                inst_var = (var * (n / max(n - 1, 1))).mean((0, 1, 2)).astype(stat_dtype)
                self.mean[...] = (1 - momentum) * self.mean[...] + momentum * inst_mean
                self.var[...] = (1 - momentum) * self.var[...] + momentum * inst_var
        y = _normalize(batched, mean, var, self.eps, self.scale, self.bias, self.dtype)
        return y if x.ndim == 4 else y[0]


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(d) for d in normalized_shape)


def _check_trailing(layer: str, x: jax.Array, shape: tuple[int, ...]) -> None:
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
        raise ValueError(
            f"{layer}: input shape {tuple(x.shape)} does not end with "
            f"normalized_shape {shape}"
        )


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm(normalized_shape)``: normalizes over the trailing dims.

    Layout-agnostic like PyTorch's; ``normalized_shape`` and the affine parameters are in
    the input's own axis order (``(H, W, C)`` for an NHWC image, not ``(C, H, W)``).
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.dtype = dtype
        self.scale, self.bias = _affine_params(
            self.normalized_shape, elementwise_affine, bias, param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_trailing("LayerNorm", x, self.normalized_shape)
        axes = tuple(range(x.ndim - len(self.normalized_shape), x.ndim))
        mean, var = _moments(x, axes)
        compute = compute_dtype(x.dtype)
        y = (x.astype(compute) - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(compute)
        if self.bias is not None:
            y = y + self.bias[...].astype(compute)
        return y.astype(self.dtype or x.dtype)


class RMSNorm(nnx.Module):
    """``torch.nn.RMSNorm(normalized_shape)``: ``x / sqrt(mean(x²) + eps) * weight``.

    ``eps=None`` means the machine epsilon of the input dtype, as in PyTorch.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.dtype = dtype
        self.scale, _ = _affine_params(
            self.normalized_shape, elementwise_affine, False, param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_trailing("RMSNorm", x, self.normalized_shape)
        axes = tuple(range(x.ndim - len(self.normalized_shape), x.ndim))
        # torch computes half-precision RMSNorm in float32 and takes float32's epsilon.
        compute = compute_dtype(x.dtype)
        eps = float(jnp.finfo(compute).eps) if self.eps is None else self.eps
        xf = x.astype(compute)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(compute)
        return y.astype(self.dtype or x.dtype)


class RMSNorm2d(nnx.Module):
    """The seed's ``RMSNorm2d``: RMSNorm over the channels of an image.

    PyTorch needs two permutes around ``nn.RMSNorm`` for NCHW; in NHWC the channels are
    already last. The ``norm`` child mirrors the PyTorch module tree for weight conversion.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.num_channels = num_channels
        self.norm = RMSNorm(
            num_channels, eps, elementwise_affine, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input("RMSNorm2d", x, (4,), self.num_channels)
        return self.norm(x)


def _group_norm(num_channels: int, groups: int, kw: dict[str, Any]) -> GroupNorm:
    if num_channels % groups != 0:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ValueError(
            f"norm 'gn' with groups={groups} does not divide the {num_channels} channels of "
            f"a layer; the divisors of {num_channels}: {', '.join(map(str, divisors))}"
        )
    return GroupNorm(groups, num_channels, **kw)


# The norm after each conv, by canonical name: (channels, groups, dtype kwargs) -> layer.
# ``ln`` and ``in`` are the study's GroupNorm forms for conv nets: one group, and one group
# per channel.
NORM_LAYERS: dict[str, Callable[[int, int, dict[str, Any]], nnx.Module]] = {
    "bn": lambda c, g, kw: BatchNorm2d(c, **kw),
    "ln": lambda c, g, kw: GroupNorm(1, c, **kw),
    "gn": _group_norm,
    "in": lambda c, g, kw: GroupNorm(c, c, **kw),
    "rms": lambda c, g, kw: RMSNorm2d(c, **kw),
}
assert tuple(NORM_LAYERS) == NORMS


def make_norm(
    name: str,
    num_channels: int,
    *,
    groups: int = 32,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Module:
    """The norm layer a ResNet uses after each conv, chosen by name or alias (see ``NORMS``)."""
    return NORM_LAYERS[canonical_norm(name)](
        num_channels, groups, dict(dtype=dtype, param_dtype=param_dtype)
    )


def norm_scale(norm: nnx.Module) -> nnx.Param | None:
    """The learnable per-channel scale of a norm made by ``make_norm``."""
    if isinstance(norm, RMSNorm2d):
        return norm.norm.scale
    return norm.scale
