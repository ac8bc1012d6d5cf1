"""Recipes, optimizers, schedules, loss, the train state and the jitted train / eval steps.

The steps follow the functional NNX pattern: the model is split once into a static
``graphdef`` and the ``params`` / ``batch_stats`` pytrees, and a pure ``jax.jit`` step
re-assembles it with ``nnx.merge`` inside. Augmentation and normalization run on the device
inside the step, on the uint8 batch.

Data parallelism (``parallel``):

* ``"jit"``: ``jax.jit`` over a 1-D ``'data'`` mesh of all devices of all hosts, batch
  sharded, params replicated. BatchNorm statistics are computed over the **global** batch
  (SyncBN), so the result does not depend on the number of devices.
* ``"pmap"``: like PyTorch DDP, through ``jax.shard_map``: each device computes BatchNorm
  statistics and gradients on its own shard, gradients are averaged with ``pmean``. The
  running statistics are **taken from device 0** (what DDP's default
  ``broadcast_buffers=True`` does: rank 0's buffers are broadcast at every forward).
  Augmentation runs on the global batch before the ``shard_map``, so it is the same in
  both modes.

Learning-rate schedules step at **epoch boundaries** for ``study``, ``step``/``multistep``
and ``constant`` (the value during epoch ``e`` is the value a PyTorch scheduler stepped once
per epoch gives in epoch ``e``); ``cosine`` (with linear warmup) and ``onecycle`` change
every step, like PyTorch's ``OneCycleLR`` or a per-batch stepped cosine (``onecycle`` is
``OneCycleLR``'s exact formula, update for update).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_resnet import data as data_lib
from flax_resnet.config import LEGACY_NAMES, OPTIMIZERS, SCHEDULE_ALIASES, canonical_schedule
from flax_resnet.init import INIT_SCHEMES
from flax_resnet.models import DEPTHS, SHORTCUTS, STEMS, create_resnet
from flax_resnet.norms import canonical_norm

# Compute dtypes. float32 and bfloat16 keep params, optimizer state and norm statistics in
# float32; float64 is float64 throughout (params, moments, statistics, loss, schedule) and
# needs 64-bit JAX (``with jax.enable_x64(True):``): the parity tests' semantic check runs
# there, free of float32 rounding. The train.py CLI offers only ``CLI_DTYPES``.
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
CLI_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# The schedules, and "step" (an alias of "multistep"); "seed", the study schedule's old name,
# is accepted in stored run configs (config.LEGACY_NAMES).
SCHEDULES: tuple[str, ...] = tuple(SCHEDULE_ALIASES)
PARALLEL_MODES: tuple[str, ...] = ("jit", "pmap")
DATA_AXIS = "data"


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained model (the run's identity).

    Defaults are the ``study`` recipe: the study's PyTorch run.
    """

    dataset: str = "cifar10"
    # model
    depth: int = 34
    norm: str = "bn"
    stem: str | None = None  # None: the architecture's default (imagenet for 18-152)
    width: float = 1.0
    shortcut: str | None = None  # None: the architecture's default
    init: str = "torch"
    norm_groups: int = 32
    zero_init_residual: bool = False
    dtype: str = "float32"  # compute dtype; params and optimizer state float32 (float64 for
    # "float64", which needs jax.enable_x64: see DTYPES)
    # optimization
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = False
    decay_norm_and_bias: bool = True  # False: no weight decay on 1-D params (optax mask)
    batch_size: int = 100
    epochs: int = 80
    schedule: str = "study"
    warmup_epochs: float = 0.0
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs` (multistep)
    lr_gamma: float = 0.1  # multistep factor
    label_smoothing: float = 0.0
    augment_pad: int = 4  # 0 disables pad+crop; flips stay on unless augment is False
    augment: bool = True
    seed: int = 0
    parallel: str = "jit"
    # Test-time augmentation: also score the mean of the logits of each test image and its
    # mirror image (reported beside, not instead of, the plain accuracy).
    eval_flip: bool = False

    def validate(self) -> TrainConfig:
        """Canonicalise names; raise ``ValueError`` naming a bad value and the allowed ones."""

        def choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
            if value not in allowed:
                raise ValueError(
                    f"--{name.replace('_', '-')} {value!r} is not allowed; choose from "
                    f"{', '.join(map(str, allowed))}"
                )

        def positive(name: str, value: float, strict: bool = True) -> None:
            if not (value > 0 if strict else value >= 0) or not math.isfinite(value):
                raise ValueError(
                    f"--{name.replace('_', '-')} {value!r} is not allowed; it must be "
                    f"{'> 0' if strict else '>= 0'}"
                )

        choice("depth", self.depth, DEPTHS)
        try:
            norm = canonical_norm(self.norm)
        except ValueError as e:
            raise ValueError(f"--norm {self.norm!r} is not allowed: {e}") from None
        if self.stem is not None:
            choice("stem", self.stem, STEMS)
        shortcut = None if self.shortcut is None else str(self.shortcut).upper()
        if shortcut is not None:
            choice("shortcut", shortcut, SHORTCUTS)
        init = LEGACY_NAMES.get(self.init, self.init)
        choice("init", init, INIT_SCHEMES)
        choice("dtype", self.dtype, tuple(DTYPES))
        try:
            schedule = canonical_schedule(self.schedule)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("parallel", self.parallel, PARALLEL_MODES)
        positive("width", self.width)
        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, strict=False)
        positive("warmup_epochs", self.warmup_epochs, strict=False)
        positive("norm_groups", self.norm_groups)
        positive("batch_size", self.batch_size)
        positive("epochs", self.epochs)
        positive("augment_pad", self.augment_pad, strict=False)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"--momentum {self.momentum!r} is not allowed; it must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"--label-smoothing {self.label_smoothing!r} is not allowed; it must be in [0, 1)"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("--nesterov needs --optimizer sgd and --momentum > 0")
        if any(not 0 < m <= 1 for m in self.lr_milestones):
            raise ValueError(
                f"--lr-milestones {','.join(map(str, self.lr_milestones))} is not allowed; "
                "they are fractions of the epochs, each in (0, 1]"
            )
        positive("lr_gamma", self.lr_gamma)
        if self.schedule in ("cosine", "onecycle") and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"--warmup-epochs {self.warmup_epochs} must be below --epochs {self.epochs}"
            )
        return dataclasses.replace(
            self,
            norm=norm,
            shortcut=shortcut,
            lr_milestones=tuple(float(m) for m in self.lr_milestones),
            schedule=schedule,
            init=init,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        d = dict(d)
        if "lr_milestones" in d:
            d["lr_milestones"] = tuple(d["lr_milestones"])
        return cls(**d)


RECIPES: dict[str, dict[str, Any]] = {
    # The study's PyTorch run: ResNet-34, imagenet stem, BatchNorm, AdamW(1e-3) with
    # torch's default weight decay 1e-2 on every parameter, batch 100, 80 epochs, lr / 3
    # every 20 epochs.
    "study": {},
    # He et al. 2015, CIFAR-10 section: ResNet-32 (3x3 stem, option-A shortcuts), SGD 0.1,
    # momentum 0.9, weight decay 1e-4 (coupled, as torch SGD), batch 128, lr / 10 at 50% and
    # 75% of training (32k and 48k of 64k iterations ~ 164 epochs of 50k images).
    "he": {
        "depth": 32,
        "init": "kaiming_normal",
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "epochs": 164,
        "schedule": "multistep",
        "lr_milestones": (0.5, 0.75),
        "lr_gamma": 0.1,
    },
    # A modern fast recipe (on the lossy JPEG copy of CIFAR-10 both this and the same recipe
    # in PyTorch end at about 90% after 30 epochs; see the README): ResNet-18 with a 3x3
    # stem, SGD Nesterov 0.4 (= 0.1 per 128 images, scaled linearly to 512), 2 warmup epochs
    # then cosine to 0 (per step), label smoothing 0.1, weight decay 5e-4 on conv/dense
    # kernels only, zero-initialised last norm of each block; the test accuracy is also
    # reported with flip test-time augmentation.
    "fast": {
        "depth": 18,
        "stem": "cifar",
        "width": 1.0,
        "init": "torchvision",
        "zero_init_residual": True,
        "optimizer": "sgd",
        "lr": 0.4,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "decay_norm_and_bias": False,
        "batch_size": 512,
        "epochs": 30,
        "schedule": "cosine",
        "warmup_epochs": 2.0,
        "label_smoothing": 0.1,
        "eval_flip": True,
    },
}


def make_config(recipe: str = "study", **overrides: Any) -> TrainConfig:
    """The recipe's config with ``overrides`` (``None`` values are ignored), validated.

    When ``epochs`` is overridden but not ``warmup_epochs``, the preset's warmup is scaled
    by the same factor (``fast``: 2 of 30 epochs stays 1/15 of the run).
    """
    recipe = LEGACY_NAMES.get(recipe, recipe)
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r} is not allowed; choose from {', '.join(RECIPES)}")
    preset = dict(RECIPES[recipe])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # A preset's warmup is a share of its epochs: keep the share when only --epochs changes.
    if "warmup_epochs" in preset and "epochs" in overrides and "warmup_epochs" not in overrides:
        preset["warmup_epochs"] = preset["warmup_epochs"] * overrides["epochs"] / preset["epochs"]
    return TrainConfig(**{**preset, **overrides}).validate()


def x64_enabled() -> bool:
    """Whether JAX is 64-bit now (``jax.enable_x64(True)`` or ``JAX_ENABLE_X64``)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def compute_dtype(cfg: TrainConfig) -> Any:
    """``cfg.dtype`` as a JAX dtype; ``ValueError`` for float64 while JAX is 32-bit, where it
    would silently compute in float32."""
    dtype = DTYPES[cfg.dtype]
    if dtype == jnp.float64 and not x64_enabled():
        raise ValueError(
            "dtype float64 needs 64-bit JAX, which is off: build the model and the steps and "
            "run them inside `with jax.enable_x64(True):` (or set JAX_ENABLE_X64=1); without "
            "it JAX would compute in float32"
        )
    return dtype


def param_dtype(cfg: TrainConfig) -> Any:
    """Parameters (and so optimizer moments) are float32, or float64 for a float64 config."""
    return jnp.float64 if compute_dtype(cfg) == jnp.float64 else jnp.float32


def loss_dtype(cfg: TrainConfig) -> Any:
    """The dtype of the loss and of its metric accumulator: float32, float64 for float64."""
    return param_dtype(cfg)


def _default_float() -> Any:
    """float32, or float64 while JAX is 64-bit (read at trace time)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def create_model(cfg: TrainConfig, num_classes: int, seed: int | None = None) -> nnx.Module:
    """The ResNet a config describes (compute dtype ``cfg.dtype``, ``param_dtype(cfg)``
    params)."""
    return create_resnet(
        cfg.depth,
        norm=cfg.norm,
        stem=cfg.stem,
        num_classes=num_classes,
        width=cfg.width,
        shortcut=cfg.shortcut,
        init=cfg.init,
        norm_groups=cfg.norm_groups,
        zero_init_residual=cfg.zero_init_residual,
        dtype=compute_dtype(cfg),
        param_dtype=param_dtype(cfg),
        rngs=nnx.Rngs(cfg.seed if seed is None else seed),
    )


# --------------------------------------------------------------------------- optimization


def _constant(cfg: TrainConfig, spe: int) -> optax.Schedule:
    return optax.constant_schedule(float(cfg.lr))


def _study(cfg: TrainConfig, spe: int) -> optax.Schedule:
    lr = float(cfg.lr)
    return lambda count: lr * jnp.power(
        1.0 / 3.0, (jnp.asarray(count) // spe // 20).astype(_default_float())
    )


def _multistep(cfg: TrainConfig, spe: int) -> optax.Schedule:
    lr, gamma = float(cfg.lr), float(cfg.lr_gamma)
    milestones = jnp.asarray(sorted(round(m * cfg.epochs) for m in cfg.lr_milestones), jnp.int32)

    def multistep(count: jax.Array) -> jax.Array:
        passed = jnp.sum(jnp.asarray(count) // spe >= milestones)
        return lr * jnp.power(gamma, passed.astype(_default_float()))

    return multistep


def _cosine(cfg: TrainConfig, spe: int) -> optax.Schedule:
    lr, total = float(cfg.lr), max(1, spe * cfg.epochs)
    warmup = int(round(cfg.warmup_epochs * spe))
    decay = max(1, total - warmup)

    def cosine(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, _default_float())
        warm = lr * (count + 1.0) / max(warmup, 1)
        t = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        return jnp.where(count < warmup, warm, 0.5 * lr * (1.0 + jnp.cos(jnp.pi * t)))

    return cosine


def _onecycle(cfg: TrainConfig, spe: int) -> optax.Schedule:
    # torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="cos", three_phase=False): rises
    # from lr/25 to lr until update pct·total - 1, then falls to lr/25/1e4 at update
    # total - 1. (optax.cosine_onecycle_schedule peaks and ends one update later.)
    lr, total = float(cfg.lr), max(1, spe * cfg.epochs)
    warmup = int(round(cfg.warmup_epochs * spe))
    pct = warmup / total if warmup > 0 else 0.3
    initial, final = lr / 25.0, lr / 25.0 / 1e4
    rise_end = float(pct * total) - 1.0
    fall_end = float(total - 1)

    def anneal(start: float, end: float, frac: jax.Array) -> jax.Array:
        return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * frac) + 1.0)

    def onecycle(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, _default_float())
        rise = anneal(initial, lr, t / max(rise_end, 1e-9))
        frac = jnp.clip((t - rise_end) / max(fall_end - rise_end, 1e-9), 0.0, 1.0)
        return jnp.where(t <= rise_end, rise, anneal(lr, final, frac))

    return onecycle


# canonical schedule name -> (config, steps per epoch) -> lr of the update count
SCHEDULE_BUILDERS: dict[str, Callable[[TrainConfig, int], optax.Schedule]] = {
    "study": _study,
    "multistep": _multistep,
    "cosine": _cosine,
    "onecycle": _onecycle,
    "constant": _constant,
}


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the update count (0 for the first update).

    ``study``: ``lr / 3**(epoch // 20)``. ``multistep``: ``lr * gamma**k`` after the k-th
    milestone epoch ``round(fraction * epochs)``. ``constant``: ``lr``. These three change
    only at epoch boundaries. ``cosine``: linear warmup over ``warmup_epochs`` (the first
    update uses ``lr / warmup_steps``), then cosine to 0 at the last step. ``onecycle``:
    PyTorch ``OneCycleLR`` (cosine, no momentum cycling) with its defaults: from ``lr/25``
    up to ``lr`` over ``warmup_epochs`` (30% of training when 0), down to ``lr/25/1e4``.
    Computed in float32, or float64 while JAX is 64-bit.
    """
    spe = int(steps_per_epoch)
    if spe < 1:
        raise ValueError("steps_per_epoch must be >= 1")
    return SCHEDULE_BUILDERS[canonical_schedule(cfg.schedule)](cfg, spe)


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: conv and dense kernels (ndim > 1)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    cfg: TrainConfig, steps_per_epoch: int, params: Any = None
) -> optax.GradientTransformation:
    """The optimizer with PyTorch's semantics.

    ``adamw``: ``optax.adamw(b1=.9, b2=.999, eps=1e-8)`` = ``torch.optim.AdamW`` (decoupled
    decay scaled by the lr). ``sgd``: ``add_decayed_weights`` *before* ``sgd(momentum,
    nesterov)`` = ``torch.optim.SGD(weight_decay=...)`` (decay added to the gradient before
    the momentum buffer). ``adam``: likewise for ``torch.optim.Adam(weight_decay=...)``.
    With ``decay_norm_and_bias=False`` 1-D params (norm scales, biases) get no decay.
    ``params`` is accepted for signature stability; the mask is computed from the params
    the optimizer is initialised with.
    """
    del params
    build = OPTIMIZER_BUILDERS.get(cfg.optimizer)
    if build is None:
        raise ValueError(
            f"unknown optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZER_BUILDERS)}"
        )
    mask = None if cfg.decay_norm_and_bias else decay_mask
    return build(cfg, make_schedule(cfg, steps_per_epoch), float(cfg.weight_decay), mask)


def _coupled_decay(wd: float, mask: Any) -> optax.GradientTransformation:
    """torch's ``weight_decay`` for SGD/Adam: ``wd·p`` added to the gradient first."""
    return optax.add_decayed_weights(wd, mask) if wd > 0 else optax.identity()


# optimizer name -> (config, schedule, weight decay, decay mask) -> optax transformation
OPTIMIZER_BUILDERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": lambda cfg, lr, wd, mask: optax.adamw(
        lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, mask=mask
    ),
    "sgd": lambda cfg, lr, wd, mask: optax.chain(
        _coupled_decay(wd, mask),
        optax.sgd(lr, momentum=float(cfg.momentum) if cfg.momentum > 0 else None,
                  nesterov=cfg.nesterov),
    ),
    "adam": lambda cfg, lr, wd, mask: optax.chain(
        _coupled_decay(wd, mask), optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    ),
}
assert tuple(OPTIMIZER_BUILDERS) == OPTIMIZERS


def cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example ``torch.nn.CrossEntropyLoss(label_smoothing=ε, reduction='none')``.

    Target ``(1 - ε)·onehot + ε/K``; computed in float32 (float64 for float64 logits).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


# --------------------------------------------------------------------------- state


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (checkpointed as is).

    ``rng`` is the run's base key; step ``s`` uses ``fold_in(rng, s)``, so a resumed run
    draws the same augmentation as an uninterrupted one.
    """

    step: jax.Array  # int32 scalar: updates done
    params: Any  # nnx.State of nnx.Param
    batch_stats: Any  # nnx.State of nnx.BatchStat (empty without BatchNorm)
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw PRNG key


@dataclasses.dataclass(frozen=True)
class ModelDefs:
    """The static halves of the model: train-mode and eval-mode graph definitions."""

    train: Any
    eval: Any


def init_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int
) -> tuple[ModelDefs, TrainState]:
    """Split ``model`` into graph defs and a fresh ``TrainState`` (host-local arrays).

    The state holds copies: the train step donates its input state, and donating arrays the
    model still shares would delete the model's weights after the first step.
    """
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = jax.device_put((params, batch_stats), may_alias=False)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.train()
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )
    return ModelDefs(graphdef, eval_graphdef), state


def param_count(params: Any) -> int:
    return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


def zero_metrics(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """On-device accumulators: summed loss (in ``dtype``: ``loss_dtype(cfg)``), correct
    predictions, examples."""
    return {
        "loss_sum": jnp.zeros((), dtype),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
    }


def replicate_metrics(
    values: dict[str, Any] | None, mesh: Mesh, dtype: Any = jnp.float32
) -> dict[str, jax.Array]:
    """Accumulators on the mesh, from host values (a checkpoint's partial epoch) or zeros;
    ``dtype`` as ``zero_metrics``."""
    zeros = jax.device_get(zero_metrics(dtype))
    values = values or zeros
    return replicate({k: np.asarray(values[k], dtype=zeros[k].dtype) for k in zeros}, mesh)


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    """Host-side mean loss and accuracy of accumulated metrics (one device sync)."""
    m = jax.device_get(metrics)
    count = max(int(m["count"]), 1)
    out = {
        "loss": float(m["loss_sum"]) / count,
        "acc": float(m["correct"]) / count,
        "count": int(m["count"]),
    }
    if "correct_flip" in m:
        out["acc_flip"] = float(m["correct_flip"]) / count
    return out


# --------------------------------------------------------------------------- sharding


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``'data'`` mesh over ``devices`` (default: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "--batch-size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what} {batch_size} does not divide over the {n} devices of the mesh; use a "
            f"multiple of {n} (e.g. {max(n, batch_size // n * n)} or {(batch_size // n + 1) * n})"
        )


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch whose shards live on this process's devices.

    Each process feeds only these rows (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    indices = sharding.addressable_devices_indices_map((global_batch,))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                    for s in indices.values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise RuntimeError(
            f"this process's devices hold non-contiguous rows {spans} of the batch; "
            "feeding needs contiguous rows per process"
        )
    return slice(start, stop)


def put_batch(mesh: Mesh, global_batch: int, *local: np.ndarray) -> tuple[jax.Array, ...]:
    """Host arrays holding this process's rows (``process_rows``) -> global sharded arrays."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return tuple(jax.device_put(a, sharding) for a in local)
    return tuple(
        jax.make_array_from_process_local_data(sharding, a, (global_batch, *a.shape[1:]))
        for a in local
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree (same values on every host) replicated on the mesh."""
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


# --------------------------------------------------------------------------- steps


def _loss_and_updates(
    graphdef: Any, params: Any, batch_stats: Any, x: jax.Array, labels: jax.Array,
    label_smoothing: float,
) -> tuple[Any, Any, jax.Array, jax.Array]:
    """Gradients, new batch stats, mean loss and number of correct predictions."""

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(x)
        loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
        return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)
    return grads, new_stats, loss, correct


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: Mesh,
    parallel: str | None = None,
) -> Callable[[TrainState, dict, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """``step(state, metrics, images_uint8, labels) -> (state, metrics)``, jitted.

    ``images`` / ``labels`` are the global batch sharded over ``'data'``; ``state`` and
    ``metrics`` are replicated and donated. ``parallel`` (default ``cfg.parallel``) is
    ``jit`` (global BatchNorm statistics) or ``pmap`` (per-device, DDP-like; see module doc).
    The loss accumulates in ``metrics["loss_sum"]``'s dtype (``zero_metrics(loss_dtype(cfg))``).
    """
    parallel = parallel or cfg.parallel
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {parallel!r}; allowed: {PARALLEL_MODES}")
    dtype = compute_dtype(cfg)
    smoothing = float(cfg.label_smoothing)

    def grads_global(params, batch_stats, x, labels):
        return _loss_and_updates(graphdef, params, batch_stats, x, labels, smoothing)

    def grads_per_device(params, batch_stats, x, labels):
        # Mark the replicated params varying so each device's gradient stays local, then
        # average explicitly (without this, shard_map's autodiff would psum the gradients).
        local_params = jax.lax.pcast(params, DATA_AXIS, to="varying")
        grads, stats, loss, correct = _loss_and_updates(
            graphdef, local_params, batch_stats, x, labels, smoothing
        )
        grads = jax.lax.pmean(grads, DATA_AXIS)
        first = jax.lax.axis_index(DATA_AXIS) == 0
        stats = jax.tree.map(
            lambda v: jax.lax.psum(jnp.where(first, v, jnp.zeros_like(v)), DATA_AXIS), stats
        )
        return grads, stats, jax.lax.pmean(loss, DATA_AXIS), jax.lax.psum(correct, DATA_AXIS)

    if parallel == "pmap":
        compute = jax.shard_map(
            grads_per_device,
            mesh=mesh,
            in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS)),
            out_specs=(P(), P(), P(), P()),
        )
    else:
        compute = grads_global

    def step(state: TrainState, metrics: dict, images: jax.Array, labels: jax.Array):
        compute_dtype(cfg)  # at trace time too: a float64 step traced while JAX is 32-bit
        key = jax.random.fold_in(state.rng, state.step)
        x = images
        if cfg.augment:
            x = data_lib.augment(key, x, cfg.augment_pad)
        x = data_lib.normalize(x, mean, std, dtype)
        grads, batch_stats, loss, correct = compute(state.params, state.batch_stats, x, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        n = labels.shape[0]
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        new_metrics = {
            "loss_sum": metrics["loss_sum"] + (loss * n).astype(metrics["loss_sum"].dtype),
            "correct": metrics["correct"] + correct,
            "count": metrics["count"] + n,
        }
        return new_state, new_metrics

    repl, batch = replicated(mesh), batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(repl, repl, batch, batch),
        out_shardings=(repl, repl),
        donate_argnums=(0, 1),
    )


def eval_zero_metrics(flip: bool = False, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Eval accumulators; ``flip`` adds ``correct_flip`` (flip test-time augmentation)."""
    metrics = zero_metrics(dtype)
    if flip:
        metrics["correct_flip"] = jnp.zeros((), jnp.int32)
    return metrics


@dataclasses.dataclass(frozen=True)
class EvalStep:
    """A jitted (or compiled) eval step and whether it scores flip test-time augmentation,
    which decides its metrics' keys (``eval_zero_metrics(flip)``); ``loss_dtype`` is its loss
    accumulator's."""

    fn: Callable[..., dict]
    flip: bool
    loss_dtype: Any = jnp.float32

    def __call__(self, *args: Any) -> dict:
        return self.fn(*args)

    def zero_metrics(self, mesh: Mesh) -> dict[str, jax.Array]:
        """This step's accumulators, zero, replicated on ``mesh``."""
        return replicate(jax.device_get(eval_zero_metrics(self.flip, self.loss_dtype)), mesh)


def make_eval_step(
    eval_graphdef: Any,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: Mesh,
) -> EvalStep:
    """``eval(params, batch_stats, metrics, images_uint8, labels, mask) -> metrics``, jitted.

    ``mask`` (float32, 0 for padding) lets the last partial batch be padded so eval
    compiles once. The loss is the plain cross entropy (no label smoothing). With
    ``cfg.eval_flip`` the metrics (``eval_zero_metrics(True)``) also count ``correct_flip``:
    predictions from the mean of the float32 logits of the image and its horizontal mirror.
    """
    dtype = compute_dtype(cfg)
    flip = bool(cfg.eval_flip)

    def step(params, batch_stats, metrics, images, labels, mask):
        compute_dtype(cfg)  # at trace time too (see make_train_step)
        model = nnx.merge(eval_graphdef, params, batch_stats)
        x = data_lib.normalize(images, mean, std, dtype)
        if flip:  # one forward pass over the batch and its mirror (NHWC: axis 2 is the width)
            logits, mirrored = jnp.split(model(jnp.concatenate([x, jnp.flip(x, axis=2)])), 2)
        else:
            logits = model(x)
        loss = cross_entropy(logits, labels)
        valid = mask > 0
        correct = (jnp.argmax(logits, -1) == labels) & valid
        out = {
            "loss_sum": metrics["loss_sum"] + jnp.sum(loss * mask).astype(
                metrics["loss_sum"].dtype
            ),
            "correct": metrics["correct"] + jnp.sum(correct).astype(jnp.int32),
            "count": metrics["count"] + jnp.sum(valid).astype(jnp.int32),
        }
        if flip:
            wide = jnp.promote_types(logits.dtype, jnp.float32)
            both = logits.astype(wide) + mirrored.astype(wide)
            hit = (jnp.argmax(both, -1) == labels) & valid
            out["correct_flip"] = metrics["correct_flip"] + jnp.sum(hit).astype(jnp.int32)
        return out

    repl, batch = replicated(mesh), batch_sharding(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(repl, repl, repl, batch, batch, batch),
        out_shardings=repl,
        donate_argnums=(2,),
    )
    return EvalStep(jitted, flip, loss_dtype(cfg))


def _like(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


def compile_steps(
    train_step: Callable,
    eval_step: EvalStep,
    state: TrainState,
    image_shape: tuple[int, int, int],
    batch_size: int,
    eval_batch_size: int,
    mesh: Mesh,
) -> tuple[Callable, EvalStep]:
    """The train and eval steps compiled ahead of time, for ``train_epoch`` / ``evaluate``.

    They accept exactly these shapes and shardings (``state`` as placed on the mesh) and
    raise on any other input instead of silently
    compiling again, and the caller can time compilation apart from training. (Compiling
    the two concurrently in threads gave no measurable gain on 2 CPU cores.)
    """
    rows = batch_sharding(mesh)

    def batch(n: int) -> tuple[jax.ShapeDtypeStruct, ...]:
        return (jax.ShapeDtypeStruct((n, *image_shape), jnp.uint8, sharding=rows),
                jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows))

    state_like = _like(state)
    train = train_step.lower(
        # the loss accumulator's dtype is the config's, as the eval step's
        state_like, _like(replicate_metrics(None, mesh, eval_step.loss_dtype)),
        *batch(batch_size)).compile()
    evaluate = eval_step.fn.lower(
        state_like.params, state_like.batch_stats,
        _like(eval_step.zero_metrics(mesh)),
        *batch(eval_batch_size),
        jax.ShapeDtypeStruct((eval_batch_size,), jnp.float32, sharding=rows),
    ).compile()
    return train, EvalStep(evaluate, eval_step.flip, eval_step.loss_dtype)


# --------------------------------------------------------------------------- loops


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped)."""
    return num_examples // batch_size


def epoch_batches(
    split: data_lib.Split,
    seed: int,
    epoch: int,
    batch_size: int,
    mesh: Mesh,
    start: int = 0,
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """The epoch's batches from batch ``start`` on, as global sharded arrays."""
    order = data_lib.epoch_permutation(seed, epoch, len(split))
    rows = process_rows(mesh, batch_size)
    for i in range(start, steps_per_epoch(len(split), batch_size)):
        idx = order[i * batch_size : (i + 1) * batch_size][rows]
        yield put_batch(mesh, batch_size, split.images[idx], split.labels[idx])


def train_epoch(
    train_step: Callable,
    state: TrainState,
    metrics: dict,
    split: data_lib.Split,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    mesh: Mesh,
    start: int = 0,
    callback: Callable[[int, TrainState, dict], bool | None] | None = None,
) -> tuple[TrainState, dict, bool]:
    """Run the epoch from batch ``start``. ``callback(i_done, state, metrics)`` runs after
    every step (it must not sync unless it wants to); returning True stops the epoch early.
    Returns ``(state, metrics, stopped)``.
    """
    for i, (images, labels) in enumerate(
        epoch_batches(split, seed, epoch, batch_size, mesh, start), start=start
    ):
        state, metrics = train_step(state, metrics, images, labels)
        if callback is not None and callback(i + 1, state, metrics):
            return state, metrics, True
    return state, metrics, False


def evaluate(
    eval_step: EvalStep,
    state: TrainState,
    split: data_lib.Split,
    batch_size: int,
    mesh: Mesh,
) -> dict[str, float]:
    """Loss and accuracy (and ``acc_flip`` when the step flips) over the whole split; the
    last batch is padded and masked."""
    n = len(split)
    rows = process_rows(mesh, batch_size)
    metrics = eval_step.zero_metrics(mesh)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)[rows]
        valid = idx < n
        idx = np.where(valid, idx, 0)
        images, labels, mask = put_batch(
            mesh, batch_size, split.images[idx], split.labels[idx], valid.astype(np.float32)
        )
        metrics = eval_step(state.params, state.batch_stats, metrics, images, labels, mask)
    return summarize(metrics)
