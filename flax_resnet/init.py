"""The ``torch.nn.init`` family as JAX initializers for Flax kernel layouts.

Every factory returns a standard JAX initializer ``init(key, shape, dtype) -> jax.Array``, usable
as ``nnx.Conv(kernel_init=...)`` / ``nnx.Linear(kernel_init=...)``.

Flax stores kernels as conv HWIO ``(*spatial, in, out)`` and dense ``(in, out)``, while PyTorch
stores them as ``(out, in, *spatial)`` and ``(out, in)``. Layout-dependent factories take
``in_axis``/``out_axis`` (defaults -2/-1, the Flax layout) and reproduce exactly the numbers torch
computes on the equivalent torch tensor: the same fans, and for structured initialisers (``eye``,
``dirac``, ``sparse``, ``orthogonal``) the same matrix transposed into the Flax layout.

RNG streams differ between the frameworks, so random initialisers match torch in distribution,
not sample by sample.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn.initializers import Initializer

from flax_resnet.config import INIT_SCHEMES, canonical_init

__all__ = [
    "INIT_SCHEMES",
    "InitScheme",
    "calculate_gain",
    "compute_fans",
    "constant",
    "dirac",
    "eye",
    "get_init_scheme",
    "kaiming_normal",
    "kaiming_uniform",
    "normal",
    "ones",
    "orthogonal",
    "sparse",
    "torch_default_bias",
    "torch_default_kernel",
    "trunc_normal",
    "uniform",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]

Shape = Sequence[int]

_LINEAR_FNS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)
_NONLINEARITIES = (*_LINEAR_FNS, "sigmoid", "tanh", "relu", "leaky_relu", "selu")
_FAN_MODES = ("fan_in", "fan_out")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype) -> jnp.dtype:
    """Sample in at least float32: bf16/f16 sampling is coarse and QR does not support it."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _normalise_axes(ndim: int, in_axis: int, out_axis: int) -> tuple[int, int]:
    axes = []
    for name, axis in (("in_axis", in_axis), ("out_axis", out_axis)):
        if not -ndim <= axis < ndim:
            raise ValueError(f"{name}={axis} is out of range for a {ndim}-D kernel")
        axes.append(axis % ndim)
    if axes[0] == axes[1]:
        raise ValueError(f"in_axis={in_axis} and out_axis={out_axis} name the same axis")
    return axes[0], axes[1]


def _torch_layout(shape: Shape, in_axis: int, out_axis: int) -> tuple[tuple[int, ...], int, int]:
    """The torch-layout shape ``(out, in, *rest)`` of a kernel, plus the normalised axes.

    ``rest`` keeps the remaining axes in their original order, which is what turns HWIO into
    OIHW (the spatial axes keep their relative order in both layouts).
    """
    shape = tuple(shape)
    i, o = _normalise_axes(len(shape), in_axis, out_axis)
    rest = tuple(s for ax, s in enumerate(shape) if ax not in (i, o))
    return (shape[o], shape[i], *rest), i, o


def _from_torch_layout(t: jax.Array, in_axis: int, out_axis: int) -> jax.Array:
    """Move a ``(out, in, *rest)`` array into the layout described by the normalised axes."""
    return jnp.moveaxis(t, (0, 1), (out_axis, in_axis))


def _is_empty(shape: Shape) -> bool:
    return math.prod(shape) == 0


# --------------------------------------------------------------------------------------------
# gains and fans
# --------------------------------------------------------------------------------------------


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """Recommended gain for a nonlinearity; mirrors ``torch.nn.init.calculate_gain``."""
    if nonlinearity in _LINEAR_FNS or nonlinearity == "sigmoid":
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            negative_slope = 0.01
        # bool is a subclass of int, so torch rejects it explicitly; we copy that check verbatim.
        elif (not isinstance(param, bool) and isinstance(param, int)) or isinstance(param, float):
            negative_slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + negative_slope**2))
    if nonlinearity == "selu":
        # torch's empirical value (pytorch/pytorch#50664).
        return 3.0 / 4
    raise ValueError(
        f"Unsupported nonlinearity {nonlinearity!r}; expected one of {_NONLINEARITIES}"
    )


def compute_fans(shape: Shape, in_axis: int = -2, out_axis: int = -1) -> tuple[int, int]:
    """``(fan_in, fan_out)``; mirrors ``torch.nn.init._calculate_fan_in_and_fan_out``.

    fan_in = shape[in_axis] * receptive, fan_out = shape[out_axis] * receptive, where receptive
    is the product of all other axes.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions"
        )
    (n_out, n_in, *rest), _, _ = _torch_layout(shape, in_axis, out_axis)
    receptive = math.prod(rest)
    return n_in * receptive, n_out * receptive


def _fan(shape: Shape, mode: str, in_axis: int, out_axis: int) -> int:
    fan_in, fan_out = compute_fans(shape, in_axis, out_axis)
    return fan_in if mode == "fan_in" else fan_out


def _check_mode(mode: str) -> None:
    if mode not in _FAN_MODES:
        raise ValueError(f"Mode {mode!r} not supported, please use one of {_FAN_MODES}")


# --------------------------------------------------------------------------------------------
# samplers
#
# Each sampler is jitted once at module level with the shape/layout static and the
# distribution's parameters traced, and always samples in its compute dtype (>= float32); the
# cast to the requested dtype happens outside. Model construction usually runs eagerly, where
# every jnp op on a new shape is a separate XLA compile: this way there is one fused program per
# (sampler, shape), shared by every factory instance and by float32/bfloat16 parameters.
# Inside an outer jit these calls are simply inlined.
# --------------------------------------------------------------------------------------------

_STATIC = ("shape", "dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _uniform_sample(key: jax.Array, low, high, *, shape: tuple[int, ...], dtype) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=low, maxval=high)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _normal_sample(key: jax.Array, mean, std, *, shape: tuple[int, ...], dtype) -> jax.Array:
    return mean + std * jax.random.normal(key, shape, dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _trunc_normal_sample(
    key: jax.Array, mean, std, a, b, *, shape: tuple[int, ...], dtype
) -> jax.Array:
    z = jax.random.truncated_normal(key, (a - mean) / std, (b - mean) / std, shape, dtype)
    # mean + std*z can round a hair past a bound; torch clamps for the same reason.
    return jnp.clip(mean + std * z, a, b)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _orthonormal_columns(key: jax.Array, *, shape: tuple[int, int], dtype) -> jax.Array:
    """A tall ``shape`` matrix with Haar-distributed orthonormal columns."""
    q, r = jnp.linalg.qr(jax.random.normal(key, shape, dtype))
    # The sign fix makes Q Haar-distributed (Mezzadri 2007), as torch does.
    return q * jnp.sign(jnp.diagonal(r))


@functools.partial(jax.jit, static_argnames=(*_STATIC, "in_axis", "out_axis"))
def _sparse_sample(
    key: jax.Array,
    std,
    num_zeros,
    *,
    shape: tuple[int, ...],
    dtype,
    in_axis: int,
    out_axis: int,
) -> jax.Array:
    (rows, cols), i, o = _torch_layout(shape, in_axis, out_axis)
    k_val, k_perm = jax.random.split(key)
    values = std * jax.random.normal(k_val, (rows, cols), dtype)
    # An independent random permutation per column: the ranks of iid uniforms along the rows.
    # argsort yields a true permutation even with ties, so the zero count is exact.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_perm, (rows, cols)), axis=0), axis=0)
    return _from_torch_layout(jnp.where(ranks < num_zeros, 0.0, values), i, o)


def _draw(sampler: Callable, key: jax.Array, *params, shape: Shape, dtype, **static) -> jax.Array:
    shape = _as_shape(shape)
    if sampler in _ELEMENTWISE and not _traced(key, *params):
        # Eagerly, draw a flat sample of a power-of-two length and cut it to size on the host:
        # a ResNet has dozens of kernel shapes, and one XLA compile per shape made building a
        # model take seconds to tens of seconds on CPU. Under a trace, draw the shape directly.
        n = math.prod(shape)
        flat = sampler(key, *params, shape=(_bucket(n),), dtype=_compute_dtype(dtype), **static)
        return jnp.asarray(np.asarray(flat)[:n].reshape(shape).astype(dtype))
    x = sampler(key, *params, shape=shape, dtype=_compute_dtype(dtype), **static)
    return x.astype(dtype)


def _bucket(n: int) -> int:
    return max(1024, 1 << max(n - 1, 0).bit_length())


def _traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


_ELEMENTWISE = (_uniform_sample, _normal_sample, _trunc_normal_sample)


def _as_shape(shape: Shape) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


def _constant_kernel(t: np.ndarray, in_axis: int, out_axis: int, dtype) -> jax.Array:
    # Key-free kernels are built in numpy: no XLA compile per shape, and exact in any dtype.
    return jnp.asarray(np.moveaxis(t, (0, 1), (out_axis, in_axis)), dtype=dtype)


# --------------------------------------------------------------------------------------------
# elementary distributions
# --------------------------------------------------------------------------------------------


def constant(value: float) -> Initializer:
    """Fill with ``value``; mirrors ``torch.nn.init.constant_``."""

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        del key
        return jnp.full(shape, value, dtype)

    return init


def ones() -> Initializer:
    """Fill with 1; mirrors ``torch.nn.init.ones_``."""
    return constant(1.0)


def zeros() -> Initializer:
    """Fill with 0; mirrors ``torch.nn.init.zeros_``."""
    return constant(0.0)


def uniform(a: float = 0.0, b: float = 1.0) -> Initializer:
    """U(a, b); mirrors ``torch.nn.init.uniform_``."""

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        return _draw(_uniform_sample, key, a, b, shape=shape, dtype=dtype)

    return init


def normal(mean: float = 0.0, std: float = 1.0) -> Initializer:
    """N(mean, std²), not truncated; mirrors ``torch.nn.init.normal_``."""

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        return _draw(_normal_sample, key, mean, std, shape=shape, dtype=dtype)

    return init


def trunc_normal(
    mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> Initializer:
    """N(mean, std²) truncated to the absolute interval [a, b]; mirrors ``trunc_normal_``.

    Unlike ``jax.nn.initializers.truncated_normal`` the bounds are absolute, not in units of std,
    and ``std`` is the std of the parent normal (torch does not rescale after truncation).
    """

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        return _draw(_trunc_normal_sample, key, mean, std, a, b, shape=shape, dtype=dtype)

    return init


# --------------------------------------------------------------------------------------------
# structured initialisers
# --------------------------------------------------------------------------------------------


def eye(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """Identity for 2-D kernels; mirrors ``torch.nn.init.eye_`` on the ``(out, in)`` tensor.

    In the default ``(in, out)`` layout the result is ``jnp.eye(in, out)``.
    """

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        del key
        if len(shape) != 2:
            raise ValueError("Only tensors with 2 dimensions are supported")
        (n_out, n_in), i, o = _torch_layout(shape, in_axis, out_axis)
        return _constant_kernel(np.eye(n_out, n_in), i, o, dtype)

    return init


def dirac(groups: int = 1, in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """Dirac delta for 3/4/5-D conv kernels; mirrors ``torch.nn.init.dirac_``.

    torch fills ``(out, in, *spatial)``; the result here is the same tensor in the Flax layout
    ``(*spatial, in, out)`` (or wherever ``in_axis``/``out_axis`` put those axes).
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        del key
        if len(shape) not in (3, 4, 5):
            raise ValueError("Only tensors with 3, 4, or 5 dimensions are supported")
        tshape, i, o = _torch_layout(shape, in_axis, out_axis)
        n_out, n_in, *spatial = tshape
        if n_out % groups != 0:
            raise ValueError(f"out channels ({n_out}) must be divisible by groups ({groups})")
        out_per_group = n_out // groups
        centre = tuple(s // 2 for s in spatial)
        t = np.zeros(tshape)
        # Group g maps input channel d to output channel g * out_per_group + d.
        for g in range(groups):
            for d in range(min(out_per_group, n_in)):
                t[(g * out_per_group + d, d, *centre)] = 1
        return _constant_kernel(t, i, o, dtype)

    return init


def sparse(
    sparsity: float, std: float = 0.01, in_axis: int = -2, out_axis: int = -1
) -> Initializer:
    """Sparse N(0, std²) matrix; mirrors ``torch.nn.init.sparse_`` on the ``(out, in)`` tensor.

    torch zeroes ``ceil(sparsity * rows)`` random rows in every column; with rows = out and
    cols = in that means, in Flax ``(in, out)`` layout, that many zeros along the out axis for
    every input index.
    """

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        if len(shape) != 2:
            raise ValueError("Only tensors with 2 dimensions are supported")
        (rows, _), _, _ = _torch_layout(shape, in_axis, out_axis)
        # Computed exactly as torch does, float rounding included: ceil(0.07 * 100) == 8.
        num_zeros = math.ceil(sparsity * rows)
        return _draw(
            _sparse_sample,
            key,
            std,
            num_zeros,
            shape=shape,
            dtype=dtype,
            in_axis=in_axis,
            out_axis=out_axis,
        )

    return init


def orthogonal(gain: float = 1.0, in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """(Semi-)orthogonal matrix; mirrors ``torch.nn.init.orthogonal_``.

    torch flattens ``(out, in, *spatial)`` to ``(out, numel // out)`` and makes that matrix
    semi-orthogonal, so the *out* axis is always the row axis; the result is then reshaped back
    and moved into the Flax layout.
    """

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        if len(shape) < 2:
            raise ValueError("Only tensors with 2 or more dimensions are supported")
        tshape, i, o = _torch_layout(shape, in_axis, out_axis)
        if _is_empty(shape):
            return jnp.zeros(shape, dtype)
        rows = tshape[0]
        cols = math.prod(tshape) // rows
        # torch QR-factorises the transpose of a wide matrix. Drawing the tall matrix directly is
        # the same distribution (iid normals), and lets the tall and wide shapes of a matrix
        # share one compiled QR: only the (max, min) shape is static.
        tall = (max(rows, cols), min(rows, cols))
        q = _orthonormal_columns(key, shape=tall, dtype=_compute_dtype(dtype))
        if rows < cols:
            q = q.T
        return _from_torch_layout((gain * q).reshape(tshape), i, o).astype(dtype)

    return init


# --------------------------------------------------------------------------------------------
# fan-scaled initialisers
# --------------------------------------------------------------------------------------------


def xavier_uniform(gain: float = 1.0, in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """U(±gain·sqrt(6/(fan_in+fan_out))); mirrors ``torch.nn.init.xavier_uniform_``."""

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        fan_in, fan_out = compute_fans(shape, in_axis, out_axis)
        if _is_empty(shape):
            return jnp.zeros(shape, dtype)
        std = gain * math.sqrt(2.0 / (fan_in + fan_out))
        bound = math.sqrt(3.0) * std
        return _draw(_uniform_sample, key, -bound, bound, shape=shape, dtype=dtype)

    return init


def xavier_normal(gain: float = 1.0, in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """N(0, (gain·sqrt(2/(fan_in+fan_out)))²), not truncated; mirrors ``xavier_normal_``.

    ``jax.nn.initializers.glorot_normal`` samples a *truncated* normal, hence this function.
    """

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        fan_in, fan_out = compute_fans(shape, in_axis, out_axis)
        if _is_empty(shape):
            return jnp.zeros(shape, dtype)
        std = gain * math.sqrt(2.0 / (fan_in + fan_out))
        return _draw(_normal_sample, key, 0.0, std, shape=shape, dtype=dtype)

    return init


def kaiming_uniform(
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    in_axis: int = -2,
    out_axis: int = -1,
) -> Initializer:
    """U(±sqrt(3)·gain/sqrt(fan)); mirrors ``torch.nn.init.kaiming_uniform_``."""
    _check_mode(mode)
    gain = calculate_gain(nonlinearity, a)

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        fan = _fan(shape, mode, in_axis, out_axis)
        if _is_empty(shape):
            return jnp.zeros(shape, dtype)
        bound = math.sqrt(3.0) * gain / math.sqrt(fan)
        return _draw(_uniform_sample, key, -bound, bound, shape=shape, dtype=dtype)

    return init


def kaiming_normal(
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    in_axis: int = -2,
    out_axis: int = -1,
) -> Initializer:
    """N(0, (gain/sqrt(fan))²), not truncated; mirrors ``torch.nn.init.kaiming_normal_``.

    ``jax.nn.initializers.he_normal`` samples a *truncated* normal, hence this function.
    """
    _check_mode(mode)
    gain = calculate_gain(nonlinearity, a)

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> jax.Array:
        fan = _fan(shape, mode, in_axis, out_axis)
        if _is_empty(shape):
            return jnp.zeros(shape, dtype)
        return _draw(_normal_sample, key, 0.0, gain / math.sqrt(fan), shape=shape, dtype=dtype)

    return init


def torch_default_kernel(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """PyTorch's default ``Conv*d``/``Linear`` weight init: ``kaiming_uniform_(a=sqrt(5))``.

    The gain sqrt(2/(1+5)) cancels the sqrt(3), so this is U(±1/sqrt(fan_in)).
    """
    return kaiming_uniform(a=math.sqrt(5), in_axis=in_axis, out_axis=out_axis)


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default ``Conv*d``/``Linear`` bias init: U(±1/sqrt(fan_in)), 0 if fan_in == 0.

    The bias has no fan of its own, so the layer's kernel fan_in is passed in.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(-bound, bound)


# --------------------------------------------------------------------------------------------
# model-level schemes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitScheme:
    """Initialisers for a whole ResNet: conv kernels, classifier kernel and classifier bias."""

    name: str
    conv_kernel: Initializer  # HWIO conv kernels
    linear_kernel: Initializer  # (in, out) dense kernels
    linear_bias: Callable[[int], Initializer]  # given the layer's fan_in


def _zero_bias(fan_in: int) -> Initializer:
    del fan_in
    return zeros()


def _same(kernel: Initializer) -> tuple[Initializer, Initializer, Callable[[int], Initializer]]:
    return kernel, kernel, _zero_bias


_RELU_GAIN = calculate_gain("relu")
# name -> () -> (conv kernel, classifier kernel, classifier bias given its fan_in)
_SCHEME_BUILDERS: dict[str, Callable[[], tuple[Any, Any, Any]]] = {
    "torch": lambda: (torch_default_kernel(), torch_default_kernel(), torch_default_bias),
    # The study's init_weights(): He fan_out for convs, Glorot (ReLU gain) for the head.
    "study": lambda: (kaiming_normal(mode="fan_out", nonlinearity="relu"),
                      xavier_uniform(gain=_RELU_GAIN), _zero_bias),
    # torchvision.models.resnet re-inits convs but leaves nn.Linear at its defaults.
    "torchvision": lambda: (kaiming_normal(mode="fan_out", nonlinearity="relu"),
                            torch_default_kernel(), torch_default_bias),
    "kaiming_normal": lambda: _same(kaiming_normal(mode="fan_in", nonlinearity="relu")),
    "kaiming_uniform": lambda: _same(kaiming_uniform(mode="fan_in", nonlinearity="relu")),
    "xavier_normal": lambda: _same(xavier_normal(gain=1.0)),
    "xavier_uniform": lambda: _same(xavier_uniform(gain=1.0)),
    "orthogonal": lambda: (orthogonal(gain=_RELU_GAIN), orthogonal(gain=1.0), _zero_bias),
}
assert tuple(_SCHEME_BUILDERS) == INIT_SCHEMES


def get_init_scheme(name: str) -> InitScheme:
    """The named model-level init scheme (one of ``INIT_SCHEMES``)."""
    name = canonical_init(name)
    return InitScheme(name, *_SCHEME_BUILDERS[name]())
