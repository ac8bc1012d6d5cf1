"""The training loop: ``train_and_evaluate(config, workdir, options)``.

It owns the run and its policy: taking up the run stored in the workdir (the stored
``config.json`` wins; only ``RESUMABLE_FIELDS`` may change; ``flax_resnet.workdir`` has its
files), the verified Orbax checkpoints (``checkpoints/<step>/``: every
``checkpoint_every_epochs`` epochs and ``checkpoint_every_steps`` steps, the last
``keep_checkpoints`` kept; ``flax_resnet.checkpoint``), and what keeps the work: one run per
workdir (a lock), a damaged checkpoint falling back to the newest good one, an intact one
that does not fit never touched and never replaced by a fresh start, no non-finite state
ever saved (a diverged run stops, ``DivergedError``), and SIGTERM / SIGINT ending the run
with a checkpoint (``Interrupted``).

The loop is flat, one iteration per update: ``for step in range(start, total)``; logging,
the divergence check, evaluation, checkpoints and the stop-signal poll are decided in it by
the step number. Its batches come from ``batches.TrainBatches``, whose position (epoch,
index, seed) every checkpoint saves. The program it runs is ``program.build_program``'s.
``train.py`` only parses flags into a ``TrainConfig`` and ``RunOptions`` and calls it;
Python users call it directly::

    from flax_resnet import trainer
    from flax_resnet.config import make_config
    cfg = make_config("fast", dataset="synthetic", epochs=2)
    summary = trainer.train_and_evaluate(cfg, "runs/smoke")
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flax_resnet.config import ConfigError, TrainConfig, option
from flax_resnet.prediction import CLASSES_FILE
from flax_resnet.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PREPROCESSING_FILE,
    RESUMABLE_FIELDS,
    EventLog,
    RunError,
    architecture_of,
    init_weights,
    initial_model,
    plot_curves,
    prepare_workdir,
    read_json,
    read_metrics,
    resolve_config,
    write_json,
    write_metrics,
)

__all__ = ["RESUMABLE_FIELDS", "DivergedError", "Interrupted", "RunError", "RunOptions",
           "train_and_evaluate"]


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
    data_workers: int | None = option(None, "loader processes decoding and transforming "
                                      "images read from files (0: threads of the training "
                                      "process)", group="data",
                                      none="the cores but one, at most 16")
    skip_bad_images: bool = option(False, "skip images that cannot be decoded (listed in the "
                                   "workdir's bad_images.txt) instead of stopping the run",
                                   group="data")

    def __post_init__(self) -> None:
        for name, least in (("log_every", 1), ("keep_checkpoints", 1),
                            ("checkpoint_every_steps", 0), ("checkpoint_every_epochs", 0),
                            ("stop_after_steps", 0), ("data_workers", 0)):
            value = getattr(self, name)
            if name == "data_workers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(name, f"{name} {value!r} must be an integer >= {least}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size",
                              f"eval_batch_size {self.eval_batch_size!r} must be >= 1")


def _flip_note(result: dict[str, float]) -> str:
    return f" (flip TTA {100 * result['acc_flip']:.2f}%)" if "acc_flip" in result else ""


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    options: RunOptions | None = None,
    *,
    asked: set[str] | None = None,
) -> dict[str, Any]:
    """Train ``config`` in ``workdir``, or resume the run there, and evaluate it; returns
    the summary (``summary.json``), or the evaluation with ``options.eval_only``. ``asked``:
    the fields of ``config`` the caller chose (see ``workdir.resolve_config``). The model's
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
    prepare_workdir(workdir, options.eval_only)
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
        return _Run(config, workdir, options, asked, signals, lead).run()


class _Run:
    """One ``train_and_evaluate`` call: set up, then the evaluation or the training loop."""

    def __init__(self, cfg: TrainConfig, workdir: Path, options: RunOptions,
                 asked: set[str] | None, signals: Any, lead: bool):
        self.cfg, self.workdir, self.options = cfg, workdir, options
        self.asked, self.signals, self.lead = asked, signals, lead

    def say(self, *msg: Any) -> None:
        if self.lead:
            print(*msg, flush=True)

    # ----------------------------------------------------------------- set-up

    def run(self) -> dict[str, Any]:

        from flax_resnet.batches import DataPosition, steps_per_epoch
        from flax_resnet.checkpoint import Checkpointer, CheckpointError
        from flax_resnet.program import DataSpec, build_program
        from flax_resnet.run_data import open_run_data
        from flax_resnet.sharding import check_batch_size, make_mesh

        workdir, options = self.workdir, self.options
        config_path = workdir / CONFIG_FILE
        stored = read_json(config_path) if config_path.exists() else None
        cfg, notes = resolve_config(self.cfg, stored, self.asked, workdir)
        if options.eval_only and stored is None:
            raise RunError(f"eval_only: no run in workdir {workdir} (no config.json)",
                           "eval_only")
        ckpt = Checkpointer(workdir / CHECKPOINT_DIR, keep=options.keep_checkpoints)
        weights = init_weights(cfg, started=bool(ckpt.all_steps()))
        if weights is not None and stored is None and self.asked is not None:
            cfg, note = architecture_of(cfg, weights, self.asked)
            notes += [note] if note else []
        for note in notes:
            self.say(note)
        data = open_run_data(cfg, options.data_dir, options.data_workers,
                             options.skip_bad_images, weights, workdir, self.say)
        cfg, ds = data.cfg, data.ds

        mesh = make_mesh()
        eval_batch = options.eval_batch_size or cfg.batch_size
        for field, size in (("batch_size", cfg.batch_size), ("eval_batch_size", eval_batch)):
            try:
                check_batch_size(size, mesh, field)
            except ValueError as e:
                raise RunError(str(e), field) from None
        spe = steps_per_epoch(len(ds.train), cfg.batch_size)
        if spe < 1:
            raise RunError(f"batch_size {cfg.batch_size} is larger than the {len(ds.train)} "
                           "training images", "batch_size")

        stats = data.stats
        self.say(f"input mean/std {_fmt(stats.mean)} / {_fmt(stats.std)} from {stats.source}")
        initial = None if weights is None else initial_model(cfg, weights)
        program, state = build_program(
            cfg, mesh, DataSpec(spe, data.image_shape, tuple(stats.mean), tuple(stats.std)),
            initial=initial)
        if weights is not None:
            if self.lead:
                write_json(workdir / "init_from.json", {
                    "init_from": cfg.init_from, "description": weights.description,
                    "origin": weights.provenance()})
            self.say(f"initialised from {weights.description}"
                     + (", with a fresh classifier (reset_classifier)"
                        if cfg.reset_classifier else ""))
        del initial, weights
        self._describe(cfg, program, state, ds, spe)

        if self.lead:
            write_json(config_path, cfg.to_dict())
            write_json(workdir / PREPROCESSING_FILE, stats.to_dict())
            if ds.class_names:
                write_json(workdir / CLASSES_FILE, {"classes": list(ds.class_names)})
        try:
            good = ckpt.restore_good(state, report=self.say,
                                     set_aside=self.lead and not options.eval_only)
        except CheckpointError as e:
            raise RunError(str(e)) from None
        step, meta = 0, {}
        if good is not None:
            step, state, meta = good
            if meta.get("steps_per_epoch") != spe:
                raise RunError(
                    f"the checkpoint in {workdir} was taken at {meta.get('steps_per_epoch')} "
                    f"steps per epoch, this run has {spe}: the data set or batch size differs")
        elif options.eval_only:
            raise RunError(f"eval_only: no checkpoint in {workdir / CHECKPOINT_DIR}",
                           "eval_only")
        # Checkpoints written before positions were saved: the position follows from the step.
        position = DataPosition.from_dict(meta["data"]) if "data" in meta else \
            DataPosition.at_step(step, spe, cfg.batch_size, cfg.seed)
        if good is not None:
            self.say(f"resumed from step {step} (epoch {position.epoch + 1}, batch "
                     f"{position.index // cfg.batch_size} of {spe})")
        self.cfg, self.ds, self.ckpt, self.eval_batch, self.spe = cfg, ds, ckpt, eval_batch, spe
        self.data = data
        try:
            if options.eval_only:
                return self.evaluate_only(program, state, step, position)
            return self.train(program, state, step, position, meta)
        finally:
            for part in (getattr(self, "batches", None), getattr(self, "events", None)):
                if getattr(part, "close", None) is not None:
                    part.close()
            ckpt.close()

    def _describe(self, cfg: TrainConfig, program: Any, state: Any, ds: Any, spe: int) -> None:
        import jax

        from flax_resnet.training import param_count

        mesh = program.mesh
        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        self.devices = f"{len(devices)} x {', '.join(kinds)}"
        self.say(f"devices: {len(devices)} x {', '.join(kinds)} ({jax.default_backend()}) on "
                 f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}, batch "
                 f"{cfg.batch_size} = {cfg.batch_size // mesh.devices.size}/device, "
                 f"parallel={cfg.parallel}")
        self.n_params = param_count(state.params)
        m = cfg.model
        self.say(f"model: ResNet-{m.depth} norm={m.norm} stem={m.stem} width={m.width} "
                 f"dtype={cfg.dtype}: {self.n_params:,} parameters; data {ds.name}: "
                 f"{len(ds.train)} train / {len(ds.test)} test, {ds.num_classes} classes, "
                 f"{spe} steps/epoch")

    def evaluate_only(self, program: Any, state: Any, step: int, position: Any
                      ) -> dict[str, Any]:
        from flax_resnet.training import evaluate

        result = evaluate(program.eval_step, state, program.mesh,
                          self.data.eval_batches(program.mesh, self.eval_batch))
        out = {"step": step, "epoch": position.epoch, "test_loss": result["loss"],
               "test_acc": result["acc"], "test_count": result["count"]}
        if self.cfg.eval_flip:
            out["test_acc_flip"] = result["acc_flip"]
        self.say(f"eval of step {step}: test loss {result['loss']:.4f}, test acc "
                 f"{100 * result['acc']:.2f}%{_flip_note(result)} ({result['count']} images)")
        if self.lead:
            write_json(self.workdir / "eval.json", out)
        return out

    # ----------------------------------------------------------------- the loop

    def train(self, program: Any, state: Any, start: int, position: Any,
              meta: dict[str, Any]) -> dict[str, Any]:
        import jax

        from flax_resnet.pipeline import BadImagesError
        from flax_resnet.training import evaluate, summarize

        cfg, options, spe = self.cfg, self.options, self.spe
        total = cfg.epochs * spe
        rows = self.rows = self._history(meta, position)
        self.elapsed = float(meta.get("elapsed_s", 0.0))
        compile_s = 0.0
        events = self.events = EventLog(self.workdir, start, self.lead and start < total)
        if start < total:
            # Compilation counts as training time (of the first epoch this process runs), as
            # PyTorch's cudnn.benchmark autotuning does in its first epoch.
            t = time.perf_counter()
            program = program.compile(state, cfg.batch_size, self.eval_batch)
            compile_s = time.perf_counter() - t
            self.say(f"compiled the train and eval steps in {compile_s:.1f} s")
        self.elapsed += compile_s
        batches = self.batches = self.data.train_batches(program.mesh, position, total)
        metrics = program.zero_metrics(meta.get("partial_metrics") if position.index else None)
        first = position.index // cfg.batch_size  # the first batch of this process's epoch
        epoch_start = self.epoch_start = self.mark = time.perf_counter()
        mark_step = start
        wait = wait_mark = 0.0
        bar = self._bar(start // spe, first)
        for step in range(start, total):
            epoch, batch = divmod(step, spe)
            if self._stop_requested(step):
                if step not in self.ckpt.all_steps():
                    self._save(state, step, batches.position,
                               self._partial(metrics) if batch else None,
                               self.elapsed + time.perf_counter() - epoch_start)
                bar.close()
                raise Interrupted(self.signals.requested or signal.SIGTERM, step)
            t = time.perf_counter()
            try:
                images, labels = next(batches)
            except BadImagesError as e:
                if jax.process_count() == 1:
                    bar.close()
                    raise self._bad_images(e, state, step, batches.position, metrics,
                                           epoch_start) from None
                # The other processes are already in this step's collectives: feed them a
                # blank batch, and all stop together at the next poll, saving nothing.
                self.bad_images = e
                images, labels = self._blank_batch(program.mesh)
            wait += time.perf_counter() - t
            state, metrics = program.train_step(state, metrics, images, labels)
            done = step + 1
            end_of_epoch = done % spe == 0
            if done % options.log_every == 0 or end_of_epoch:
                m = summarize(metrics)  # the one host sync of a logging interval
                if not math.isfinite(m["loss"]):
                    raise self._diverged(done, epoch, "the mean training loss of the epoch "
                                         f"so far is {m['loss']}")
                now = time.perf_counter()
                rate = (done - mark_step) * cfg.batch_size / max(now - self.mark, 1e-9)
                bar.update(batch + 1 - bar.n)
                waited = (wait - wait_mark) / max(now - self.mark, 1e-9)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{100 * m['acc']:.2f}%",
                                img_s=f"{rate:,.0f}", data_wait=f"{100 * waited:.0f}%",
                                refresh=False)
                events.scalars(done, {"train/loss": m["loss"], "train/acc": m["acc"],
                                      "perf/images_per_s": rate,
                                      "perf/data_wait_fraction": waited})
                self.mark, mark_step, wait_mark = now, done, wait
            every = options.checkpoint_every_steps
            if every and done % every == 0 and not end_of_epoch:  # epoch ends save after eval
                self._save(state, done, batches.position, self._partial(metrics),
                           self.elapsed + time.perf_counter() - epoch_start)
            if options.stop_after_steps and done >= options.stop_after_steps:
                bar.close()
                self.say(f"stopped after step {done} (stop_after_steps); rerun to resume from "
                         "the last checkpoint")
                return {"stopped_at_step": done}
            if end_of_epoch:
                train = summarize(metrics)
                train_time = time.perf_counter() - epoch_start
                try:
                    test = evaluate(program.eval_step, state, program.mesh,
                                    self.data.eval_batches(program.mesh, self.eval_batch))
                except BadImagesError as e:
                    raise self._bad_images(e, state, done, batches.position, None,
                                           epoch_start) from None
                if not (math.isfinite(train["loss"]) and math.isfinite(test["loss"])):
                    raise self._diverged(done, epoch, f"the epoch's training loss is "
                                         f"{train['loss']} and its test loss {test['loss']}")
                epoch_time = time.perf_counter() - epoch_start
                self.elapsed += epoch_time
                bar.set_postfix(loss=f"{train['loss']:.4f}", acc=f"{100 * train['acc']:.2f}%",
                                test_acc=f"{100 * test['acc']:.2f}%", refresh=False)
                bar.close()
                row = {
                    "epoch": epoch + 1, "step": done,
                    "train_loss": train["loss"], "train_acc": train["acc"],
                    "test_loss": test["loss"], "test_acc": test["acc"],
                    **({"test_acc_flip": test["acc_flip"]} if cfg.eval_flip else {}),
                    "lr": float(program.schedule(done - 1)),  # the epoch's last update's
                    "epoch_time_s": epoch_time + compile_s,
                    "train_images_per_s": (spe - first) * cfg.batch_size / max(train_time,
                                                                               1e-9),
                    "data_wait_s": wait,
                    "elapsed_s": self.elapsed,
                    **({"compile_s": compile_s} if compile_s else {}),
                }
                self.say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train['loss']:.4f} acc "
                         f"{100 * train['acc']:.2f}% | test loss {test['loss']:.4f} acc "
                         f"{100 * test['acc']:.2f}%{_flip_note(test)} | lr {row['lr']:.3g} | "
                         f"{row['epoch_time_s']:.1f}s ({row['train_images_per_s']:,.0f} img/s)")
                rows.append(row)
                self._write_rows(rows)
                events.scalars(done, {"test/loss": test["loss"], "test/acc": test["acc"],
                                      "train/lr": row["lr"]})
                every = options.checkpoint_every_epochs
                if done == total or (every and (epoch + 1) % every == 0):
                    self._save(state, done, batches.position, None, self.elapsed)
                metrics = program.zero_metrics()
                compile_s, wait, wait_mark, first = 0.0, 0.0, 0.0, 0
                epoch_start = self.mark = time.perf_counter()
                mark_step = done
                if done < total:
                    bar = self._bar(epoch + 1, 0)
        return self._summary(rows)

    # ----------------------------------------------------------------- the loop's helpers

    def _bar(self, epoch: int, first: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.spe, initial=first,
                    desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                    disable=not self.lead or not self.options.progress, dynamic_ncols=True,
                    file=sys.stderr)

    def _history(self, meta: dict[str, Any], position: Any) -> list[dict[str, Any]]:
        """The epoch rows up to the checkpoint's epoch: ``metrics.jsonl``'s, or the
        checkpoint's own copy where the file lost some; rows logged after the checkpoint go."""
        path = self.workdir / METRICS_FILE
        rows = [r for r in read_metrics(path) if r.get("epoch", 0) <= position.epoch]
        saved = [r for r in meta.get("history", []) if r.get("epoch", 0) <= position.epoch]
        if len(rows) < len(saved):
            self.say(f"{path} holds {len(rows)} of the {len(saved)} epochs the checkpoint "
                     "recorded; restoring them from the checkpoint")
            rows = saved
        if self.lead:
            write_metrics(path, rows)
        return rows

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        if not self.lead:
            return
        path = self.workdir / METRICS_FILE
        try:
            write_metrics(path, rows)
            plot_curves(rows, self.workdir / "curves.png")
        except OSError as e:
            raise RunError(f"could not write {path} ({e}); the checkpoints are kept: fix that "
                           "and rerun the same command to resume") from None

    def _stop_requested(self, step: int) -> bool:
        """Whether a stop signal arrived. The processes of a multi-host run decide together,
        at the steps where they all look: log points and epoch starts."""
        import jax

        if jax.process_count() == 1:
            return self.signals.requested is not None
        if step % self.options.log_every and step % self.spe:
            return False
        from jax.experimental import multihost_utils

        mine = 2 if getattr(self, "bad_images", None) else int(self.signals.requested
                                                               is not None)
        flags = multihost_utils.process_allgather(mine)
        if max(flags) == 2:
            good = self.ckpt.all_steps()
            kept = f"the last checkpoint, step {max(good)}, is kept" if good else \
                "no checkpoint was written"
            what = self.bad_images or "another process met images that cannot be decoded " \
                "(see its log)"
            raise RunError(f"{what}\nThe run stopped before step {step}; {kept} "
                           "(the batches since it are not saved); rerun the same command to "
                           "resume from it.", "dataset")
        return bool(max(flags))

    def _blank_batch(self, mesh: Any) -> tuple[Any, Any]:
        import numpy as np

        from flax_resnet.sharding import process_rows, put_batch

        rows = process_rows(mesh, self.cfg.batch_size)
        n = len(range(self.cfg.batch_size)[rows])
        return put_batch(mesh, self.cfg.batch_size,  # type: ignore[return-value]
                         np.zeros((n, *self.data.image_shape), np.uint8),
                         np.zeros((n,), np.int32))

    @staticmethod
    def _partial(metrics: dict) -> dict[str, Any]:
        import jax

        host = jax.device_get(metrics)
        return {"loss_sum": float(host["loss_sum"]), "correct": int(host["correct"]),
                "count": int(host["count"])}

    def _save(self, state: Any, step: int, position: Any, partial: dict[str, Any] | None,
              elapsed: float) -> None:
        """Checkpoint ``state`` after ``step`` updates, with the data position of the next
        batch, the partial-epoch metric sums and the metrics history."""
        from flax_resnet.checkpoint import NonFiniteStateError

        try:
            self.ckpt.save(step, state, {
                "data": position.to_dict(), "global_step": step,
                "steps_per_epoch": self.spe, "partial_metrics": partial,
                "elapsed_s": elapsed, "config": self.cfg.to_dict(), "history": self.rows,
            })
        except NonFiniteStateError as e:
            raise self._diverged(step, step // self.spe, str(e)) from None
        except Exception as e:  # noqa: BLE001 - a full disk, a vanished directory, ...
            raise RunError(
                f"could not write the checkpoint of step {step} in {self.ckpt.directory} "
                f"({type(e).__name__}: {e}); the checkpoints before it are kept: fix that and "
                "rerun the same command to resume"
            ) from None

    def _bad_images(self, e: Exception, state: Any, step: int, position: Any, metrics: Any,
                    epoch_start: float) -> RunError:
        """Stop on images that cannot be decoded, with the state before their batch saved."""
        if step not in self.ckpt.all_steps():
            partial = self._partial(metrics) if metrics is not None and step % self.spe else None
            self._save(state, step, position, partial,
                       self.elapsed + time.perf_counter() - epoch_start)
        return RunError(f"{e}\nThe run stopped at step {step} with a checkpoint; rerun the "
                        "same command (with --skip-bad-images, or once the images are fixed) "
                        "to resume.", "dataset")

    def _diverged(self, step: int, epoch: int, what: str) -> DivergedError:
        good = self.ckpt.all_steps()
        last = (f"the last good checkpoint, step {max(good)}, is kept" if good
                else "no checkpoint was written")
        return DivergedError(
            f"training diverged at step {step} (epoch {epoch + 1}): {what}; {last}. "
            "Lower the learning rate (lr) or change the recipe, in another workdir or after "
            "removing this one"
        )

    def _summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import jax

        if not rows:
            return {}
        last = rows[-1]
        flip = {}
        if "test_acc_flip" in last:  # --eval-flip may have been switched on when resuming
            flip = {"final_test_acc_flip": last["test_acc_flip"],
                    "best_test_acc_flip": max(r.get("test_acc_flip", 0.0) for r in rows)}
        best = max(r["test_acc"] for r in rows)
        summary = {
            "final_test_acc": last["test_acc"], "final_test_loss": last["test_loss"],
            "best_test_acc": best, **flip,
            "final_train_acc": last["train_acc"], "epochs": last["epoch"],
            "global_step": last["step"], "parameters": self.n_params,
            "wall_time_s": last["elapsed_s"], "devices": self.devices,
            "processes": jax.process_count(), "config": self.cfg.to_dict(),
        }
        if self.lead:
            write_json(self.workdir / "summary.json", summary)
        self.say(f"final test accuracy {100 * last['test_acc']:.2f}% (best {100 * best:.2f}%)"
                 + (f", with flip TTA {100 * flip['final_test_acc_flip']:.2f}% (best "
                    f"{100 * flip['best_test_acc_flip']:.2f}%)" if flip else "")
                 + f"; wrote {self.workdir}/summary.json")
        return summary
