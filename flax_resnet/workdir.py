"""A run's directory: its files and the policy for taking up the run stored there.

``config.json`` (the run's ``TrainConfig``; a resumed run keeps it, see ``resolve_config``),
``preprocessing.json`` (the input mean/std and where they came from), ``metrics.jsonl``
(one row per epoch), ``curves.png``, ``summary.json`` / ``eval.json``; checkpoints live in
``checkpoints/`` (``flax_resnet.checkpoint``), TensorBoard events in ``tensorboard/``. Every
file is written atomically. The run's starting weights (``init_from``) are resolved here too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flax_resnet.config import ARCHITECTURE_FIELDS, DATA_MODEL_FIELDS, TrainConfig
from flax_resnet.safety import dumps, write_text_atomic

CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"  # the run's input mean/std, and where they came from
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"

# Fields a resumed run may change (anything else that differs from the stored config.json
# is a conflict): extending training, switching the data-parallel mode or flip TTA.
RESUMABLE_FIELDS = frozenset({"epochs", "parallel", "eval_flip"})
# Fields whose open value ("auto" / None) a run settles from its data and weights and
# stores settled: asking for the open value again agrees with whatever was settled.
SETTLED_FIELDS = {"augment": "auto", "image_size": None, "resize_size": None,
                  "crop_pct": None, "interpolation": None}


class RunError(ValueError):
    """A run that cannot go ahead as asked: a missing data set, a workdir that holds another
    run, a checkpoint that does not fit. ``field`` names the setting at fault, if one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def resolve_config(
    requested: TrainConfig, stored: dict[str, Any] | None, asked: set[str] | None,
    workdir: Path,
) -> tuple[TrainConfig, list[str]]:
    """The run's config: ``requested``, or the one stored in ``workdir`` when resuming.

    When ``workdir/config.json`` exists, the ``asked`` fields of ``requested`` (by their
    ``TrainConfig.flat()`` names; all of them if ``None``) must agree with it, except
    ``RESUMABLE_FIELDS``, which the resumed run takes from ``requested``, and the model
    fields the data set decides (``DATA_MODEL_FIELDS``); an open ``SETTLED_FIELDS`` value
    agrees with the stored, settled one.
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
        if before[f] != now[f] and not (f in SETTLED_FIELDS and now[f] == SETTLED_FIELDS[f])
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


def init_weights(cfg: TrainConfig, started: bool) -> Any:
    """The weights ``init_from`` names, read once; None without init_from, or once the run
    has checkpoints (its own weights then)."""
    if not cfg.init_from or started:
        return None
    from flax_resnet.weights import resolve

    try:
        weights = resolve(cfg.init_from)
        weights.config  # noqa: B018 - inferring the architecture may fail: say it now
    except (OSError, ValueError) as e:
        raise RunError(f"init_from {cfg.init_from}: {e}", "init_from") from None
    return weights


def architecture_of(cfg: TrainConfig, weights: Any, asked: set[str]
                     ) -> tuple[TrainConfig, str]:
    """``cfg`` with the architecture fields it was not told taken from ``weights``."""
    now = cfg.flat()
    taken = {f: weights.config[f] for f in ARCHITECTURE_FIELDS
             if f in weights.config and f not in asked and weights.config[f] != now[f]}
    if not taken:
        return cfg, ""
    try:
        cfg = cfg.replace(**taken)
    except ValueError as e:
        raise RunError(f"init_from {cfg.init_from}: its architecture does not fit: {e}",
                       "init_from") from None
    said = ", ".join(f"{k}={v}" for k, v in taken.items())
    return cfg, f"architecture from init_from {cfg.init_from}: {said}"


def initial_model(cfg: TrainConfig, weights: Any) -> Any:
    """A model of ``cfg`` holding ``weights`` (a fresh classifier where theirs does not fit,
    or always with ``cfg.reset_classifier``)."""
    from flax_resnet import training as T

    model = T.create_model(cfg)
    try:
        weights.load_into(model, reset_classifier=cfg.reset_classifier)
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"init_from {cfg.init_from}: {e}", "init_from") from None
    return model


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {e}); repair or remove it, "
                       "or use another workdir") from None


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
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


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
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


def prepare_workdir(workdir: Path, eval_only: bool) -> None:
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




class EventLog:
    """TensorBoard event files in ``WORKDIR/tensorboard`` (tensorboardX, which needs no
    TensorFlow). A resumed run purges the events logged after its checkpoint's step, so the
    curves show what the run computed once."""

    def __init__(self, workdir: Path, start_step: int, enabled: bool):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.fspath(workdir / TENSORBOARD_DIR),
                                         purge_step=start_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
