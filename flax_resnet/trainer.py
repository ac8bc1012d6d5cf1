"""The training loop: ``train_and_evaluate(config, workdir, options)``.

It owns the run directory and its policy: resuming (the stored ``config.json`` wins; only
``RESUMABLE_FIELDS`` may change), the Orbax checkpoints (``checkpoints/<step>/``: every
``checkpoint_every_epochs`` epochs and ``checkpoint_every_steps`` steps, the last
``keep_checkpoints`` kept), ``metrics.jsonl`` (one row per epoch), ``curves.png``,
``summary.json`` and ``eval.json``, and what keeps the work: one run per workdir (a lock),
checkpoints that are verified and fall back to the newest good one, no non-finite state
ever saved (a diverged run stops, ``DivergedError``), and SIGTERM / SIGINT ending the run
with a checkpoint (``Interrupted``). ``train.py`` only parses flags into a ``TrainConfig``
and ``RunOptions`` and calls it; Python users call it directly::

    from flax_resnet import trainer
    from flax_resnet.config import make_config
    cfg = make_config("fast", dataset="synthetic", epochs=2)
    summary = trainer.train_and_evaluate(cfg, "runs/smoke")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flax_resnet.config import (
    ARCHITECTURE_FIELDS,
    DATA_MODEL_FIELDS,
    ConfigError,
    TrainConfig,
    option,
)
from flax_resnet.safety import dumps, write_text_atomic

# Fields a resumed run may change (anything else that differs from the stored config.json
# is a conflict): extending training, switching the data-parallel mode or flip TTA.
RESUMABLE_FIELDS = frozenset({"epochs", "parallel", "eval_flip"})


class RunError(ValueError):
    """A run that cannot go ahead as asked: a missing data set, a workdir that holds another
    run, a checkpoint that does not fit. ``field`` names the setting at fault, if one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DivergedError(RunError):
    """The loss or the parameters went non-finite; nothing after the last finite checkpoint
    was saved."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint; rerunning resumes it."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         "rerun the same command to resume")
        self.signum, self.step = signum, step


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is carried out; unlike the ``TrainConfig`` it does not change the result."""

    data_dir: str | None = option(None, "where tensorflow-datasets prepares and reads CIFAR",
                                  group="data")
    eval_batch_size: int | None = option(None, "test batch size (padded and masked); default "
                                         "the batch size")
    eval_only: bool = option(False, "evaluate the latest checkpoint of the workdir and stop")
    log_every: int = option(50, "steps between progress updates (the only host syncs in an "
                            "epoch)")
    checkpoint_every_steps: int = option(0, "also checkpoint every N steps (0: only at epoch "
                                         "ends)")
    checkpoint_every_epochs: int = option(1, "checkpoint after every N-th epoch (0: only "
                                          "after the last); a rerun resumes from the last")
    keep_checkpoints: int = option(3, "checkpoints kept")
    stop_after_steps: int = option(0, "(testing) stop after this many global steps without "
                                   "saving, as if preempted; 0: never")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        for name, least in (("log_every", 1), ("keep_checkpoints", 1),
                            ("checkpoint_every_steps", 0), ("checkpoint_every_epochs", 0),
                            ("stop_after_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(name, f"{name} {value!r} must be an integer >= {least}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size",
                              f"eval_batch_size {self.eval_batch_size!r} must be >= 1")


def resolve_config(
    requested: TrainConfig, stored: dict[str, Any] | None, asked: set[str] | None,
    workdir: Path,
) -> tuple[TrainConfig, list[str]]:
    """The run's config: ``requested``, or the one stored in ``workdir`` when resuming.

    When ``workdir/config.json`` exists, the ``asked`` fields of ``requested`` (by their
    ``TrainConfig.flat()`` names; all of them if ``None``) must agree with it, except
    ``RESUMABLE_FIELDS``, which the resumed run takes from ``requested``, and the model
    fields the data set decides (``DATA_MODEL_FIELDS``).
    """
    if stored is None:
        return requested, []
    try:
        previous = TrainConfig.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise RunError(f"{workdir}/config.json is not a valid run config: {e}") from None
    before, now = previous.flat(), requested.flat()
    asked = (set(now) if asked is None else set(asked)) - DATA_MODEL_FIELDS
    conflicts = [
        f"{f}={before[f]!r} (this command: {now[f]!r})"
        for f in sorted(asked - RESUMABLE_FIELDS)
        if before[f] != now[f]
    ]
    if conflicts:
        raise RunError(
            f"workdir {workdir} holds a run with a different config: "
            + "; ".join(conflicts)
            + ". Use another workdir, or match (or drop) those settings to resume it."
        )
    changes = {f: now[f] for f in asked & RESUMABLE_FIELDS if before[f] != now[f]}
    notes = [f"resuming with {k}={v!r} (was {before[k]!r})" for k, v in changes.items()]
    return previous.replace(**changes), notes


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {e}); repair or remove it, "
                       "or use another workdir") from None


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
    return rows


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        axes[0].plot(epochs, [r[key] for r in rows], label=label)
    axes[0].set_title("loss")
    for key, label in (("train_acc", "train"), ("test_acc", "test")):
        axes[1].plot(epochs, [100 * r[key] for r in rows], label=label)
    axes[1].set_title("accuracy (%)")
    axes[2].plot(epochs, [r["lr"] for r in rows])
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class EpochProgress:
    """Per-step hook of the training loop: progress bar, interval checkpoints, the
    divergence check, stop signals and early stop.

    It syncs with the device only every ``log_every`` steps (and at checkpoints).
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, options: RunOptions, ckpt: Any,
                 lead: bool, elapsed: float, signals: Any, history: list[dict[str, Any]]):
        self.cfg, self.spe, self.options, self.ckpt = cfg, steps_per_epoch, options, ckpt
        self.lead, self.elapsed, self.signals, self.history = lead, elapsed, signals, history
        self.bar = None

    def start(self, epoch: int, first: int) -> None:
        from tqdm import tqdm

        self.epoch = epoch
        self.bar = tqdm(total=self.spe, initial=first,
                        desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                        disable=not self.lead or not self.options.progress, dynamic_ncols=True,
                        file=sys.stderr)
        self.t_epoch = time.perf_counter()
        self.mark = (self.t_epoch, first)

    def save(self, state: Any, step: int, epoch: int, in_epoch: int,
             partial: dict[str, Any] | None, elapsed: float) -> None:
        """Checkpoint ``state`` with the data position (resume at batch ``in_epoch`` of
        ``epoch`` with the partial-epoch metric sums ``partial``) and the metrics history."""
        from flax_resnet.checkpoint import NonFiniteStateError

        try:
            self.ckpt.save(step, state, {
                "epoch": epoch, "step_in_epoch": in_epoch, "global_step": step,
                "steps_per_epoch": self.spe, "partial_metrics": partial,
                "elapsed_s": elapsed, "config": self.cfg.to_dict(), "history": self.history,
            })
        except NonFiniteStateError as e:
            raise self.diverged(step, str(e)) from None
        except Exception as e:  # noqa: BLE001 - a full disk, a vanished directory, ...
            raise RunError(
                f"could not write the checkpoint of step {step} in {self.ckpt.directory} "
                f"({type(e).__name__}: {e}); the checkpoints before it are kept: fix that and "
                "rerun the same command to resume"
            ) from None

    def diverged(self, step: int, what: str) -> DivergedError:
        good = self.ckpt.all_steps()
        last = (f"the last good checkpoint, step {max(good)}, is kept" if good
                else "no checkpoint was written")
        return DivergedError(
            f"training diverged at step {step} (epoch {self.epoch + 1}): {what}; {last}. "
            "Lower the learning rate (lr) or change the recipe, in another workdir or after "
            "removing this one"
        )

    def partial(self, metrics: dict) -> dict[str, Any]:
        import jax

        host = jax.device_get(metrics)
        return {"loss_sum": float(host["loss_sum"]), "correct": int(host["correct"]),
                "count": int(host["count"])}

    def stop_requested(self, done: int) -> bool:
        """Whether a stop signal arrived; several processes decide together, at log points."""
        import jax

        if jax.process_count() == 1:
            return self.signals.requested is not None
        if done % self.options.log_every and done != self.spe:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(int(self.signals.requested is not None))
        return bool(max(flags))

    def interrupt(self, state: Any, step: int, done: int, metrics: dict | None) -> Interrupted:
        """Checkpoint at ``step`` (batch ``done`` of this epoch) and the exception to raise."""
        elapsed = self.elapsed + time.perf_counter() - self.t_epoch
        if step not in self.ckpt.all_steps():
            epoch, in_epoch = (self.epoch + 1, 0) if done == self.spe else (self.epoch, done)
            self.save(state, step, epoch, in_epoch,
                      self.partial(metrics) if metrics is not None else None, elapsed)
        if self.bar is not None:
            self.bar.close()
        return Interrupted(self.signals.requested or signal.SIGTERM, step)

    def after_step(self, done: int, state: Any, metrics: dict) -> bool:
        from flax_resnet import training as T

        options = self.options
        step = self.epoch * self.spe + done
        if done % options.log_every == 0 or done == self.spe:
            m = T.summarize(metrics)  # the one host sync of a logging interval
            if not math.isfinite(m["loss"]):
                raise self.diverged(step, f"the mean training loss of the epoch so far is "
                                          f"{m['loss']}")
            if self.lead and options.progress:
                now = time.perf_counter()
                ips = (done - self.mark[1]) * self.cfg.batch_size / max(now - self.mark[0],
                                                                        1e-9)
                self.bar.update(done - self.bar.n)
                self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{100 * m['acc']:.2f}%",
                                     img_s=f"{ips:,.0f}", refresh=False)
                self.mark = (now, done)
        if done != self.spe and self.stop_requested(done):  # epoch ends stop after eval
            raise self.interrupt(state, step, done, metrics)
        every = options.checkpoint_every_steps
        if every and step % every == 0 and done != self.spe:  # epoch ends save after eval
            elapsed = self.elapsed + time.perf_counter() - self.t_epoch
            self.save(state, step, self.epoch, done, self.partial(metrics), elapsed)
        return bool(options.stop_after_steps and step >= options.stop_after_steps)

    def finish(self, train: dict[str, float], test: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{train['loss']:.4f}", acc=f"{100 * train['acc']:.2f}%",
                             test_acc=f"{100 * test['acc']:.2f}%", refresh=False)
        self.bar.close()


def _flip_note(result: dict[str, float]) -> str:
    return f" (flip TTA {100 * result['acc_flip']:.2f}%)" if "acc_flip" in result else ""


def _architecture_of_weights(cfg: TrainConfig, asked: set[str]) -> tuple[TrainConfig, str]:
    """``cfg`` with the architecture fields it was not told taken from its init_from."""
    from flax_resnet.convert import read_config

    try:
        weights = read_config(cfg.init_from)
    except (OSError, ValueError) as e:
        raise RunError(f"init_from {cfg.init_from}: {e}", "init_from") from None
    now = cfg.flat()
    taken = {f: weights[f] for f in ARCHITECTURE_FIELDS
             if f in weights and f not in asked and weights[f] != now[f]}
    if not taken:
        return cfg, ""
    try:
        cfg = cfg.replace(**taken)
    except ValueError as e:
        raise RunError(f"init_from {cfg.init_from}: its architecture does not fit: {e}",
                       "init_from") from None
    said = ", ".join(f"{k}={v}" for k, v in taken.items())
    return cfg, f"architecture from init_from {cfg.init_from}: {said}"


PREPROCESSING_FILE = "preprocessing.json"  # the run's input mean/std, and where they came from


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _input_stats(cfg: TrainConfig, ds: Any, workdir: Path, started: bool) -> Any:
    """The run's input preprocessing: as recorded in the workdir; else, for a run that
    checkpointed before runs recorded it, the data set's (what it trained with); else as
    ``cfg.input_stats`` says."""
    from flax_resnet.hub import Preprocessing

    recorded = workdir / PREPROCESSING_FILE
    if recorded.exists():
        return Preprocessing.from_dict(_read_json(recorded))
    channels = ds.image_shape[-1]
    own = Preprocessing(tuple(ds.mean), tuple(ds.std), (channels, *ds.image_shape[:2]),
                        source=f"the data set {ds.name}")
    if started or cfg.input_stats == "data" or not cfg.init_from:
        return own
    from flax_resnet.convert import read_preprocessing

    try:
        weights = read_preprocessing(cfg.init_from)
    except (OSError, ValueError) as e:
        raise RunError(f"init_from {cfg.init_from}: {e}", "init_from") from None
    fits = weights is not None and len(weights.mean) == len(weights.std) == channels
    if cfg.input_stats == "weights" and not fits:
        what = "carry no preprocessing" if weights is None else \
            f"expect {len(weights.mean)} channels, the data has {channels}"
        raise RunError(f"input_stats weights: the init_from weights {cfg.init_from} {what}; "
                       "use input_stats data", "input_stats")
    return weights if fits else own


def _prepare_workdir(workdir: Path, eval_only: bool) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise RunError(f"workdir {workdir} is a file, not a directory; use another workdir",
                       "workdir")
    if eval_only and not workdir.is_dir():
        raise RunError(f"eval_only: no run in workdir {workdir}", "eval_only")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # a name of its own: the processes of a multi-host run probe one workdir at once
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunError(f"workdir {workdir} cannot be written ({e.strerror or e}); use another "
                       "workdir", "workdir") from None


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    options: RunOptions | None = None,
    *,
    asked: set[str] | None = None,
) -> dict[str, Any]:
    """Train ``config`` in ``workdir``, or resume the run there, and evaluate it; returns
    the summary (``summary.json``), or the evaluation with ``options.eval_only``. ``asked``:
    the fields of ``config`` the caller chose (see ``resolve_config``). The model's
    ``num_classes`` and ``in_channels`` are the data set's.

    Raises ``RunError`` for a run that cannot go ahead as asked (``DivergedError`` when the
    training diverges), and ``Interrupted`` after SIGTERM / SIGINT, once the checkpoint of
    the step it stopped at is written.
    """
    import jax

    from flax_resnet.safety import StopSignals, WorkdirBusyError, WorkdirLock

    options = options or RunOptions()
    workdir = Path(workdir)
    lead = jax.process_index() == 0  # it alone holds the lock of a multi-host run's workdir
    _prepare_workdir(workdir, options.eval_only)
    with contextlib.ExitStack() as held:
        if lead:
            try:
                lock = held.enter_context(WorkdirLock(workdir))
            except WorkdirBusyError as e:
                raise RunError(str(e), "workdir") from None
            if lock.took_over:
                print(f"taking over the workdir lock of a run that ended without releasing "
                      f"it ({lock.took_over})", flush=True)
        signals = held.enter_context(StopSignals())
        return _run(config, workdir, options, asked, signals, lead)


def _run(cfg: TrainConfig, workdir: Path, options: RunOptions, asked: set[str] | None,
         signals: Any, lead: bool) -> dict[str, Any]:
    import jax

    from flax_resnet import training as T
    from flax_resnet.checkpoint import Checkpointer, DamagedCheckpointError
    from flax_resnet.data import DataError, load_dataset
    from flax_resnet.optim import make_optimizer, make_schedule
    from flax_resnet.sharding import check_batch_size, make_mesh, replicate

    config_path = workdir / "config.json"
    stored = _read_json(config_path) if config_path.exists() else None
    cfg, notes = resolve_config(cfg, stored, asked, workdir)
    if stored is None and cfg.init_from and asked is not None:
        cfg, note = _architecture_of_weights(cfg, asked)
        notes += [note] if note else []
    if options.eval_only and stored is None:
        raise RunError(f"eval_only: no run in workdir {workdir} (no config.json)", "eval_only")

    def say(*msg: Any) -> None:
        if lead:
            print(*msg, flush=True)

    for note in notes:
        say(note)
    try:
        ds = load_dataset(cfg.dataset, options.data_dir)
    except DataError as e:
        raise RunError(str(e), "dataset") from None
    cfg = cfg.replace(num_classes=ds.num_classes, in_channels=ds.image_shape[-1])

    mesh = make_mesh()
    eval_batch = options.eval_batch_size or cfg.batch_size
    for field, size in (("batch_size", cfg.batch_size), ("eval_batch_size", eval_batch)):
        try:
            check_batch_size(size, mesh, field)
        except ValueError as e:
            raise RunError(str(e), field) from None
    spe = T.steps_per_epoch(len(ds.train), cfg.batch_size)
    if spe < 1:
        raise RunError(
            f"batch_size {cfg.batch_size} is larger than the {len(ds.train)} training images",
            "batch_size",
        )

    ckpt = Checkpointer(workdir / "checkpoints", keep=options.keep_checkpoints)
    stats = _input_stats(cfg, ds, workdir, started=bool(ckpt.all_steps()))
    say(f"input mean/std {_fmt(stats.mean)} / {_fmt(stats.std)} from {stats.source}")
    model = T.create_model(cfg)
    if cfg.init_from and not ckpt.all_steps():  # until the run's first checkpoint exists
        from flax_resnet.convert import load_pretrained

        try:
            load_pretrained(model, cfg.init_from, num_classes=ds.num_classes)
        except (OSError, ValueError, KeyError) as e:
            raise RunError(f"init_from {cfg.init_from}: {e}", "init_from") from None
        say(f"initialised from {cfg.init_from}")
    tx = make_optimizer(cfg, spe)
    defs, state = T.init_train_state(model, tx, cfg.seed)
    del model
    state = replicate(jax.device_get(state), mesh)
    n_params = T.param_count(state.params)

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    say(f"devices: {len(devices)} x {', '.join(kinds)} ({jax.default_backend()}) on "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}, batch {cfg.batch_size} "
        f"= {cfg.batch_size // mesh.devices.size}/device, parallel={cfg.parallel}")
    m = cfg.model
    say(f"model: ResNet-{m.depth} norm={m.norm} stem={m.stem} width={m.width} "
        f"dtype={cfg.dtype}: {n_params:,} parameters; data {ds.name}: "
        f"{len(ds.train)} train / {len(ds.test)} test, {ds.num_classes} classes, "
        f"{spe} steps/epoch")

    if lead:
        _write_json(config_path, cfg.to_dict())
        _write_json(workdir / PREPROCESSING_FILE, stats.to_dict())
    meta: dict[str, Any] = {}
    try:
        good = ckpt.restore_good(state, report=say, set_aside=lead and not options.eval_only)
    except DamagedCheckpointError as e:
        raise RunError(f"every checkpoint in {ckpt.directory} is damaged (the oldest: {e}); "
                       "move the directory away to start over") from None
    latest = None
    if good is not None:
        latest, state, meta = good
        if meta.get("steps_per_epoch") != spe:
            raise RunError(
                f"the checkpoint in {workdir} was taken at {meta.get('steps_per_epoch')} "
                f"steps per epoch, this run has {spe}: the data set or batch size differs"
            )
        say(f"resumed from step {latest} (epoch {meta['epoch'] + 1}, batch "
            f"{meta['step_in_epoch']} of {spe})")
    elif options.eval_only:
        raise RunError(f"eval_only: no checkpoint in {workdir / 'checkpoints'}", "eval_only")

    eval_step = T.make_eval_step(defs.eval, cfg, stats.mean, stats.std, mesh)
    if options.eval_only:
        result = T.evaluate(eval_step, state, ds.test, eval_batch, mesh)
        out = {"step": latest, "epoch": meta.get("epoch"), "test_loss": result["loss"],
               "test_acc": result["acc"], "test_count": result["count"]}
        if cfg.eval_flip:
            out["test_acc_flip"] = result["acc_flip"]
        say(f"eval of step {latest}: test loss {result['loss']:.4f}, "
            f"test acc {100 * result['acc']:.2f}%{_flip_note(result)} "
            f"({result['count']} images)")
        if lead:
            _write_json(workdir / "eval.json", out)
        ckpt.close()
        return out

    train_step = T.make_train_step(defs.train, tx, cfg, stats.mean, stats.std, mesh)
    schedule = make_schedule(cfg, spe)
    start_epoch = int(meta.get("epoch", 0))
    start_in_epoch = int(meta.get("step_in_epoch", 0))
    elapsed = float(meta.get("elapsed_s", 0.0))
    metrics_path = workdir / "metrics.jsonl"
    rows = [r for r in _read_metrics(metrics_path) if r.get("epoch", 0) <= start_epoch]
    saved_rows = [r for r in meta.get("history", []) if r.get("epoch", 0) <= start_epoch]
    if len(rows) < len(saved_rows):
        say(f"{metrics_path} holds {len(rows)} of the {len(saved_rows)} epochs the checkpoint "
            "recorded; restoring them from the checkpoint")
        rows = saved_rows
    if lead:
        _write_metrics(metrics_path, rows)  # drop epochs logged after the checkpoint

    compile_s = 0.0
    if start_epoch < cfg.epochs:
        # Compilation counts as training time (in the first epoch this process runs), as
        # PyTorch's cudnn.benchmark autotuning does in its first epoch.
        t_compile = time.perf_counter()
        train_step, eval_step = T.compile_steps(
            train_step, eval_step, state, ds.image_shape, cfg.batch_size, eval_batch, mesh)
        compile_s = time.perf_counter() - t_compile
        say(f"compiled the train and eval steps in {compile_s:.1f} s")
    progress = EpochProgress(cfg, spe, options, ckpt, lead, elapsed + compile_s, signals, rows)
    stopped = False
    step = int(latest or 0)
    for epoch in range(start_epoch, cfg.epochs):
        first = start_in_epoch if epoch == start_epoch else 0
        partial = meta.get("partial_metrics") if epoch == start_epoch and first else None
        metrics = T.replicate_metrics(partial, mesh)
        lr = float(schedule((epoch + 1) * spe - 1))  # the lr of the epoch's last update
        progress.start(epoch, first)
        if progress.stop_requested(0):
            raise progress.interrupt(state, step, first, None if not first else metrics)
        state, metrics, stopped = T.train_epoch(
            train_step, state, metrics, ds.train, seed=cfg.seed, epoch=epoch,
            batch_size=cfg.batch_size, mesh=mesh, start=first, callback=progress.after_step,
        )
        step = (epoch + 1) * spe
        if stopped:
            progress.bar.close()
            say(f"stopped after step {int(jax.device_get(state.step))} (stop_after_steps); "
                "rerun to resume from the last checkpoint")
            break
        train = T.summarize(metrics)
        train_time = time.perf_counter() - progress.t_epoch
        test = T.evaluate(eval_step, state, ds.test, eval_batch, mesh)
        if not (math.isfinite(train["loss"]) and math.isfinite(test["loss"])):
            raise progress.diverged(step, f"the epoch's training loss is {train['loss']} and "
                                          f"its test loss {test['loss']}")
        epoch_time = time.perf_counter() - progress.t_epoch
        progress.elapsed += epoch_time
        epoch_time += compile_s
        progress.finish(train, test)
        row = {
            "epoch": epoch + 1, "step": step,
            "train_loss": train["loss"], "train_acc": train["acc"],
            "test_loss": test["loss"], "test_acc": test["acc"],
            **({"test_acc_flip": test["acc_flip"]} if cfg.eval_flip else {}), "lr": lr,
            "epoch_time_s": epoch_time,
            "train_images_per_s": (spe - first) * cfg.batch_size / max(train_time, 1e-9),
            "elapsed_s": progress.elapsed,
            **({"compile_s": compile_s} if compile_s else {}),
        }
        compile_s = 0.0
        say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train['loss']:.4f} acc "
            f"{100 * train['acc']:.2f}% | test loss {test['loss']:.4f} acc "
            f"{100 * test['acc']:.2f}%{_flip_note(test)} | lr {lr:.3g} | {epoch_time:.1f}s "
            f"({row['train_images_per_s']:,.0f} img/s)")
        rows.append(row)
        if lead:
            try:
                _write_metrics(metrics_path, rows)
                plot_curves(rows, workdir / "curves.png")
            except OSError as e:
                raise RunError(f"could not write {metrics_path} ({e}); the checkpoints are "
                               "kept: fix that and rerun the same command to resume") from None
        every = options.checkpoint_every_epochs
        if epoch + 1 == cfg.epochs or (every and (epoch + 1) % every == 0):
            progress.save(state, step, epoch + 1, 0, None, progress.elapsed)
        if epoch + 1 < cfg.epochs and progress.stop_requested(spe):
            raise progress.interrupt(state, step, spe, None)
    ckpt.close()
    if stopped or not rows:
        return {"stopped_at_step": int(jax.device_get(state.step))} if stopped else {}
    last = rows[-1]
    flip = {}
    if "test_acc_flip" in last:  # --eval-flip may have been switched on when resuming
        flip = {"final_test_acc_flip": last["test_acc_flip"],
                "best_test_acc_flip": max(r.get("test_acc_flip", 0.0) for r in rows)}
    summary = {
        "final_test_acc": last["test_acc"], "final_test_loss": last["test_loss"],
        "best_test_acc": max(r["test_acc"] for r in rows), **flip,
        "final_train_acc": last["train_acc"], "epochs": last["epoch"],
        "global_step": last["step"], "parameters": n_params,
        "wall_time_s": last["elapsed_s"],
        "devices": f"{len(devices)} x {', '.join(kinds)}",
        "processes": jax.process_count(), "config": cfg.to_dict(),
    }
    if lead:
        _write_json(workdir / "summary.json", summary)
    say(f"final test accuracy {100 * last['test_acc']:.2f}% "
        f"(best {100 * max(r['test_acc'] for r in rows):.2f}%)"
        + (f", with flip TTA {100 * flip['final_test_acc_flip']:.2f}% (best "
           f"{100 * flip['best_test_acc_flip']:.2f}%)" if flip else "")
        + f"; wrote {workdir}/summary.json")
    return summary
