"""Each standalone layer of ``flax_resnet.norms`` against its PyTorch twin.

Flax layers are channel-last (NHWC), PyTorch's channel-first (NCHW): inputs are transposed,
parameters copied from the randomly initialised torch layer, and outputs/statistics compared.

Tolerances. One normalization layer is a two-pass mean/variance reduction over at most a few
thousand float32 values plus an elementwise affine: the two frameworks differ only in the
order of summation, ~sqrt(n) ulps ≈ 1e-6 relative at worst here. Outputs must agree within
1e-5·max|y| and running statistics within 1e-5·max|stat|: ~10x headroom, while a wrong eps
(1e-6 vs 1e-5), momentum convention or biased/unbiased variance is a >=1e-3 effect on the
inputs below (small-variance inputs make eps visible; see the eps sensitivity checks).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

import torch_ref
from flax_resnet import norms as fnorms
from parity_tests.harness import rel_err

RTOL = 1e-5  # outputs and running stats, see the module docstring
# bfloat16 keeps 8 significant bits: one rounding of the output is <= 2^-9 relative, and
# PyTorch rounds twice (normalized value, then times the weight) where Flax rounds once,
# so <= 2 ulps of the largest value: 2^-7 * max|y|.
BF16_RTOL = 2.0**-7

# NHWC shapes: odd sizes, a single sample, 1x2 spatial, more channels.
SHAPES_4D = [(4, 7, 5, 3), (1, 9, 11, 6), (3, 1, 2, 5), (2, 13, 17, 16)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([12345, *key])


def sample(shape: tuple[int, ...], *key: int, loc: float = 0.5, scale: float = 2.0) -> np.ndarray:
    """Non-zero mean and non-unit variance so that both the centring and the scaling matter."""
    return (loc + scale * rng(*key).standard_normal(shape)).astype(np.float32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """A channel-last numpy array as a channel-first torch tensor (any rank >= 2)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def from_nchw(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().float().numpy(), 1, -1)


def randomize_(layer: nn.Module, seed: int = 0) -> None:
    """Random affine params and running stats (so eval mode and the copy are real tests)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.uniform_(0.5, 1.5, generator=gen)
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_(0.0, 0.3, generator=gen)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.normal_(0.0, 0.3, generator=gen)
            layer.running_var.uniform_(0.5, 2.0, generator=gen)


def copy_params(flax_layer: nnx.Module, torch_layer: nn.Module, perm=None) -> None:
    """torch weight/bias/running stats -> Flax scale/bias/mean/var (affine permuted by perm)."""

    def arr(t: torch.Tensor) -> jnp.ndarray:
        a = t.detach().numpy()
        return jnp.asarray(a.transpose(perm) if perm is not None and a.ndim > 1 else a)

    pairs = [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean")]
    for fname, tname in [*pairs, ("var", "running_var")]:
        fvar = getattr(flax_layer, fname, None)
        tval = getattr(torch_layer, tname, None)
        assert (fvar is None) == (tval is None), f"{fname} present in only one framework"
        if fvar is not None:
            fvar[...] = arr(tval)
    if getattr(torch_layer, "num_batches_tracked", None) is not None:
        flax_layer.num_batches_tracked[...] = jnp.asarray(int(torch_layer.num_batches_tracked))


def set_mode(flax_layer: nnx.Module, torch_layer: nn.Module, train: bool) -> None:
    if train:
        flax_layer.train()
        torch_layer.train()
    else:
        flax_layer.eval()
        torch_layer.eval()


def assert_stats_match(flax_layer: nnx.Module, torch_layer: nn.Module) -> None:
    if torch_layer.running_mean is None:
        assert flax_layer.mean is None and flax_layer.var is None
        return
    assert rel_err(flax_layer.mean[...], torch_layer.running_mean.numpy()) <= RTOL
    assert rel_err(flax_layer.var[...], torch_layer.running_var.numpy()) <= RTOL


# ------------------------------------------------------------------------------------------
# BatchNorm2d


@pytest.mark.parametrize("momentum", [0.1, 0.25, None], ids=["m0.1", "m0.25", "mNone"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape", SHAPES_4D, ids=lambda s: "x".join(map(str, s)))
def test_batchnorm2d(shape, affine, track, momentum):
    c = shape[-1]
    t = nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track)
    randomize_(t)
    f = fnorms.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track)
    copy_params(f, t)
    # Three train steps: momentum=None is the cumulative average over num_batches_tracked,
    # and the unbiased n/(n-1) running variance shows up from the first step.
    for step in range(3):
        x = sample(shape, 1, step)
        set_mode(f, t, train=True)
        y_t = from_nchw(t(to_nchw(x)))
        y_f = np.asarray(f(jnp.asarray(x)))
        assert rel_err(y_f, y_t) <= RTOL, f"train step {step}"
        assert_stats_match(f, t)
        if track:
            assert int(f.num_batches_tracked[...]) == int(t.num_batches_tracked)
    x = sample(shape, 2, 0, loc=-0.3, scale=0.7)
    set_mode(f, t, train=False)
    with torch.no_grad():
        y_t = from_nchw(t(to_nchw(x)))
    y_f = np.asarray(f(jnp.asarray(x)))
    assert rel_err(y_f, y_t) <= RTOL, "eval"
    assert_stats_match(f, t)  # eval mode leaves them alone


def test_batchnorm2d_eval_uses_running_stats_not_batch_stats():
    # Sanity check of the comparison itself: random running stats differ from the batch's.
    t = nn.BatchNorm2d(5)
    randomize_(t, seed=3)
    f = fnorms.BatchNorm2d(5)
    copy_params(f, t)
    x = sample((2, 6, 7, 5), 9)
    set_mode(f, t, train=False)
    y_eval = np.asarray(f(jnp.asarray(x)))
    with torch.no_grad():
        assert rel_err(y_eval, from_nchw(t(to_nchw(x)))) <= RTOL
    f.train()
    y_train = np.asarray(f(jnp.asarray(x)))
    assert rel_err(y_eval, y_train) > 1e-2


def _offset_channels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Channels whose mean is 1 to 1e3 times their spread: the case that breaks the
    textbook one-pass variance E[x²] - E[x]² in float32."""
    c = shape[-1]
    x = rng(seed).standard_normal(shape) * np.geomspace(0.01, 1.0, c)
    return (x + np.linspace(-10.0, 10.0, c)).astype(np.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("axes", [(0, 1, 2), (1, 2)], ids=["batch", "instance"])
def test_one_pass_moments_of_16bit_input_are_exact_to_float32(dtype, axes):
    """16-bit inputs take the shifted one-pass moments: against float64 moments of the very
    same (rounded) values they are as accurate as float32 allows, where the textbook one-pass
    formula loses every digit; the gradient matches the two-pass one's."""
    import jax

    x = jnp.asarray(_offset_channels((8, 9, 7, 6), 3), dtype=dtype)
    x64 = np.asarray(x, dtype=np.float64)
    mean, var = fnorms._moments(x, axes)
    ref_mean, ref_var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    # float32 sums of ~500 values: a few ulps (2^-24) of the largest term for the mean. The
    # variance of these channels is hard for float32 itself: two passes are off by up to
    # 3e-6 here, the shifted one pass by up to 2e-5; 1e-4 is 5x that, and 100x below the
    # textbook formula's error. (A channel that 16-bit rounding made constant has variance
    # 0 in both.)
    assert np.max(np.abs(np.asarray(mean) - ref_mean) / np.abs(ref_mean)) <= 1e-6
    assert np.all(np.abs(np.asarray(var) - ref_var) <= 1e-4 * ref_var + 1e-12)
    xf = x.astype(jnp.float32)
    textbook = jnp.mean(xf**2, axis=axes, keepdims=True) - jnp.mean(xf, axis=axes,
                                                                   keepdims=True) ** 2
    assert not np.all(np.abs(np.asarray(textbook) - ref_var) <= 1e-2 * ref_var + 1e-12)

    w = jnp.asarray(rng(4).standard_normal(var.shape), jnp.float32)

    def loss(moments):
        return lambda v: jnp.sum(moments(v, axes)[1] * w) + jnp.sum(moments(v, axes)[0] * w)

    g_one = jax.grad(loss(fnorms._moments_one_pass))(xf)
    g_two = jax.grad(loss(fnorms._moments))(xf)  # float32 input: two-pass
    assert rel_err(np.asarray(g_one), np.asarray(g_two)) <= 1e-5


def test_batchnorm2d_bfloat16_like_torch_autocast():
    """bf16 activations (the one-pass path) against PyTorch's BatchNorm2d on the same bf16
    values: outputs within bf16 rounding, running statistics (float32) within RTOL."""
    shape = (16, 5, 6, 8)
    t = nn.BatchNorm2d(shape[-1])
    randomize_(t)
    f = fnorms.BatchNorm2d(shape[-1], dtype=jnp.bfloat16)
    copy_params(f, t)
    set_mode(f, t, train=True)
    for step in range(2):
        xb = jnp.asarray(_offset_channels(shape, 10 + step), dtype=jnp.bfloat16)
        y_t = from_nchw(t(to_nchw(np.asarray(xb, dtype=np.float32))))
        y_f = f(xb)
        assert y_f.dtype == jnp.bfloat16
        assert rel_err(np.asarray(y_f, dtype=np.float32), y_t) <= BF16_RTOL
        assert_stats_match(f, t)


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
def test_batchnorm2d_one_value_per_channel_raises_in_train_mode(track):
    x = sample((1, 1, 1, 4), 0)
    t = nn.BatchNorm2d(4, track_running_stats=track).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        t(to_nchw(x))
    f = fnorms.BatchNorm2d(4, track_running_stats=track)
    f.train()
    with pytest.raises(ValueError, match=r"\(1, 1, 1, 4\)"):
        f(jnp.asarray(x))


def test_batchnorm2d_one_value_per_channel_is_fine_in_eval_mode():
    x = sample((1, 1, 1, 4), 0)
    t = nn.BatchNorm2d(4)
    randomize_(t)
    f = fnorms.BatchNorm2d(4)
    copy_params(f, t)
    set_mode(f, t, train=False)
    with torch.no_grad():
        assert rel_err(np.asarray(f(jnp.asarray(x))), from_nchw(t(to_nchw(x)))) <= RTOL


# ------------------------------------------------------------------------------------------
# GroupNorm


GROUPNORM_CASES = [
    # (channel-last shape, groups)
    ((4, 7, 5, 6), 1),
    ((4, 7, 5, 6), 2),
    ((4, 7, 5, 6), 3),
    ((4, 7, 5, 6), 6),
    ((1, 9, 11, 16), 4),
    ((2, 13, 17, 32), 32),
    ((5, 12), 4),  # (N, C)
    ((3, 11, 9), 3),  # (N, L, C)
    ((2, 3, 4, 5, 8), 2),  # (N, D, H, W, C)
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(
    "shape,groups",
    GROUPNORM_CASES,
    ids=[f"{'x'.join(map(str, s))}-g{g}" for s, g in GROUPNORM_CASES],
)
def test_groupnorm(shape, groups, affine, train):
    c = shape[-1]
    t = nn.GroupNorm(groups, c, affine=affine)
    randomize_(t)
    f = fnorms.GroupNorm(groups, c, affine=affine)
    copy_params(f, t)
    set_mode(f, t, train)
    x = sample(shape, 3, groups)
    y_f = np.asarray(f(jnp.asarray(x)))
    assert rel_err(y_f, from_nchw(t(to_nchw(x)))) <= RTOL


# ------------------------------------------------------------------------------------------
# InstanceNorm2d


def test_instancenorm2d_defaults_like_torch():
    t = nn.InstanceNorm2d(6)
    f = fnorms.InstanceNorm2d(6)
    assert t.affine is False and t.track_running_stats is False
    assert f.scale is None and f.bias is None
    assert f.mean is None and f.var is None and f.num_batches_tracked is None


@pytest.mark.parametrize("unbatched", [False, True], ids=["NHWC", "HWC"])
@pytest.mark.parametrize(
    "affine,track",
    [(False, False), (True, True), (True, False), (False, True)],
    ids=["default", "affine-track", "affine", "track"],
)
@pytest.mark.parametrize(
    "shape", SHAPES_4D[:2] + SHAPES_4D[3:], ids=lambda s: "x".join(map(str, s))
)
def test_instancenorm2d(shape, affine, track, unbatched):
    if unbatched:
        shape = shape[1:]
    c = shape[-1]
    t = nn.InstanceNorm2d(c, affine=affine, track_running_stats=track)
    randomize_(t)
    f = fnorms.InstanceNorm2d(c, affine=affine, track_running_stats=track)
    copy_params(f, t)
    for step in range(2):
        x = sample(shape, 4, step)
        set_mode(f, t, train=True)
        y_f = np.asarray(f(jnp.asarray(x)))
        assert rel_err(y_f, from_nchw_any(t(to_nchw_any(x)))) <= RTOL, f"train step {step}"
        assert_stats_match(f, t)
    x = sample(shape, 5, 0, loc=-0.2, scale=0.6)
    set_mode(f, t, train=False)
    with torch.no_grad():
        y_t = from_nchw_any(t(to_nchw_any(x)))
    assert rel_err(np.asarray(f(jnp.asarray(x))), y_t) <= RTOL, "eval"


def to_nchw_any(x: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W) and unbatched (H, W, C) -> (C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def from_nchw_any(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().numpy(), -3, -1)


def test_instancenorm2d_momentum_none_like_torch():
    """PyTorch's InstanceNorm passes ``momentum=None`` on as 0.0 (running stats never move)
    and never increments ``num_batches_tracked``; the Flax twin must do the same."""
    t = nn.InstanceNorm2d(4, momentum=None, affine=True, track_running_stats=True)
    randomize_(t)
    f = fnorms.InstanceNorm2d(4, momentum=None, affine=True, track_running_stats=True)
    copy_params(f, t)
    set_mode(f, t, train=True)
    for step in range(2):
        x = sample((3, 5, 6, 4), 6, step)
        assert rel_err(np.asarray(f(jnp.asarray(x))), from_nchw(t(to_nchw(x)))) <= RTOL
    assert int(f.num_batches_tracked[...]) == int(t.num_batches_tracked)
    assert_stats_match(f, t)


def test_instancenorm2d_one_spatial_element_raises_like_torch():
    """PyTorch refuses instance statistics of a single value (train mode, or no running
    stats); the Flax twin silently returns the bias."""
    x = sample((2, 1, 1, 3), 7)
    t = nn.InstanceNorm2d(3)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        t(to_nchw(x))
    f = fnorms.InstanceNorm2d(3)
    f.train()
    with pytest.raises(ValueError, match=r"\(2, 1, 1, 3\)"):
        f(jnp.asarray(x))


# ------------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize(
    "affine,bias",
    [(True, True), (True, False), (False, False)],
    ids=["affine", "nobias", "noaffine"],
)
@pytest.mark.parametrize(
    "shape,ndims",
    [((4, 9, 7), 1), ((3, 5, 6, 10), 1), ((2, 5, 6, 7), 2), ((3, 4, 11, 13), 2)],
    ids=["NLC-1d", "NHWC-1d", "2d", "2d-b"],
)
def test_layernorm_layout_agnostic(shape, ndims, affine, bias):
    """normalized_shape of 1 and 2 trailing dims: the same tensor in both frameworks."""
    normalized = shape[-ndims:]
    t = nn.LayerNorm(list(normalized), elementwise_affine=affine, bias=bias)
    randomize_(t)
    f = fnorms.LayerNorm(normalized, elementwise_affine=affine, bias=bias)
    copy_params(f, t)
    x = sample(shape, 8, ndims)
    for train in (True, False):
        set_mode(f, t, train)
        y_t = t(torch.from_numpy(x)).detach().numpy()
        assert rel_err(np.asarray(f(jnp.asarray(x))), y_t) <= RTOL


@pytest.mark.parametrize(
    "affine,bias",
    [(True, True), (True, False), (False, False)],
    ids=["affine", "nobias", "noaffine"],
)
@pytest.mark.parametrize(
    "shape", [(2, 5, 7, 3), (1, 9, 11, 6), (3, 4, 4, 8)], ids=lambda s: "x".join(map(str, s))
)
def test_layernorm_over_chw(shape, affine, bias):
    """torch LayerNorm([C, H, W]) on NCHW == Flax LayerNorm((H, W, C)) on NHWC with the
    (C, H, W) affine params permuted to (H, W, C)."""
    n, h, w, c = shape
    t = nn.LayerNorm([c, h, w], elementwise_affine=affine, bias=bias)
    randomize_(t)
    f = fnorms.LayerNorm((h, w, c), elementwise_affine=affine, bias=bias)
    copy_params(f, t, perm=(1, 2, 0))
    x = sample(shape, 9)
    y_t = from_nchw(t(to_nchw(x)))
    assert rel_err(np.asarray(f(jnp.asarray(x))), y_t) <= RTOL


def test_layernorm_eps_matters():
    # Sanity check that the inputs make eps visible: 1e-5 (torch) vs 1e-6 (Flax's default).
    x = sample((4, 16), 10, loc=0.0, scale=3e-3)
    t = nn.LayerNorm(16)
    y_t = t(torch.from_numpy(x)).detach().numpy()
    assert rel_err(np.asarray(fnorms.LayerNorm(16)(jnp.asarray(x))), y_t) <= RTOL
    assert rel_err(np.asarray(fnorms.LayerNorm(16, eps=1e-6)(jnp.asarray(x))), y_t) > 1e-2


# ------------------------------------------------------------------------------------------
# RMSNorm / RMSNorm2d


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("eps", [None, 1e-6, 1e-3], ids=["epsNone", "eps1e-6", "eps1e-3"])
@pytest.mark.parametrize(
    "shape,ndims",
    [((4, 9, 7), 1), ((2, 5, 6, 10), 1), ((3, 5, 6, 7), 2), ((2, 3, 4, 5), 3)],
    ids=["NLC-1d", "NHWC-1d", "2d", "3d"],
)
@pytest.mark.parametrize("scale", [1.0, 1e-4], ids=["unit", "tiny"])
def test_rmsnorm(shape, ndims, eps, affine, scale):
    """``scale=1e-4`` gives mean(x^2) ~ 1e-8 < float32 eps (1.19e-7): eps dominates."""
    normalized = shape[-ndims:]
    t = nn.RMSNorm(list(normalized), eps=eps, elementwise_affine=affine)
    randomize_(t)
    f = fnorms.RMSNorm(normalized, eps=eps, elementwise_affine=affine)
    copy_params(f, t)
    x = sample(shape, 11, ndims, loc=0.0, scale=scale)
    for train in (True, False):
        set_mode(f, t, train)
        y_t = t(torch.from_numpy(x)).detach().numpy()
        assert rel_err(np.asarray(f(jnp.asarray(x))), y_t) <= RTOL


def test_rmsnorm_eps_none_is_float32_machine_eps():
    x = sample((4, 16), 12, loc=0.0, scale=1e-4)
    y_t = nn.RMSNorm(16)(torch.from_numpy(x)).detach().numpy()
    y_none = np.asarray(fnorms.RMSNorm(16)(jnp.asarray(x)))
    y_fp32eps = np.asarray(fnorms.RMSNorm(16, eps=float(np.finfo(np.float32).eps))(jnp.asarray(x)))
    assert rel_err(y_none, y_t) <= RTOL
    assert rel_err(y_fp32eps, y_t) <= RTOL
    for other in (1e-6, 1e-5, 0.0):  # Flax's default, torch LayerNorm's, no eps
        y_other = np.asarray(fnorms.RMSNorm(16, eps=other)(jnp.asarray(x)))
        assert rel_err(y_other, y_t) > 1e-2, other


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_rmsnorm_eps_none_bfloat16_like_torch(affine):
    """eps=None with bfloat16 input. PyTorch's docs say ``torch.finfo(x.dtype).eps`` (2^-7 for
    bf16), but PyTorch computes half-precision inputs in float32 ("opmath") and takes the
    epsilon of *that* type: 1.19e-7. With x ~ 0.05, mean(x^2) ~ 0.0025, so the two readings
    differ by ~2x; the first block pins down what PyTorch actually does."""
    x32 = sample((3, 5, 32), 13, loc=0.0, scale=0.05)
    t = nn.RMSNorm(32, elementwise_affine=affine)
    randomize_(t)
    f = fnorms.RMSNorm(32, elementwise_affine=affine)
    copy_params(f, t)
    y_t = t(torch.from_numpy(x32).bfloat16()).detach()
    assert y_t.dtype == torch.bfloat16
    y_t = y_t.float().numpy()
    xb = torch.from_numpy(x32).bfloat16().float().numpy()  # the input as PyTorch sees it
    weight = t.weight.detach().numpy() if affine else 1.0

    def reference(eps: float) -> np.ndarray:
        return xb / np.sqrt(np.mean(xb**2, axis=-1, keepdims=True) + eps) * weight

    assert rel_err(y_t, reference(float(np.finfo(np.float32).eps))) <= BF16_RTOL
    assert rel_err(y_t, reference(float(torch.finfo(torch.bfloat16).eps))) > 0.1
    y_f = f(jnp.asarray(x32, dtype=jnp.bfloat16))
    assert y_f.dtype == jnp.bfloat16
    assert rel_err(np.asarray(y_f, np.float32), y_t) <= BF16_RTOL


@pytest.mark.parametrize("eps", [None, 1e-5], ids=["epsNone", "eps1e-5"])
@pytest.mark.parametrize("shape", SHAPES_4D, ids=lambda s: "x".join(map(str, s)))
def test_rmsnorm2d(shape, eps):
    c = shape[-1]
    t = torch_ref.RMSNorm2d(c, eps=eps)
    randomize_(t.norm)
    f = fnorms.RMSNorm2d(c, eps=eps)
    copy_params(f.norm, t.norm)
    x = sample(shape, 14, loc=0.0, scale=1.0)
    for train in (True, False):
        set_mode(f, t, train)
        assert rel_err(np.asarray(f(jnp.asarray(x))), from_nchw(t(to_nchw(x)))) <= RTOL


# ------------------------------------------------------------------------------------------
# make_norm


@pytest.mark.parametrize("name", ["bn", "ln", "gn", "in", "rms", "BatchNorm", "group", "layer"])
def test_make_norm_matches_torch_ref(name):
    c = 8
    t = torch_ref.make_norm(name, c, 4)
    f = fnorms.make_norm(name, c, groups=4)
    tt = t.norm if isinstance(t, torch_ref.RMSNorm2d) else t
    ff = f.norm if isinstance(f, fnorms.RMSNorm2d) else f
    randomize_(tt)
    copy_params(ff, tt)
    x = sample((3, 5, 7, c), 15)
    for train in (True, False):
        set_mode(f, t, train)
        with torch.no_grad():
            y_t = from_nchw(t(to_nchw(x)))
        assert rel_err(np.asarray(f(jnp.asarray(x))), y_t) <= RTOL, train


# ------------------------------------------------------------------------------------------
# bad input: ValueError naming the bad value


def _raises(fn, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize(
    "layer,shape",
    [
        (lambda: fnorms.BatchNorm2d(4), (2, 5, 4)),
        (lambda: fnorms.BatchNorm2d(4), (2, 3, 5, 5, 4)),
        (lambda: fnorms.InstanceNorm2d(4), (5, 4)),
        (lambda: fnorms.InstanceNorm2d(4), (1, 2, 3, 5, 4)),
        (lambda: fnorms.GroupNorm(2, 4), (4,)),
        (lambda: fnorms.RMSNorm2d(4), (2, 5, 4)),
    ],
    ids=["bn-3d", "bn-5d", "in-2d", "in-5d", "gn-1d", "rms2d-3d"],
)
def test_wrong_rank_raises(layer, shape):
    _raises(lambda: layer()(jnp.ones(shape)), str(shape))


@pytest.mark.parametrize(
    "layer,shape,expected",
    [
        (lambda: fnorms.BatchNorm2d(4), (2, 5, 5, 3), "4"),
        (lambda: fnorms.InstanceNorm2d(4), (2, 5, 5, 6), "4"),
        (lambda: fnorms.GroupNorm(2, 4), (2, 5, 5, 6), "4"),
        (lambda: fnorms.RMSNorm2d(4), (2, 5, 5, 8), "4"),
        (lambda: fnorms.LayerNorm((5, 4)), (2, 5, 3), "(5, 4)"),
        (lambda: fnorms.RMSNorm(4), (2, 5, 3), "(4,)"),
    ],
    ids=["bn", "in", "gn", "rms2d", "ln", "rms"],
)
def test_wrong_channel_count_raises(layer, shape, expected):
    msg = _raises(lambda: layer()(jnp.ones(shape)), str(shape))
    assert expected in msg.replace(str(shape), ""), msg


@pytest.mark.parametrize("groups,channels", [(3, 8), (16, 8), (0, 8)])
def test_groupnorm_groups_must_divide_channels(groups, channels):
    _raises(lambda: fnorms.GroupNorm(groups, channels), f"num_groups={groups}", str(channels))
    if groups > 0:  # torch agrees that this is an error
        with pytest.raises(ValueError):
            nn.GroupNorm(groups, channels)


def test_make_norm_gn_groups_must_divide_channels():
    _raises(lambda: fnorms.make_norm("gn", 12, groups=8), "groups=8", "12")
    with pytest.raises(ValueError, match="groups=8"):
        torch_ref.make_norm("gn", 12, 8)


@pytest.mark.parametrize("name", ["batchnrom", "weight", ""])
def test_make_norm_unknown_name_raises(name):
    allowed = ", ".join(fnorms.NORMS)
    _raises(lambda: fnorms.make_norm(name, 8), repr(name), allowed)
    _raises(lambda: torch_ref.make_norm(name, 8), repr(name), allowed)


def test_batchnorm_one_value_per_channel_message_names_shape():
    f = fnorms.BatchNorm2d(3)
    f.train()
    _raises(lambda: f(jnp.ones((1, 1, 1, 3))), "(1, 1, 1, 3)", "1 value per channel")


def test_groupnorm_error_lists_valid_group_counts():
    msg = _raises(lambda: fnorms.GroupNorm(5, 12), "num_groups=5", "num_channels=12")
    assert str([g for g in range(1, 13) if 12 % g == 0]) in msg


# ------------------------------------------------------------------------------------------
# float64: every layer is float64 throughout, parameters, statistics and arithmetic

# Measured worst over these cases: 3e-14 (train mode: the input's mean 3 and spread 0.01
# cancel 300:1 in the centring); one float32 rounding of that input alone is ~3e-5.
F64_RTOL = 1e-12

FLOAT64_LAYERS = {
    "bn": (lambda: nn.BatchNorm2d(6), lambda d: fnorms.BatchNorm2d(6, dtype=d, param_dtype=d)),
    "gn": (lambda: nn.GroupNorm(3, 6), lambda d: fnorms.GroupNorm(3, 6, dtype=d, param_dtype=d)),
    "in": (lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
           lambda d: fnorms.InstanceNorm2d(6, affine=True, track_running_stats=True, dtype=d,
                                           param_dtype=d)),
    "ln": (lambda: nn.LayerNorm([9, 11, 6]),
           lambda d: fnorms.LayerNorm((9, 11, 6), dtype=d, param_dtype=d)),
    "rms": (lambda: torch_ref.RMSNorm2d(6), lambda d: fnorms.RMSNorm2d(6, dtype=d, param_dtype=d)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(FLOAT64_LAYERS))
def test_float64_throughout(kind, train):
    """Inside ``jax.enable_x64(True)`` a float64 layer computes, and keeps its statistics, in
    float64, and agrees with PyTorch's float64 layer to float64 rounding (a float32 cast
    anywhere would cost ~1e-8)."""
    import jax

    make_torch, make_flax = FLOAT64_LAYERS[kind]
    torch_layer = make_torch().double()
    randomize_(torch_layer)
    target = torch_layer.norm if kind == "rms" else torch_layer
    randomize_(target)
    x = sample((2, 9, 11, 6), 7, loc=3.0, scale=0.01).astype(np.float64)  # eps-sensitive
    with jax.enable_x64(True):
        layer = make_flax(jnp.float64)
        inner = layer.norm if kind == "rms" else layer
        for fname, tname in [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                             ("var", "running_var")]:
            if getattr(inner, fname, None) is not None:
                getattr(inner, fname)[...] = jnp.asarray(getattr(target, tname).detach().numpy())
        set_mode(layer, torch_layer, train)
        y = np.asarray(layer(jnp.asarray(x)))
        stats = [v for v in (getattr(inner, "mean", None), getattr(inner, "var", None))
                 if v is not None]
        assert all(s[...].dtype == jnp.float64 for s in stats)
    if kind == "ln":  # layout-agnostic: the same NHWC array, normalized over (H, W, C)
        y_torch = torch_layer(torch.from_numpy(x)).detach().numpy()
    else:
        y_torch = np.moveaxis(torch_layer(to_nchw(x)).detach().numpy(), 1, -1)
    assert y.dtype == np.float64 and y_torch.dtype == np.float64
    print(f"\n{kind}: output {rel_err(y, y_torch):.1e}")
    assert rel_err(y, y_torch) <= F64_RTOL
    if stats and getattr(torch_layer, "running_mean", None) is not None:
        assert rel_err(inner.mean[...], torch_layer.running_mean.numpy()) <= F64_RTOL
        assert rel_err(inner.var[...], torch_layer.running_var.numpy()) <= F64_RTOL
