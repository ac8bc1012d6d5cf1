"""Parity of flax_resnet.init with torch.nn.init.

The frameworks' RNGs never produce the same samples, so random initialisers are compared in
distribution: moments against the theoretical values, bounds, and a two-sample KS test against a
torch sample drawn on the equivalent torch-layout tensor. Deterministic initialisers (constant,
eye, dirac) and structural properties (orthogonality, sparsity pattern, fans, gains) are compared
exactly.

The two checks complement each other. The KS test catches a wrong shape at equal variance, e.g.
JAX's he_normal (a variance-corrected truncated normal) against torch's kaiming_normal_ gives
p ~ 4e-12 on the conv kernel below; the moment checks catch scale errors of ~1 % that a KS test
at this sample size would miss.

Tolerances for moments. With n iid draws of a variable with std s and kurtosis k:
  se(mean) = s / sqrt(n),  se(sample std) ~= s * sqrt((k - 1) / (4 n)).
Every distribution here has k <= 3 (normal: 3, truncated normal: < 3, uniform: 1.8), so
s / sqrt(2 n) bounds se(std). We allow 5 standard errors: a correct sampler fails with
probability ~6e-7 per check, and the seeds are fixed anyway, so the suite is deterministic.
With the (3, 3, 64, 128) kernel (n = 73728) that is a 1.3 % relative tolerance on the std,
while swapping fan_in and fan_out on that kernel changes the std by a factor sqrt(2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from flax_resnet import init as finit

N_SIGMA = 5.0
KS_P_MIN = 1e-3

# Every (sampler, shape, dtype) costs one XLA compile (~0.3-0.5 s on a small CPU box), so the
# tests reuse a handful of shapes.
CONV = (3, 3, 64, 128)  # Flax HWIO; torch OIHW (128, 64, 3, 3): fan_in 576, fan_out 1152
DENSE = (256, 128)  # Flax (in, out); torch (128, 256)
BIAS = (8192,)
# Orthogonal compiles one QR per (max, min) shape of the torch-layout flattening, and QR is the
# slowest step on CPU: these shapes share two QR sizes, (256, 128) and (64, 32).
ORTHO_CONV = (2, 2, 64, 128)  # torch (128, 256): same QR as DENSE
ORTHO_SMALL = [(32, 64), (64, 32), (2, 2, 8, 64)]  # torch (64, 32), (32, 64), (64, 8, 2, 2)
SPARSE = (40, 100)  # Flax (in, out)


def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(0)


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax (*spatial, in, out) -> torch (out, in, *spatial)."""
    *spatial, n_in, n_out = shape
    return (n_out, n_in, *spatial)


def to_torch_layout(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(x), (-1, -2), (0, 1))


def to_flax_layout(t: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(t), (0, 1), (-1, -2))


def torch_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    return torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(torch_shape(shape)))


def assert_moments(x, mean: float, std: float) -> None:
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    mean_tol = N_SIGMA * std / math.sqrt(n)
    std_tol = N_SIGMA * std / math.sqrt(2 * n)
    assert abs(x.mean() - mean) < mean_tol, (x.mean(), mean, mean_tol)
    assert abs(x.std() - std) < std_tol, (x.std(), std, std_tol)


def assert_same_distribution(x, t: torch.Tensor) -> None:
    p = scipy.stats.ks_2samp(np.asarray(x, np.float64).ravel(), t.detach().double().numpy().ravel())
    assert p.pvalue > KS_P_MIN, p


# --------------------------------------------------------------------------------------------
# calculate_gain / compute_fans
# --------------------------------------------------------------------------------------------

ALL_NONLINEARITIES = [
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
]


@pytest.mark.parametrize("name", ALL_NONLINEARITIES)
def test_calculate_gain_matches_torch(name):
    assert finit.calculate_gain(name) == torch.nn.init.calculate_gain(name)


@pytest.mark.parametrize("param", [None, 0, 0.0, 0.2, 1, 1.0, 3])
def test_calculate_gain_leaky_relu_param(param):
    ours = finit.calculate_gain("leaky_relu", param)
    assert ours == torch.nn.init.calculate_gain("leaky_relu", param)
    slope = 0.01 if param is None else param
    assert ours == pytest.approx(math.sqrt(2.0 / (1 + slope**2)))


@pytest.mark.parametrize("param", [True, False, "0.2", np.float32(0.2)])
def test_calculate_gain_bad_leaky_relu_param(param):
    with pytest.raises(ValueError):
        torch.nn.init.calculate_gain("leaky_relu", param)
    with pytest.raises(ValueError, match="negative_slope"):
        finit.calculate_gain("leaky_relu", param)


def test_calculate_gain_unknown_name():
    with pytest.raises(ValueError, match="gelu") as err:
        finit.calculate_gain("gelu")
    for name in ALL_NONLINEARITIES:
        assert name in str(err.value)


FAN_SHAPES = [
    (3, 3, 64, 128),
    (1, 1, 64, 256),
    (7, 7, 3, 64),
    (5, 16, 32),  # conv1d
    (3, 3, 3, 8, 16),  # conv3d
    (512, 1000),  # dense
    (10, 1),
]


@pytest.mark.parametrize("shape", FAN_SHAPES)
def test_compute_fans_matches_torch(shape):
    assert finit.compute_fans(shape) == torch_fans(shape)
    # The same tensor described in torch layout through the axis arguments.
    tshape = torch_shape(shape)
    assert finit.compute_fans(tshape, in_axis=1, out_axis=0) == torch_fans(shape)


def test_compute_fans_errors():
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        finit.compute_fans((5,))
    with pytest.raises(ValueError):
        torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(5))
    with pytest.raises(ValueError):
        finit.compute_fans((3, 3), in_axis=0, out_axis=-2)
    with pytest.raises(ValueError):
        finit.compute_fans((3, 3), in_axis=2)


# --------------------------------------------------------------------------------------------
# random initialisers: moments, bounds and KS against torch
# --------------------------------------------------------------------------------------------


def _kaiming_case(kind: str, mode: str, nonlinearity: str, a: float):
    fan_in, fan_out = torch_fans(CONV)
    gain = torch.nn.init.calculate_gain(nonlinearity, a)
    std = gain / math.sqrt(fan_in if mode == "fan_in" else fan_out)
    if kind == "uniform":
        ours = finit.kaiming_uniform(a=a, mode=mode, nonlinearity=nonlinearity)
        theirs = lambda t: torch.nn.init.kaiming_uniform_(  # noqa: E731
            t, a=a, mode=mode, nonlinearity=nonlinearity
        )
        bound = math.sqrt(3.0) * std
    else:
        ours = finit.kaiming_normal(a=a, mode=mode, nonlinearity=nonlinearity)
        theirs = lambda t: torch.nn.init.kaiming_normal_(  # noqa: E731
            t, a=a, mode=mode, nonlinearity=nonlinearity
        )
        bound = None
    return pytest.param(
        ours, theirs, CONV, 0.0, std, bound, id=f"kaiming_{kind}-{mode}-{nonlinearity}-a{a}"
    )


def _random_cases():
    fan_in, fan_out = torch_fans(CONV)
    xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
    relu = math.sqrt(2.0)
    tn = scipy.stats.truncnorm((-1.0 - 0.5) / 2.0, (3.0 - 0.5) / 2.0, loc=0.5, scale=2.0)
    tn_std = scipy.stats.truncnorm(-2.0, 2.0).std()
    cases = [
        pytest.param(
            finit.uniform(-0.3, 0.7),
            lambda t: torch.nn.init.uniform_(t, -0.3, 0.7),
            CONV,
            0.2,
            1.0 / math.sqrt(12.0),
            (-0.3, 0.7),
            id="uniform",
        ),
        pytest.param(
            finit.normal(0.5, 2.0),
            lambda t: torch.nn.init.normal_(t, 0.5, 2.0),
            CONV,
            0.5,
            2.0,
            None,
            id="normal",
        ),
        pytest.param(
            finit.trunc_normal(),
            torch.nn.init.trunc_normal_,
            CONV,
            0.0,
            tn_std,
            (-2.0, 2.0),
            id="trunc_normal-default",
        ),
        pytest.param(
            finit.trunc_normal(mean=0.5, std=2.0, a=-1.0, b=3.0),
            lambda t: torch.nn.init.trunc_normal_(t, mean=0.5, std=2.0, a=-1.0, b=3.0),
            CONV,
            tn.mean(),
            tn.std(),
            (-1.0, 3.0),
            id="trunc_normal-asymmetric",
        ),
        pytest.param(
            finit.xavier_uniform(),
            torch.nn.init.xavier_uniform_,
            CONV,
            0.0,
            xavier_std,
            math.sqrt(3.0) * xavier_std,
            id="xavier_uniform",
        ),
        pytest.param(
            finit.xavier_uniform(gain=relu),
            lambda t: torch.nn.init.xavier_uniform_(t, gain=relu),
            CONV,
            0.0,
            relu * xavier_std,
            math.sqrt(3.0) * relu * xavier_std,
            id="xavier_uniform-relu_gain",
        ),
        pytest.param(
            finit.xavier_normal(),
            torch.nn.init.xavier_normal_,
            CONV,
            0.0,
            xavier_std,
            None,
            id="xavier_normal",
        ),
        pytest.param(
            finit.torch_default_kernel(),
            lambda t: torch.nn.Conv2d(64, 128, 3).weight,
            CONV,
            0.0,
            1.0 / math.sqrt(fan_in) / math.sqrt(3.0),
            1.0 / math.sqrt(fan_in),
            id="torch_default_kernel-conv",
        ),
        pytest.param(
            finit.torch_default_kernel(),
            lambda t: torch.nn.Linear(256, 128).weight,
            DENSE,
            0.0,
            1.0 / math.sqrt(256) / math.sqrt(3.0),
            1.0 / math.sqrt(256),
            id="torch_default_kernel-dense",
        ),
        pytest.param(
            # Bias of a layer with fan_in 576 (the CONV kernel); torch's own Linear bias.
            finit.torch_default_bias(576),
            lambda t: torch.nn.Linear(576, 8192).bias,
            BIAS,
            0.0,
            1.0 / math.sqrt(576) / math.sqrt(3.0),
            1.0 / math.sqrt(576),
            id="torch_default_bias",
        ),
    ]
    for kind in ("uniform", "normal"):
        for mode in ("fan_in", "fan_out"):
            cases.append(_kaiming_case(kind, mode, "relu", 0.0))
            cases.append(_kaiming_case(kind, mode, "leaky_relu", 0.2))
            cases.append(_kaiming_case(kind, mode, "leaky_relu", 0.0))  # torch's default args
    return cases


@pytest.mark.parametrize("ours, theirs, shape, mean, std, bound", _random_cases())
def test_random_init_matches_torch(ours, theirs, shape, mean, std, bound):
    x = np.asarray(ours(key(), shape, jnp.float32))
    assert x.shape == shape
    assert x.dtype == np.float32
    t = theirs(torch.empty(torch_shape(shape) if len(shape) > 1 else shape))
    assert tuple(t.shape) == (torch_shape(shape) if len(shape) > 1 else shape)

    assert_moments(x, mean, std)
    assert_moments(t.detach().numpy(), mean, std)  # the theory itself is torch's
    if bound is not None:
        lo, hi = bound if isinstance(bound, tuple) else (-bound, bound)
        # The sampler sees the bounds rounded to float32.
        assert x.min() >= np.float32(lo) and x.max() <= np.float32(hi)
        # The bound is tight, not just respected: samples reach within 1 % of the span.
        assert x.min() < lo + 0.01 * (hi - lo) and x.max() > hi - 0.01 * (hi - lo)
    assert_same_distribution(x, t)


@pytest.mark.parametrize("factory", [finit.kaiming_uniform, finit.kaiming_normal])
def test_kaiming_fan_out_differs_from_fan_in(factory):
    fan_in, fan_out = finit.compute_fans(CONV)
    assert fan_out == 2 * fan_in  # non-square: a swapped fan changes the std by sqrt(2)
    gain = math.sqrt(2.0)
    for mode, right, wrong in (("fan_in", fan_in, fan_out), ("fan_out", fan_out, fan_in)):
        x = np.asarray(factory(mode=mode, nonlinearity="relu")(key(), CONV))
        assert_moments(x, 0.0, gain / math.sqrt(right))
        wrong_std = gain / math.sqrt(wrong)
        assert abs(x.std() - wrong_std) > 20 * N_SIGMA * wrong_std / math.sqrt(2 * x.size)


def test_kaiming_axes_follow_layout():
    # Read CONV as an HWOI kernel (in = 128, out = 64): fan_out is now 9 * 64, not 9 * 128.
    init = finit.kaiming_normal(mode="fan_out", nonlinearity="relu", in_axis=-1, out_axis=-2)
    assert finit.compute_fans(CONV, in_axis=-1, out_axis=-2) == (9 * 128, 9 * 64)
    assert_moments(init(key(), CONV), 0.0, math.sqrt(2.0) / math.sqrt(9 * 64))


def test_initializers_work_under_jit_and_in_nnx():
    init = finit.kaiming_normal(mode="fan_out", nonlinearity="relu")
    # Traceable (nnx.jit / eval_shape model construction); eval_shape avoids a compile.
    out = jax.eval_shape(lambda k: init(k, CONV, jnp.bfloat16), key())
    assert (out.shape, out.dtype) == (CONV, jnp.bfloat16)
    conv = nnx.Conv(64, 128, (3, 3), kernel_init=init, rngs=nnx.Rngs(0))
    assert conv.kernel[...].shape == CONV
    assert_moments(conv.kernel[...], 0.0, math.sqrt(2.0 / torch_fans(CONV)[1]))
    lin = nnx.Linear(
        *DENSE,
        kernel_init=finit.torch_default_kernel(),
        bias_init=finit.torch_default_bias(DENSE[0]),
        rngs=nnx.Rngs(0),
    )
    bias = np.asarray(lin.bias[...])
    assert bias.shape == (DENSE[1],)
    assert 0 < np.abs(bias).max() <= np.float32(1 / math.sqrt(DENSE[0]))


def test_torch_default_bias_zero_fan_in():
    assert np.all(np.asarray(finit.torch_default_bias(0)(key(), BIAS)) == 0)


# --------------------------------------------------------------------------------------------
# orthogonal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [*ORTHO_SMALL, ORTHO_CONV],
    ids=["dense-tall", "dense-wide", "conv-tall", "conv-wide"],
)
@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)])
def test_orthogonal(shape, gain):
    x = np.asarray(finit.orthogonal(gain=gain)(key(), shape), np.float64)
    assert x.shape == shape
    w = to_torch_layout(x).reshape(shape[-1], -1)  # torch's (out, numel // out) flattening
    rows, cols = w.shape
    gram = w @ w.T if rows <= cols else w.T @ w  # a tall matrix can only have orthonormal cols
    np.testing.assert_allclose(gram, gain**2 * np.eye(min(rows, cols)), atol=1e-5)
    # torch's result has the same structure
    t = torch.nn.init.orthogonal_(torch.empty(torch_shape(shape)), gain=gain)
    tw = t.double().numpy().reshape(rows, -1)
    tgram = tw @ tw.T if rows <= cols else tw.T @ tw
    np.testing.assert_allclose(tgram, gain**2 * np.eye(min(rows, cols)), atol=1e-5)


def test_orthogonal_distribution_matches_torch():
    x = finit.orthogonal(gain=math.sqrt(2.0))(key(), ORTHO_CONV)
    t = torch.nn.init.orthogonal_(torch.empty(torch_shape(ORTHO_CONV)), gain=math.sqrt(2.0))
    assert_same_distribution(x, t)


def test_orthogonal_axes_follow_layout():
    shape = torch_shape((2, 2, 8, 64))  # OIHW (64, 8, 2, 2), described via in_axis/out_axis
    w = np.asarray(finit.orthogonal(in_axis=1, out_axis=0)(key(), shape), np.float64)
    w = w.reshape(shape[0], -1)  # tall (64, 32): orthonormal columns
    np.testing.assert_allclose(w.T @ w, np.eye(w.shape[1]), atol=1e-5)


# --------------------------------------------------------------------------------------------
# eye, dirac, sparse
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_eye_matches_torch(shape):
    x = np.asarray(finit.eye()(key(), shape))
    t = torch.nn.init.eye_(torch.empty(torch_shape(shape))).numpy()
    np.testing.assert_array_equal(x, t.T)
    np.testing.assert_array_equal(x, np.eye(*shape))


@pytest.mark.parametrize(
    "shape, groups",
    [
        ((3, 4, 8), 1),
        ((3, 4, 8), 2),
        ((3, 3, 4, 8), 1),
        ((3, 3, 4, 8), 2),
        ((3, 3, 8, 4), 1),
        ((3, 3, 6, 6), 3),
        ((2, 4, 4, 4), 1),  # even spatial size: torch puts the 1 at index size // 2
        ((3, 3, 3, 4, 4), 2),
    ],
)
def test_dirac_matches_torch(shape, groups):
    x = np.asarray(finit.dirac(groups=groups)(key(), shape))
    t = torch.nn.init.dirac_(torch.empty(torch_shape(shape)), groups=groups).numpy()
    np.testing.assert_array_equal(x, to_flax_layout(t))
    assert x.sum() == groups * min(shape[-1] // groups, shape[-2])


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.07])  # 0.07 * 100 == 7.000000000000001 -> 8
def test_sparse_matches_torch(sparsity):
    n_in, n_out = SPARSE
    std = 0.05
    x = np.asarray(finit.sparse(sparsity, std=std)(key(), (n_in, n_out)))
    t = torch.nn.init.sparse_(torch.empty(n_out, n_in), sparsity, std=std).numpy()
    expected = math.ceil(sparsity * n_out)
    # torch zeroes per column of (out, in); our rows are input indices, zeros along the out axis.
    np.testing.assert_array_equal((t == 0).sum(axis=0), expected)
    np.testing.assert_array_equal((x == 0).sum(axis=1), expected)
    assert_moments(x[x != 0], 0.0, std)


# --------------------------------------------------------------------------------------------
# constants and dtypes
# --------------------------------------------------------------------------------------------


def test_constants_exact():
    np.testing.assert_array_equal(finit.constant(0.25)(key(), (3, 4)), np.full((3, 4), 0.25))
    np.testing.assert_array_equal(finit.ones()(key(), (3, 4)), np.ones((3, 4)))
    np.testing.assert_array_equal(finit.zeros()(key(), (3, 4)), np.zeros((3, 4)))
    assert finit.zeros()(key(), (3,), jnp.bfloat16).dtype == jnp.bfloat16


BF16_CASES = {
    "constant": (finit.constant(0.5), CONV),
    "uniform": (finit.uniform(), CONV),
    "normal": (finit.normal(), CONV),
    "trunc_normal": (finit.trunc_normal(), CONV),
    "xavier_uniform": (finit.xavier_uniform(), CONV),
    "xavier_normal": (finit.xavier_normal(), CONV),
    "kaiming_uniform": (finit.kaiming_uniform(), CONV),
    "kaiming_normal": (finit.kaiming_normal(), CONV),
    "torch_default_kernel": (finit.torch_default_kernel(), CONV),
    "torch_default_bias": (finit.torch_default_bias(576), BIAS),
    "orthogonal": (finit.orthogonal(), ORTHO_CONV),
    "dirac": (finit.dirac(), CONV),
    "eye": (finit.eye(), (8, 16)),
    "sparse": (finit.sparse(0.5), SPARSE),
}


@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bfloat16_honoured(name):
    init, shape = BF16_CASES[name]
    x = init(key(), shape, jnp.bfloat16)
    assert x.dtype == jnp.bfloat16
    assert x.shape == shape
    assert np.isfinite(np.asarray(x, np.float32)).all()
    # Same numbers as the float32 draw, rounded: the dtype changes precision, not the sample.
    x32 = init(key(), shape, jnp.float32)
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(x32), rtol=2**-7, atol=1e-6)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [finit.kaiming_uniform, finit.kaiming_normal])
def test_kaiming_bad_arguments_fail_at_construction(factory):
    with pytest.raises(ValueError, match="fan_avg") as err:
        factory(mode="fan_avg")
    assert "fan_in" in str(err.value) and "fan_out" in str(err.value)
    with pytest.raises(ValueError, match="gelu"):
        factory(nonlinearity="gelu")
    with pytest.raises(ValueError, match="negative_slope"):
        factory(a=True)


@pytest.mark.parametrize(
    "init",
    [
        finit.kaiming_normal(),
        finit.kaiming_uniform(),
        finit.xavier_normal(),
        finit.xavier_uniform(),
        finit.torch_default_kernel(),
    ],
)
def test_one_dimensional_fans_raise(init):
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init(key(), (16,))


def test_structured_initialisers_reject_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        finit.dirac(groups=4)(key(), (3, 3, 4, 6))
    with pytest.raises(ValueError):
        torch.nn.init.dirac_(torch.empty(6, 4, 3, 3), groups=4)
    with pytest.raises(ValueError):
        finit.dirac(groups=0)
    with pytest.raises(ValueError):
        finit.dirac()(key(), (4, 8))
    with pytest.raises(ValueError):
        finit.dirac()(key(), (1, 1, 1, 1, 4, 8))
    with pytest.raises(ValueError):
        finit.eye()(key(), (3, 3, 4))
    with pytest.raises(ValueError):
        finit.sparse(0.1)(key(), (3, 3, 4))
    with pytest.raises(ValueError):
        finit.orthogonal()(key(), (8,))


# --------------------------------------------------------------------------------------------
# model-level schemes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", finit.INIT_SCHEMES)
def test_every_scheme_produces_right_shapes(name):
    scheme = finit.get_init_scheme(name)
    assert isinstance(scheme, finit.InitScheme)
    assert scheme.name == name
    conv = ORTHO_CONV if name == "orthogonal" else CONV  # shapes with a compiled sampler
    assert scheme.conv_kernel(key(), conv).shape == conv
    assert scheme.linear_kernel(key(), DENSE).shape == DENSE
    bias = scheme.linear_bias(DENSE[0])(key(), BIAS)
    assert bias.shape == BIAS
    assert bias.dtype == jnp.float32


def test_study_scheme_statistics():
    scheme = finit.get_init_scheme("study")
    fan_in, fan_out = torch_fans(CONV)
    assert_moments(scheme.conv_kernel(key(), CONV), 0.0, math.sqrt(2.0) / math.sqrt(fan_out))
    lin = np.asarray(scheme.linear_kernel(key(), DENSE))
    # xavier_uniform(gain=sqrt 2): bound sqrt(2) * sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(2.0) * math.sqrt(6.0 / sum(DENSE))
    assert 0.99 * bound < np.abs(lin).max() <= np.float32(bound)
    assert_moments(lin, 0.0, bound / math.sqrt(3.0))
    np.testing.assert_array_equal(scheme.linear_bias(DENSE[0])(key(), BIAS), 0.0)


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_torch_and_torchvision_scheme_statistics(name):
    scheme = finit.get_init_scheme(name)
    fan_in, fan_out = torch_fans(CONV)
    conv = np.asarray(scheme.conv_kernel(key(), CONV))
    if name == "torch":
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(conv).max() <= np.float32(bound)
        assert_moments(conv, 0.0, bound / math.sqrt(3.0))
    else:
        assert_moments(conv, 0.0, math.sqrt(2.0) / math.sqrt(fan_out))
    lin = np.asarray(scheme.linear_kernel(key(), DENSE))
    bound = 1.0 / math.sqrt(DENSE[0])
    assert np.abs(lin).max() <= np.float32(bound)
    assert_moments(lin, 0.0, bound / math.sqrt(3.0))
    bias = np.asarray(scheme.linear_bias(DENSE[0])(key(), BIAS))
    assert 0.9 * bound < np.abs(bias).max() <= np.float32(bound)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="nope") as err:
        finit.get_init_scheme("nope")
    for name in finit.INIT_SCHEMES:
        assert name in str(err.value)
