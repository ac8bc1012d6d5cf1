"""One place for the PyTorch ↔ Flax model parity logic (used by the tests and the report).

A parity run for one configuration:

1. ``torch_ref.create_resnet`` builds the reference; its norm layers get random affine
   parameters and (BatchNorm) random running statistics, so that eval mode really tests the
   stored statistics and the affine mapping is not an identity.
2. Its ``state_dict`` goes to a FILE (``.pt`` or ``.safetensors``); ``flax_resnet`` builds the
   twin and loads that file with ``convert.load_torch_checkpoint``.
3. The same NCHW input (NHWC for Flax) goes through both in eval mode, then one train-mode
   forward/backward of a mean cross-entropy loss; we compare eval logits, train logits, the
   BatchNorm running statistics after that step, and the gradient of every parameter
   (Flax gradients are exported through ``convert.to_numpy_state_dict``, i.e. the library's
   own naming and layout transposes, and compared by PyTorch key).

Every error is *relative per tensor*: ``max|flax - torch| / max|torch|``.

Tolerances (float32 throughout). XLA and PyTorch (oneDNN / native CPU kernels) sum a conv's
products in different orders, so each conv/matmul/reduction output differs by a few float32
ulps (~1e-7 relative); the differences then add up along the residual stream and get
amplified by every train-mode normalization (which divides by a batch/instance std), i.e.
they grow with depth, and the backward pass runs through the same depth again. Measured on
the configurations below (``scripts/parity_report.py``): logits <= ~4e-6, running stats
<= ~7e-7, gradients <= ~6e-5 (ResNet-101/152 with BatchNorm, where PyTorch's own float32
gradients differ from its float64 ones by up to ~5e-5: ``--floor``). Any semantic slip
(padding shifted by a pixel, momentum 0.9 vs 0.1, biased vs unbiased running variance, eps
1e-6 vs 1e-5, a transposed kernel) is a 1e-3 .. 1 effect.

Two things make float32 comparisons meaningless if ignored, so the configurations avoid them
(see ``randomize_norms_`` and ``INSTANCE_NORM_HW``): exponential amplification through deep
train-mode residual stacks whose blocks all add O(1) renormalized branches, and instance
statistics over 2x2 maps. ReLU inputs within rounding of zero are kept rare by small inputs:
such an input can land on either side of zero depending on summation order, and the gradient
then changes by O(1) at that element. Example (``parity_report.py --full-width``, ResNet-50
BatchNorm): one BN output is +3.5e-6 in float64, and the bias gradient of its channel is
2.79e-4 in PyTorch float32 with one thread, 1.39e-3 with two threads and in Flax: a 0.22
relative "error" with no bug anywhere. ``--floor`` shows PyTorch's own float32-vs-float64
error for a configuration; a failure far above it that is confined to a few channels of one
layer is such a flip, a semantic bug shows up across whole tensors and in the logits.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

import flax_resnet
import torch_ref
from flax_resnet import convert

IMAGENET_DEPTHS: tuple[int, ...] = (18, 34, 50, 101, 152)
CIFAR_DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)
DEPTHS: tuple[int, ...] = IMAGENET_DEPTHS + CIFAR_DEPTHS
NORMS: tuple[str, ...] = ("bn", "ln", "gn", "in", "rms")
STEMS: tuple[str, ...] = ("imagenet", "cifar")
HEAVY_DEPTHS: tuple[int, ...] = (101, 152)

# Logits (eval and train mode): max|Δ| <= 1e-4 * max|y_torch|. Float32 conv/matmul outputs
# differ by ~1e-7 relative between XLA and PyTorch (summation order); through up to 152
# layers and the train-mode normalizations this grows to <= ~4e-6 (measured); 1e-4 keeps
# >= 25x headroom.
LOGIT_RTOL = 1e-4
# BatchNorm running mean/var after one train step: max|Δ| <= 1e-5 * max|torch value|.
# running = 0.9 * stored + 0.1 * batch statistic: the stored part is copied bit-exactly, and
# the batch statistic is a mean over N*H*W values of activations that agree to ~1e-7..1e-6,
# scaled by 0.1 (measured worst: 7e-7). Tighter than the logits because the statistics sit
# before most of the depth amplification, and any slip in the update rule (momentum
# convention, the n/(n-1) unbiased-variance factor) is a >= 1e-4 effect even for the
# 108-value channels of the first stage.
STATS_RTOL = 1e-5
# Gradients of the loss w.r.t. every parameter: max|Δ| <= 1e-4 * max|g_torch| per tensor.
# Backprop runs the same depth again (transposed convs, norm backward), so it accumulates
# the same per-op differences once more; measured worst 6e-5 (ResNet-152 + BatchNorm, whose
# float32-vs-float64 floor in PyTorch alone is ~5e-5), typically 1e-6 .. 1e-5.
GRAD_RTOL = 1e-4

# Odd, non-square inputs catch padding/stride slips. The ImageNet stem (7x7/2 conv, 3x3/2
# max-pool) turns 33x47 into 9x12 maps; the CIFAR stem (3x3/1 conv) gets 9x12 directly, so
# both stems' stages see the same sizes (9x12 -> 5x6 -> 3x3 -> 2x2: odd and even sizes at
# every stride-2 step) and share compiled code (see blockwise_grads). Small maps also keep
# the number of ReLU inputs low: each one that lies within float32 rounding of 0 can take a
# different side in the two frameworks, which changes a gradient by O(1) at that element.
DEFAULT_HW: dict[str, tuple[int, int]] = {"imagenet": (33, 47), "cifar": (9, 12)}
# InstanceNorm ("in" = GroupNorm(C, C)) normalises each sample's channel over its H*W values
# alone. On the 2x2 / 3x3 maps of the last stages those few values are nearly equal after a
# bottleneck's 1x1 convs, and x - mean cancels catastrophically: PyTorch's own float32
# gradients then differ from its float64 ones by 9e-5 .. 2e-2 (ResNet-50/101/152), so 1e-4
# is unreachable for any float32 implementation. With 3x larger maps (last stage 4x5) the
# same float32-vs-float64 gap is <= 4e-5, and the comparison is meaningful again.
INSTANCE_NORM_HW: dict[str, tuple[int, int]] = {"imagenet": (97, 129), "cifar": (25, 33)}


def default_hw(stem: str, norm: str) -> tuple[int, int]:
    return (INSTANCE_NORM_HW if norm == "in" else DEFAULT_HW)[stem]


def default_width(depth: int) -> float:
    """Reduced widths for CPU: stages of 8/16/32/64 channels (x4 in bottlenecks) for 18-152,
    8/16/32 for the CIFAR nets. 101/152 are not made narrower: their cost on CPU is the number
    of ops (which width does not change), and channel-wise norms over fewer channels are worse
    conditioned in float32."""
    return 0.5 if depth in CIFAR_DEPTHS else 1 / 8


@dataclasses.dataclass(frozen=True)
class Config:
    depth: int
    norm: str
    stem: str | None = None  # None: the depth's default
    width: float | None = None  # None: default_width(depth)
    shortcut: str | None = None  # None: the depth's default
    num_classes: int = 10
    norm_groups: int = 4  # divides every channel count of the reduced widths
    zero_init_residual: bool = False
    batch: int = 2
    hw: tuple[int, int] | None = None  # None: default_hw(stem, norm)
    seed: int = 0
    file_format: str = "pt"  # "pt" or "safetensors"

    @property
    def resolved_width(self) -> float:
        return default_width(self.depth) if self.width is None else self.width

    @property
    def resolved_stem(self) -> str:
        default = "cifar" if self.depth in CIFAR_DEPTHS else "imagenet"
        return self.stem or default

    @property
    def resolved_hw(self) -> tuple[int, int]:
        return default_hw(self.resolved_stem, self.norm) if self.hw is None else self.hw

    @property
    def block(self) -> str:
        return "bottleneck" if self.depth in (50, 101, 152) else "basic"

    @property
    def label(self) -> str:
        parts = [f"d{self.depth}", self.norm, self.resolved_stem, f"w{self.resolved_width:g}"]
        if self.shortcut:
            parts.append(f"sc{self.shortcut}")
        if self.num_classes != 10:
            parts.append(f"nc{self.num_classes}")
        if self.zero_init_residual:
            parts.append("zir")
        if self.batch != 2 or self.hw is not None:
            parts.append(f"{self.batch}x{self.resolved_hw[0]}x{self.resolved_hw[1]}")
        return "-".join(parts)

    def factory_kwargs(self) -> dict[str, Any]:
        return dict(
            norm=self.norm,
            stem=self.stem,
            num_classes=self.num_classes,
            width=self.resolved_width,
            shortcut=self.shortcut,
            norm_groups=self.norm_groups,
            zero_init_residual=self.zero_init_residual,
        )


def matrix_configs() -> list[Config]:
    """Every norm x depth x stem at reduced width, alternating the weight-file format."""
    configs = []
    for i, (stem, depth, norm) in enumerate(
        (s, d, n) for s in STEMS for d in DEPTHS for n in NORMS
    ):
        fmt = "safetensors" if i % 2 else "pt"
        configs.append(Config(depth=depth, norm=norm, stem=stem, file_format=fmt))
    return configs


# ------------------------------------------------------------------------------------------
# building


def _last_norms(model: nn.Module) -> set[int]:
    """ids of the norm closing each block's residual branch (zeroed by zero_init_residual)."""
    out = set()
    for block in model.modules():
        if isinstance(block, (torch_ref.BasicBlock, torch_ref.BottleNeck)):
            last = block.residual_function[-1]
            out.add(id(getattr(last, "norm", last)))  # RMSNorm2d wraps nn.RMSNorm
    return out


def randomize_norms_(model: nn.Module, seed: int) -> None:
    """Random affine params and running stats for every norm layer, in place.

    Scales are drawn in [0.5, 1.5] (no sign flips, no dead channels), except the norm that
    closes each residual branch: [0.1, 0.3], like a trained ResNet (or one started with
    zero_init_residual). With unit-ish scales there, every train-mode block adds an O(1)
    renormalized branch and float32 rounding is amplified exponentially with depth: PyTorch's
    *own* float32 train-mode logits then differ from its float64 ones by up to 2e-2 (ResNet-152,
    InstanceNorm, 2x2 final maps), so no float32 implementation could meet 1e-4. With the
    smaller closing scales the same float32-vs-float64 gap is <= 4e-5 for every
    configuration (``scripts/parity_report.py --floor`` prints it). Shifts and running means
    are drawn around 0, running variances in [0.5, 2]. A scale that is exactly zero
    (``zero_init_residual``) stays zero.
    """
    gen = torch.Generator().manual_seed(seed)
    last_norms = _last_norms(model)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.empty(t.shape).uniform_(lo, hi, generator=gen)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.RMSNorm)):
                weight = module.weight
                if weight is not None and bool(weight.any()):
                    lo, hi = (0.1, 0.3) if id(module) in last_norms else (0.5, 1.5)
                    weight.copy_(uniform(weight, lo, hi))
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.copy_(0.2 * torch.randn(bias.shape, generator=gen))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
                module.num_batches_tracked.fill_(int(torch.randint(1, 100, (), generator=gen)))


def build_torch(cfg: Config) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = torch_ref.create_resnet(cfg.depth, **cfg.factory_kwargs())
    randomize_norms_(model, cfg.seed + 1)
    return model


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` as ``.pt`` or ``.safetensors`` (by suffix)."""
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state_dict, os.fspath(path))
    else:
        torch.save(state_dict, path)


def build_flax(cfg: Config, weights_file: str | os.PathLike | None = None) -> nnx.Module:
    model = flax_resnet.create_resnet(cfg.depth, **cfg.factory_kwargs(), rngs=nnx.Rngs(cfg.seed))
    if weights_file is not None:
        convert.load_torch_checkpoint(model, weights_file)
    return model


def build_pair(cfg: Config, tmp_dir: str | os.PathLike) -> tuple[nn.Module, nnx.Module, str]:
    """The torch reference, its Flax twin loaded from a weight file, and that file's path."""
    torch_model = build_torch(cfg)
    path = os.path.join(os.fspath(tmp_dir), f"{cfg.label}.{cfg.file_format}")
    save_state_dict(torch_model, path)
    return torch_model, build_flax(cfg, path), path


def make_inputs(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """A fixed NCHW float32 batch and integer labels."""
    rng = np.random.default_rng(1000 + cfg.seed)
    x = rng.standard_normal((cfg.batch, 3, *cfg.resolved_hw)).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, size=cfg.batch)
    return x, labels


def nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))


# ------------------------------------------------------------------------------------------
# comparing


def rel_err(actual: Any, expected: Any) -> float:
    """max|actual - expected| / max|expected| (0/0 = 0; x/0 = inf)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {e.shape}")
    diff = float(np.max(np.abs(a - e), initial=0.0))
    scale = float(np.max(np.abs(e), initial=0.0))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


@dataclasses.dataclass
class ParityResult:
    label: str
    eval_logits: float
    train_logits: float
    stats: dict[str, float]  # running_mean / running_var keys
    grads: dict[str, float]  # every parameter key
    counters_ok: bool  # num_batches_tracked equal after the step
    seconds: float = 0.0

    @property
    def worst_stats(self) -> float:
        return max(self.stats.values(), default=0.0)

    @property
    def worst_grad(self) -> float:
        return max(self.grads.values(), default=0.0)

    def failures(self) -> list[str]:
        out = []
        if not self.eval_logits <= LOGIT_RTOL:
            out.append(f"eval logits rel err {self.eval_logits:.3g} > {LOGIT_RTOL:g}")
        if not self.train_logits <= LOGIT_RTOL:
            out.append(f"train logits rel err {self.train_logits:.3g} > {LOGIT_RTOL:g}")
        out += [
            f"running stat {k} rel err {v:.3g} > {STATS_RTOL:g}"
            for k, v in self.stats.items()
            if not v <= STATS_RTOL
        ]
        out += [
            f"grad {k} rel err {v:.3g} > {GRAD_RTOL:g}"
            for k, v in self.grads.items()
            if not v <= GRAD_RTOL
        ]
        if not self.counters_ok:
            out.append("num_batches_tracked differs after one train step")
        return out

    def assert_ok(self) -> None:
        failures = self.failures()
        assert not failures, f"{self.label}: {len(failures)} failures:\n  " + "\n  ".join(
            failures[:20]
        )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """True float32 matmuls/convs on accelerators too (no TF32); one torch CPU thread.

    The tensors here are tiny: one intra-op thread is faster than two, and immune to a busy
    machine's scheduling. Everything is restored on exit.
    """
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    threads = torch.get_num_threads()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(1)
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
        torch.set_num_threads(threads)


def torch_step(
    model: nn.Module, x: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Eval logits, then one train-mode forward/backward: (eval, train logits, state, grads)."""
    xt = torch.from_numpy(x)
    model.eval()
    with torch.no_grad():
        y_eval = model(xt).numpy()
    model.train()
    model.zero_grad(set_to_none=True)
    y_train = model(xt)
    F.cross_entropy(y_train, torch.from_numpy(labels)).backward()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
    return y_eval, y_train.detach().numpy(), state, grads


# ------------------------------------------------------------------------------------------
# Flax gradients, block by block
#
# Differentiating the whole model eagerly costs ~1-5 ms of Python per primitive (thousands
# per ResNet) and jitting it costs 15-130 s of XLA compile per configuration. Instead the
# forward pass runs eagerly through the model's own submodules (stem ``conv1``, every block,
# pooling + ``fc``), and the backward pass calls one jitted VJP per submodule. Submodules with
# the same structure and input shape share one compiled function: the 36 identical blocks of
# ResNet-152's third stage compile once, ResNet-50/101/152 (and 18/34, and the five CIFAR
# depths) share all of theirs, and so do the two stems' stages, because the CIFAR-stem input
# (9x12) has the size the ImageNet stem makes of 33x47. ``whole_model_grads`` is the plain
# ``nnx.value_and_grad`` of the model; a test checks that both give the same gradients.

# Cheaper XLA compiles for these small per-block programs (values are unaffected: XLA does not
# reassociate float arithmetic at any level).
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _apply_unit(graphdef: Any, params: Any, rest: Any, x: jax.Array, pool: bool) -> jax.Array:
    # Fresh Variables (tree.map) so the train-mode BatchStat update happens at this trace level.
    module = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
    if pool:  # ResNet.__call__: global average pool before the classifier
        x = jnp.mean(x, axis=(1, 2))
    return module(x)


@functools.partial(jax.jit, static_argnums=(0, 5), compiler_options=_COMPILER_OPTIONS)
def _unit_vjp(graphdef, params, rest, x, grad_out, pool):
    _, vjp = jax.vjp(lambda p, h: _apply_unit(graphdef, p, rest, h, pool), params, x)
    return vjp(grad_out)


def model_units(model: nnx.Module) -> list[tuple[nnx.Module, bool]]:
    """(submodule, pool first?) in the order ``ResNet.__call__`` applies them."""
    units = [(model.conv1, False)]
    units += [(block, False) for block in model.blocks()]
    units.append((model.fc, True))
    return units


def unit_forward(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """``model(x)`` as a chain of its submodules (eager): logits and every unit's input."""
    inputs = []
    h = x
    for unit, pool in model_units(model):
        inputs.append(h)
        h = unit(jnp.mean(h, axis=(1, 2)) if pool else h)
    return h, inputs


def blockwise_grads(
    model: nnx.Module, x: jax.Array, labels: jax.Array
) -> tuple[jax.Array, nnx.Module]:
    """One train-mode step: logits (updating the batch stats) and a twin holding the grads."""
    logits, inputs = unit_forward(model, x)
    grad = jax.grad(cross_entropy)(logits, labels)
    grad_model = nnx.clone(model)
    for (unit, pool), (grad_unit, _), h in zip(
        reversed(model_units(model)),
        reversed(model_units(grad_model)),
        reversed(inputs),
        strict=True,
    ):
        graphdef, params, rest = nnx.split(unit, nnx.Param, ...)
        param_grads, grad = _unit_vjp(graphdef, params, rest, h, grad, pool)
        nnx.update(grad_unit, param_grads)
    return logits, grad_model


def whole_model_grads(
    model: nnx.Module, x: jax.Array, labels: jax.Array
) -> tuple[jax.Array, nnx.Module]:
    """The same as ``blockwise_grads`` with ``nnx.value_and_grad`` of the whole model."""

    def loss_fn(m: nnx.Module) -> tuple[jax.Array, jax.Array]:
        y = m(x)
        return cross_entropy(y, labels), y

    (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    grad_model = nnx.clone(model)
    nnx.update(grad_model, grads)
    return logits, grad_model


def flax_step(
    model: nnx.Module, x: np.ndarray, labels: np.ndarray, grads_fn=blockwise_grads
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same as ``torch_step`` for the Flax model (updates its batch stats in place)."""
    xf, lab = nhwc(x), jnp.asarray(labels)
    model.eval()
    y_eval = np.asarray(model(xf))
    model.train()
    y_train, grad_model = grads_fn(model, xf, lab)
    state = convert.to_numpy_state_dict(model)
    # Export the gradients with the library's own PyTorch naming and layout transposes.
    grad_sd = convert.to_numpy_state_dict(grad_model)
    params = {key for key, _, var in convert.model_variables(model) if isinstance(var, nnx.Param)}
    return y_eval, np.asarray(y_train), state, {k: grad_sd[k] for k in params}


def compare(torch_model: nn.Module, flax_model: nnx.Module, cfg: Config) -> ParityResult:
    import time

    start = time.perf_counter()
    x, labels = make_inputs(cfg)
    with full_precision():
        t_eval, t_train, t_state, t_grads = torch_step(torch_model, x, labels)
        f_eval, f_train, f_state, f_grads = flax_step(flax_model, x, labels)
    if set(t_grads) != set(f_grads):
        raise AssertionError(
            f"parameter sets differ: only torch {sorted(set(t_grads) - set(f_grads))}, "
            f"only flax {sorted(set(f_grads) - set(t_grads))}"
        )
    if set(t_state) != set(f_state):
        raise AssertionError(
            f"state_dict keys differ: only torch {sorted(set(t_state) - set(f_state))}, "
            f"only flax {sorted(set(f_state) - set(t_state))}"
        )
    stats = {
        k: rel_err(f_state[k], t_state[k])
        for k in t_state
        if k.endswith(("running_mean", "running_var"))
    }
    counters_ok = all(
        int(f_state[k]) == int(t_state[k]) for k in t_state if k.endswith("num_batches_tracked")
    )
    return ParityResult(
        label=cfg.label,
        eval_logits=rel_err(f_eval, t_eval),
        train_logits=rel_err(f_train, t_train),
        stats=stats,
        grads={k: rel_err(f_grads[k], t_grads[k]) for k in t_grads},
        counters_ok=counters_ok,
        seconds=time.perf_counter() - start,
    )


def run_config(cfg: Config, tmp_dir: str | os.PathLike) -> ParityResult:
    torch_model, flax_model, _ = build_pair(cfg, tmp_dir)
    return compare(torch_model, flax_model, cfg)


def torch_float32_floor(cfg: Config) -> ParityResult:
    """PyTorch float32 against PyTorch float64 on the same weights and input.

    This is the conditioning floor of the configuration: no float32 implementation can be
    expected to agree with another more closely than it agrees with the exact result.
    """
    model32 = build_torch(cfg)
    model64 = copy.deepcopy(model32).double()
    x, labels = make_inputs(cfg)
    with full_precision():
        a = torch_step(model32, x, labels)
        b = torch_step(model64, x.astype(np.float64), labels)
    return ParityResult(
        label=cfg.label,
        eval_logits=rel_err(a[0], b[0]),
        train_logits=rel_err(a[1], b[1]),
        stats={
            k: rel_err(a[2][k], b[2][k])
            for k in b[2]
            if k.endswith(("running_mean", "running_var"))
        },
        grads={k: rel_err(a[3][k], b[3][k]) for k in b[3]},
        counters_ok=True,
    )
