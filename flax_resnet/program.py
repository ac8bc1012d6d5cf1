"""The program of a training run: everything it compiles, built once in one place.

``build_program(config, mesh, data)`` makes the model's graph definitions, the schedule
and the optimizer (once each), the initial ``TrainState`` created directly on the mesh
(inside a jitted initialiser with replicated outputs, never copied through the host), and
the jitted train and eval steps; ``Program.compile`` compiles the steps ahead of time for
the run's batch sizes. The trainer, the benchmarks, the scripts and the tests all build
their steps here, so they run the very program ``train.py`` runs::

    from flax_resnet.program import DataSpec, build_program
    program, state = build_program(cfg, mesh, DataSpec(steps_per_epoch=390,
                                   image_shape=(32, 32, 3), mean=..., std=...))
    metrics = program.zero_metrics()
    state, metrics = program.train_step(state, metrics, images, labels)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from flax_resnet import optim
from flax_resnet import training as T
from flax_resnet.config import TrainConfig
from flax_resnet.sharding import replicate, replicated


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the data tells the program: updates per epoch (for the schedule), the image
    shape, and the input mean / std the steps normalise with (in [0, 1] units)."""

    steps_per_epoch: int
    image_shape: tuple[int, int, int]
    mean: Sequence[float]
    std: Sequence[float]


@dataclasses.dataclass(frozen=True)
class Program:
    """A run's compiled pieces. ``train_step(state, metrics, images, labels) -> (state,
    metrics)`` donates its state and metrics; ``eval_step(params, batch_stats, metrics,
    images, labels, mask) -> metrics`` (``training.evaluate`` runs it over a split)."""

    config: TrainConfig
    mesh: Mesh
    data: DataSpec
    defs: T.ModelDefs
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    train_step: Callable[..., tuple[T.TrainState, dict]]
    eval_step: T.EvalStep

    def zero_metrics(self, partial: dict[str, Any] | None = None) -> dict[str, jax.Array]:
        """The train step's accumulators on the mesh, in the config's loss dtype: zero, or
        the host values ``partial`` (a checkpoint's partial epoch)."""
        return T.replicate_metrics(partial, self.mesh, T.loss_dtype(self.config))

    def compile(self, state: T.TrainState, batch_size: int, eval_batch_size: int
                ) -> Program:
        """This program with its steps compiled ahead of time for ``state``'s placement and
        these batch sizes: other inputs raise instead of compiling again."""
        train, evaluate = T.compile_steps(self.train_step, self.eval_step, state,
                                          self.data.image_shape, batch_size,
                                          eval_batch_size, self.mesh)
        return dataclasses.replace(self, train_step=train, eval_step=evaluate)


def _initial_state(cfg: TrainConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   initial: nnx.Module | None, abstract: bool
                   ) -> tuple[T.ModelDefs, T.TrainState]:
    repl = replicated(mesh)
    if initial is not None:
        defs = T.model_defs(initial)
        _, params, batch_stats = nnx.split(initial, nnx.Param, nnx.BatchStat)
        # Weights read from a file live on the host already: each process places its copy.
        params, batch_stats = replicate(jax.device_get((params, batch_stats)), mesh)
        state = jax.jit(lambda p, s: T.new_state(p, s, tx, cfg.seed),
                        out_shardings=repl)(params, batch_stats)
        return defs, state

    defs = T.model_defs(nnx.eval_shape(lambda: T.create_model(cfg)))

    def fresh() -> T.TrainState:
        _, params, batch_stats = nnx.split(T.create_model(cfg), nnx.Param, nnx.BatchStat)
        return T.new_state(params, batch_stats, tx, cfg.seed)

    init = jax.jit(fresh, out_shardings=repl)
    if abstract:
        return defs, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
            jax.eval_shape(init))
    return defs, init()


def build_program(
    config: TrainConfig,
    mesh: Mesh,
    data: DataSpec,
    *,
    initial: nnx.Module | None = None,
    parallel: str | None = None,
    abstract: bool = False,
) -> tuple[Program, T.TrainState]:
    """The program of ``config`` on ``mesh`` for ``data``, and its initial state (replicated
    on the mesh).

    The model is ``config.model`` (its ``num_classes`` / ``in_channels`` as the caller set
    them), initialised from ``config.seed``, or, given ``initial``, a model of that
    architecture whose parameters and batch statistics start the run (e.g. pretrained
    weights loaded into it; it is left untouched: the state holds copies). ``parallel``
    overrides ``config.parallel`` for the train step. ``abstract``: the state only as
    ``jax.ShapeDtypeStruct``s with their shardings, nothing computed (to compile for devices
    this process cannot run on).
    """
    schedule = optim.make_schedule(config, data.steps_per_epoch)
    tx = optim.make_optimizer(config, schedule)
    if abstract and initial is not None:
        raise ValueError("an abstract program starts from no weights: drop initial")
    defs, state = _initial_state(config, tx, mesh, initial, abstract)
    train_step = T.make_train_step(defs.train, tx, config, data.mean, data.std, mesh,
                                   parallel)
    eval_step = T.make_eval_step(defs.eval, config, data.mean, data.std, mesh)
    return Program(config, mesh, data, defs, schedule, tx, train_step, eval_step), state
