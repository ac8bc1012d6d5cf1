"""The train state, the jitted train / eval steps and the evaluation pass.

The steps follow the functional NNX pattern: the model is split once into a static
``graphdef`` and the ``params`` / ``batch_stats`` pytrees, and a pure ``jax.jit`` step
re-assembles it with ``nnx.merge`` inside. Augmentation and normalization run on the device
inside the step, on the uint8 batch. Optimizers and schedules are in
``flax_resnet.optim``, the mesh and batch placement in ``flax_resnet.sharding``; the
program of a run (these steps, the optimizer and the initial state, built together) in
``flax_resnet.program``, the loop in ``flax_resnet.trainer``.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flax_resnet import data as data_lib
from flax_resnet.config import PARALLEL_MODES, TrainConfig
from flax_resnet.models import from_config
from flax_resnet.sharding import (
    DATA_AXIS,
    batch_sharding,
    replicate,
    replicated,
)

# Compute dtypes by name (config.DTYPES). float32 and bfloat16 keep params, optimizer state
# and norm statistics in float32; float64 is float64 throughout (params, moments,
# statistics, loss, schedule) and needs 64-bit JAX (``with jax.enable_x64(True):``): the
# parity tests' semantic check runs there, free of float32 rounding.
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def x64_enabled() -> bool:
    """Whether JAX is 64-bit now (``jax.enable_x64(True)`` or ``JAX_ENABLE_X64``)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def device_augment(cfg: TrainConfig) -> bool:
    """Whether the train step augments on the device (pad-crop-flip). ``auto`` counts: the
    trainer resolves it from the data before building the program, and data a program is
    given without that (in-memory arrays of the training size) is what auto augments so."""
    return cfg.augment in ("pad-crop-flip", "auto")


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


def create_model(
    cfg: TrainConfig, num_classes: int | None = None, seed: int | None = None
) -> nnx.Module:
    """The ResNet ``cfg.model`` describes (``num_classes`` outputs if given), computing in
    ``cfg.dtype`` with ``param_dtype(cfg)`` params, initialised from ``seed`` (default
    ``cfg.seed``)."""
    model = cfg.model if num_classes is None else dataclasses.replace(
        cfg.model, num_classes=num_classes)
    return from_config(model, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                       rngs=nnx.Rngs(cfg.seed if seed is None else seed))


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


def model_defs(model: nnx.Module) -> ModelDefs:
    """The train- and eval-mode graph definitions of ``model`` (left in training mode); an
    abstract model (``nnx.eval_shape``) gives the same ones as a concrete one."""
    model.train()
    train, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    evaluation, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.train()
    return ModelDefs(train, evaluation)


def new_state(params: Any, batch_stats: Any, tx: optax.GradientTransformation,
              seed: int) -> TrainState:
    """The state before the first update: ``params`` and ``batch_stats`` as given, the
    optimizer's initial state, the run's base key."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


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
        if device_augment(cfg):
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
    """The train and eval steps compiled ahead of time.

    They accept exactly these shapes and shardings (``state`` as placed on the mesh; the
    train metrics as ``replicate_metrics(..., loss_dtype(cfg))``) and raise on any other
    input instead of silently compiling again, and the caller can time compilation apart
    from training. (Compiling
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


# --------------------------------------------------------------------------- evaluation


def evaluate(
    eval_step: EvalStep,
    state: TrainState,
    mesh: Mesh,
    batches: Iterable[tuple[jax.Array, jax.Array, jax.Array]],
) -> dict[str, float]:
    """Loss and accuracy (and ``acc_flip`` when the step flips) over ``batches`` (images,
    labels, mask: ``batches.eval_batches`` or the streamed pipeline's)."""
    metrics = eval_step.zero_metrics(mesh)
    for images, labels, mask in batches:
        metrics = eval_step(state.params, state.batch_stats, metrics, images, labels, mask)
    return summarize(metrics)
