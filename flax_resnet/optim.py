"""Optimizers and learning-rate schedules with PyTorch's semantics, from a ``TrainConfig``.

Schedules step at **epoch boundaries** for ``study``, ``multistep``, ``constant``, ``steplr``
and ``cosine-epoch`` (``PER_EPOCH_SCHEDULES``: the value during epoch ``e`` is the value a
PyTorch scheduler stepped once per epoch gives in epoch ``e``, as torchvision's
classification reference steps its schedulers); ``cosine`` (with linear warmup) and
``onecycle`` change every step, like PyTorch's ``OneCycleLR`` or a per-batch stepped cosine
(``onecycle`` is ``OneCycleLR``'s exact formula, update for update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flax_resnet.config import OPTIMIZERS, SCHEDULES, TrainConfig, canonical_schedule


def _default_float() -> Any:
    """float32, or float64 while JAX is 64-bit (read at trace time)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


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


def _steplr(cfg: TrainConfig, spe: int) -> optax.Schedule:
    # torch.optim.lr_scheduler.StepLR(step_size=lr_step_epochs, gamma=lr_gamma), per epoch.
    lr, gamma, size = float(cfg.lr), float(cfg.lr_gamma), int(cfg.lr_step_epochs)
    return lambda count: lr * jnp.power(
        gamma, (jnp.asarray(count) // spe // size).astype(_default_float())
    )


def _cosine_epoch(cfg: TrainConfig, spe: int) -> optax.Schedule:
    # torchvision's cosineannealinglr with linear warmup, stepped once per epoch:
    # SequentialLR([LinearLR(start_factor, total_iters=W), CosineAnnealingLR(T_max=E - W)],
    # milestones=[W]); epoch e < W runs at lr·(start + (1 - start)·e / W), epoch e ≥ W at
    # lr·(1 + cos(π (e - W) / (E - W))) / 2 (held at 0 past the end, where torch's would rise).
    lr, start = float(cfg.lr), float(cfg.warmup_start_factor)
    warmup, epochs = int(cfg.warmup_epochs), int(cfg.epochs)
    decay = max(1, epochs - warmup)

    def cosine_epoch(count: jax.Array) -> jax.Array:
        epoch = (jnp.asarray(count) // spe).astype(_default_float())
        warm = lr * (start + (1.0 - start) * epoch / max(warmup, 1))
        t = jnp.clip((epoch - warmup) / decay, 0.0, 1.0)
        return jnp.where(epoch < warmup, warm, 0.5 * lr * (1.0 + jnp.cos(jnp.pi * t)))

    return cosine_epoch


# canonical schedule name -> (config, steps per epoch) -> lr of the update count
SCHEDULE_BUILDERS: dict[str, Callable[[TrainConfig, int], optax.Schedule]] = {
    "study": _study,
    "multistep": _multistep,
    "cosine": _cosine,
    "onecycle": _onecycle,
    "constant": _constant,
    "steplr": _steplr,
    "cosine-epoch": _cosine_epoch,
}


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the update count (0 for the first update).

    ``study``: ``lr / 3**(epoch // 20)``. ``multistep``: ``lr * gamma**k`` after the k-th
    milestone epoch ``round(fraction * epochs)``. ``constant``: ``lr``. These three change
    only at epoch boundaries. ``cosine``: linear warmup over ``warmup_epochs`` (the first
    update uses ``lr / warmup_steps``), then cosine to 0 at the last step. ``onecycle``:
    PyTorch ``OneCycleLR`` (cosine, no momentum cycling) with its defaults: from ``lr/25``
    up to ``lr`` over ``warmup_epochs`` (30% of training when 0), down to ``lr/25/1e4``.
    ``steplr``: ``lr * lr_gamma**(epoch // lr_step_epochs)`` (torch ``StepLR``).
    ``cosine-epoch``: torchvision's per-epoch ``LinearLR`` warmup over ``warmup_epochs``
    whole epochs from ``lr * warmup_start_factor``, then ``CosineAnnealingLR`` from ``lr``
    to 0 over the remaining epochs (the last epoch's lr is still above 0). These two change
    only at epoch boundaries too. Computed in float32, or float64 while JAX is 64-bit.
    """
    spe = int(steps_per_epoch)
    if spe < 1:
        raise ValueError("steps_per_epoch must be >= 1")
    return SCHEDULE_BUILDERS[canonical_schedule(cfg.schedule)](cfg, spe)


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: conv and dense kernels (ndim > 1)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer with PyTorch's semantics, stepping at ``schedule``'s learning rate
    (``make_schedule``).

    ``adamw``: ``optax.adamw(b1=.9, b2=.999, eps=1e-8)`` = ``torch.optim.AdamW`` (decoupled
    decay scaled by the lr). ``sgd``: ``add_decayed_weights`` *before* ``sgd(momentum,
    nesterov)`` = ``torch.optim.SGD(weight_decay=...)`` (decay added to the gradient before
    the momentum buffer). ``adam``: likewise for ``torch.optim.Adam(weight_decay=...)``.
    With ``decay_norm_and_bias=False`` 1-D params (norm scales, biases) get no decay; the
    mask is computed from the params the optimizer is initialised with.
    """
    build = OPTIMIZER_BUILDERS.get(cfg.optimizer)
    if build is None:
        raise ValueError(
            f"unknown optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZER_BUILDERS)}"
        )
    mask = None if cfg.decay_norm_and_bias else decay_mask
    return build(cfg, schedule, float(cfg.weight_decay), mask)


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
assert tuple(SCHEDULE_BUILDERS) == SCHEDULES
