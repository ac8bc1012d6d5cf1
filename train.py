#!/usr/bin/env python
"""Train a Flax NNX ResNet on CIFAR-10/100, an image folder or synthetic data.

    python train.py                                   # the study's run (ResNet-34, AdamW)
    python train.py --norm rms --depth 50             # same recipe, other model
    python train.py --recipe fast --dataset folder:data/cifar10-jpeg
    python train.py --recipe he --epochs 2 --dataset synthetic --workdir runs/smoke

The same command runs on the CPU, one GPU, several GPUs or a TPU slice: the batch is
sharded over every device of every host. On several hosts pass ``--coordinator HOST:PORT
--num-processes N --process-id I`` (or set JAX_COORDINATOR_ADDRESS / run under SLURM, Open
MPI or a Cloud TPU, where they are detected). Rerunning a command resumes from the latest
checkpoint in ``--workdir``; ``--eval-only`` evaluates it.

Data: ``--dataset cifar10`` / ``cifar100`` go through tensorflow-datasets into
``--data-dir``. Reading needs only ``tensorflow-datasets`` and ``array_record``; the first
download-and-prepare also needs ``pip install tensorflow importlib_resources`` (and
internet, or the official ``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz`` placed in
``DATA_DIR/downloads/manual/``).

Outputs in ``--workdir``: ``config.json`` (the run's config), ``checkpoints/<step>/``
(Orbax), ``metrics.jsonl`` (one line per epoch), ``curves.png``, ``summary.json`` (final
test accuracy), ``eval.json`` (``--eval-only``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
# Fields a resumed run may change (anything else that differs from the stored config.json
# is a conflict): extending training, or switching the data-parallel mode.
RESUMABLE_FIELDS = frozenset({"epochs", "parallel", "eval_flip"})


class UsageError(Exception):
    """A bad flag value, a missing data set, a conflicting workdir: message, exit code 2."""


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _recipe_default(field: str) -> str:
    from flax_resnet.training import RECIPES, TrainConfig

    base = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    parts = []
    for name, overrides in RECIPES.items():
        value = overrides.get(field, base[field])
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        parts.append(f"{name}: {'arch default' if value is None else value}")
    return "default " + "; ".join(parts)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only for flags with a fixed default (recipe-dependent ones say
    their per-recipe values in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from flax_resnet.data import DATASET_SPECS
    from flax_resnet.init import INIT_SCHEMES
    from flax_resnet.models import DEPTHS, SHORTCUTS, STEMS
    from flax_resnet.norms import NORMS
    from flax_resnet.training import CLI_DTYPES, OPTIMIZERS, PARALLEL_MODES, RECIPES, SCHEDULES

    p = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        epilog="Model and optimization flags override the --recipe preset; unset ones take "
        "the preset's value (shown per recipe).",
        formatter_class=_HelpFormatter,
    )
    d = _recipe_default
    g = p.add_argument_group("recipe and data")
    g.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="preset: study = the study's run (ResNet-34, AdamW 1e-3, batch 100, "
                   "80 epochs, lr/3 every 20); he = He et al. CIFAR (ResNet-32, SGD 0.1, "
                   "lr/10 at 50%%/75%%); fast = ResNet-18, SGD Nesterov, cosine, label "
                   "smoothing, 30 epochs. Default: study")
    g.add_argument("--dataset", default=None,
                   help=f"one of {', '.join(DATASET_SPECS)}; default cifar10")
    g.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR", "data"),
                   help="where tfds prepares/reads CIFAR and where folder caches may go")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, choices=DEPTHS, default=None, help=d("depth"))
    g.add_argument("--norm", default=None,
                   help=f"one of {', '.join(NORMS)} (or an alias: batch, layer, group, "
                   f"instance, rmsnorm...); {d('norm')}")
    g.add_argument("--stem", choices=STEMS, default=None,
                   help=f"imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv; {d('stem')}")
    g.add_argument("--width", type=float, default=None,
                   help=f"multiplies every stage's channels; {d('width')}")
    g.add_argument("--shortcut", choices=SHORTCUTS + tuple(s.lower() for s in SHORTCUTS),
                   default=None, help=f"B: 1x1 conv projection, A: zero-padded identity; "
                   f"{d('shortcut')}")
    g.add_argument("--init", choices=INIT_SCHEMES, default=None,
                   help=f"weight init scheme; {d('init')}")
    g.add_argument("--norm-groups", type=int, default=None,
                   help=f"groups of --norm gn; {d('norm_groups')}")
    g.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=None,
                   help=f"zero each block's last norm scale; {d('zero_init_residual')}")
    # float64 (training.DTYPES) is library-only: it needs 64-bit JAX (the parity tests).
    g.add_argument("--dtype", choices=CLI_DTYPES, default=None,
                   help=f"compute dtype (params and optimizer state stay float32); {d('dtype')}")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from pretrained weights (torch_ref/torchvision .pt/.pth/"
                   ".safetensors); the classifier is replaced if the class count differs")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"adamw = torch AdamW, sgd = torch SGD (coupled decay), adam = torch "
                   f"Adam (coupled decay); {d('optimizer')}")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate; {d('lr')}")
    g.add_argument("--weight-decay", type=float, default=None, help=d("weight_decay"))
    g.add_argument("--decay-norm-bias", dest="decay_norm_and_bias",
                   action=argparse.BooleanOptionalAction, default=None,
                   help=f"apply weight decay to norm scales and biases too (torch's "
                   f"model.parameters()); {d('decay_norm_and_bias')}")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum; {d('momentum')}")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=d("nesterov"))
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size, split over all devices; {d('batch_size')}")
    g.add_argument("--epochs", type=int, default=None, help=d("epochs"))
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help=f"seed: lr/3 every 20 epochs; step/multistep: lr*gamma at "
                   f"--lr-milestones; cosine: warmup + cosine (per step); onecycle; constant. "
                   f"Epoch-based ones change at epoch boundaries. {d('schedule')}")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warmup (cosine) / rising phase (onecycle); {d('warmup_epochs')}")
    g.add_argument("--lr-milestones", type=_csv_floats, default=None,
                   help=f"multistep milestones as fractions of --epochs; {d('lr_milestones')}")
    g.add_argument("--lr-gamma", type=float, default=None,
                   help=f"multistep factor; {d('lr_gamma')}")
    g.add_argument("--label-smoothing", type=float, default=None, help=d("label_smoothing"))
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help=f"pad + random crop + horizontal flip on the device; {d('augment')}")
    g.add_argument("--augment-pad", type=int, default=None,
                   help=f"zero padding before the random crop; {d('augment_pad')}")
    g.add_argument("--seed", type=int, default=None,
                   help=f"init, data order and augmentation seed; {d('seed')}")
    g.add_argument("--eval-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also report test accuracy with flip test-time augmentation (mean "
                   f"logits of image and mirror) as test_acc_flip; {d('eval_flip')}")
    g = p.add_argument_group("parallelism")
    g.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                   help="jit: global (SyncBN) statistics over the sharded batch; pmap: "
                   "per-device BatchNorm statistics and an explicit gradient mean like "
                   "PyTorch DDP (running stats from device 0). Default jit")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0 (jax.distributed.initialize); "
                   "default $JAX_COORDINATOR_ADDRESS, or auto-detected under SLURM/Open MPI/TPU")
    g.add_argument("--num-processes", type=int, default=None, help="multi-host: process count")
    g.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
    g = p.add_argument_group("run")
    g.add_argument("--workdir", default="runs/default",
                   help="checkpoints, config.json, metrics.jsonl, curves.png, summary.json")
    g.add_argument("--eval-batch-size", type=int, default=None,
                   help="test batch size (padded and masked); default the batch size")
    g.add_argument("--log-every", type=int, default=50,
                   help="steps between progress updates (the only host syncs in an epoch)")
    g.add_argument("--checkpoint-every-steps", type=int, default=0,
                   help="also checkpoint every N steps (0: only at the end of each epoch)")
    g.add_argument("--checkpoint-every-epochs", type=int, default=1,
                   help="checkpoint after every N-th epoch (0: only after the last); a resumed "
                   "run restarts from the last checkpoint")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the latest checkpoint of --workdir and exit")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="JAX persistent compilation cache: a rerun of the same model, batch "
                   "and devices loads its compiled steps instead of compiling (~15 s for "
                   "ResNet-18 on a GPU). Default $JAX_COMPILATION_CACHE_DIR, else "
                   "~/.cache/flax_resnet/jax; '' disables it")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="(testing) exit after this many global steps without saving, as if "
                   "preempted; 0 disables")
    return p


CONFIG_FLAGS = (
    "dataset", "depth", "norm", "stem", "width", "shortcut", "init", "norm_groups",
    "zero_init_residual", "dtype", "optimizer", "lr", "weight_decay", "momentum", "nesterov",
    "decay_norm_and_bias", "batch_size", "epochs", "schedule", "warmup_epochs",
    "lr_milestones", "lr_gamma", "label_smoothing", "augment", "augment_pad", "seed",
    "parallel", "eval_flip",
)


def resolve_config(args: argparse.Namespace, stored: dict[str, Any] | None):
    """The run's TrainConfig: recipe + explicit flags, or the stored one when resuming.

    When ``workdir/config.json`` exists, explicit flags (all fields, if ``--recipe`` is
    given) must agree with it, except ``RESUMABLE_FIELDS``.
    """
    from flax_resnet.training import TrainConfig, make_config

    explicit = {f: getattr(args, f) for f in CONFIG_FLAGS if getattr(args, f) is not None}
    try:
        requested = make_config(args.recipe or "study", **explicit)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    if stored is None:
        return requested, []
    try:
        previous = TrainConfig.from_dict(stored).validate()
    except (TypeError, ValueError) as e:
        raise UsageError(f"{args.workdir}/config.json is not a valid run config: {e}") from None
    asked = set(CONFIG_FLAGS) if args.recipe else set(explicit)
    conflicts = [
        f"{f}={getattr(previous, f)!r} (this command: {getattr(requested, f)!r})"
        for f in sorted(asked - RESUMABLE_FIELDS)
        if getattr(previous, f) != getattr(requested, f)
    ]
    if conflicts:
        raise UsageError(
            f"--workdir {args.workdir} holds a run with a different config: "
            + "; ".join(conflicts)
            + ". Use another --workdir, or match (or drop) those flags to resume it."
        )
    changes = {
        f: getattr(requested, f)
        for f in asked & RESUMABLE_FIELDS
        if getattr(previous, f) != getattr(requested, f)
    }
    notes = [f"resuming with {k}={v!r} (was {getattr(previous, k)!r})" for k, v in changes.items()]
    return dataclasses.replace(previous, **changes), notes


def _cluster_detected() -> bool:
    env = os.environ

    def more_than_one(name: str) -> bool:
        try:
            return int(env.get(name, "1")) > 1
        except ValueError:
            return False

    return (
        ("SLURM_JOB_ID" in env and more_than_one("SLURM_NTASKS"))
        or more_than_one("OMPI_COMM_WORLD_SIZE")
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "," in env.get("TPU_PROCESS_ADDRESSES", "")
    )


def init_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` for multi-process runs, before any device use."""
    import jax

    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = args.num_processes
    pid = args.process_id
    if num is None and os.environ.get("JAX_NUM_PROCESSES"):
        num = int(os.environ["JAX_NUM_PROCESSES"])
    if pid is None and os.environ.get("JAX_PROCESS_ID"):
        pid = int(os.environ["JAX_PROCESS_ID"])
    if num is not None and num < 1:
        raise UsageError(f"--num-processes {num} is not allowed; it must be >= 1")
    if pid is not None and num is not None and not 0 <= pid < num:
        raise UsageError(f"--process-id {pid} is not allowed; it must be in [0, {num})")
    if coordinator:
        if num == 1:
            return
        jax.distributed.initialize(coordinator, num, pid)
    elif num not in (None, 1) or pid not in (None, 0):
        raise UsageError("--num-processes / --process-id need --coordinator HOST:PORT")
    elif _cluster_detected():
        jax.distributed.initialize()


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


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
    """Per-step hook of the training loop: progress bar, interval checkpoints, early stop.

    It syncs with the device only every ``--log-every`` steps (and at checkpoints).
    """

    def __init__(self, cfg, steps_per_epoch: int, args: argparse.Namespace, ckpt, lead: bool,
                 elapsed: float):
        self.cfg, self.spe, self.args, self.ckpt, self.lead = cfg, steps_per_epoch, args, ckpt, lead
        self.elapsed = elapsed
        self.bar = None

    def start(self, epoch: int, first: int) -> None:
        from tqdm import tqdm

        self.epoch = epoch
        self.bar = tqdm(total=self.spe, initial=first,
                        desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                        disable=not self.lead or self.args.no_progress, dynamic_ncols=True,
                        file=sys.stderr)
        self.t_epoch = time.perf_counter()
        self.mark = (self.t_epoch, first)

    def save(self, state: Any, step: int, epoch: int, in_epoch: int,
             partial: dict[str, Any] | None, elapsed: float) -> None:
        """Checkpoint ``state`` with the data position: resume at batch ``in_epoch`` of
        ``epoch`` with the partial-epoch metric sums ``partial``."""
        self.ckpt.save(step, state, {
            "epoch": epoch, "step_in_epoch": in_epoch, "global_step": step,
            "steps_per_epoch": self.spe, "partial_metrics": partial,
            "elapsed_s": elapsed, "config": self.cfg.to_dict(),
        })

    def after_step(self, done: int, state: Any, metrics: dict) -> bool:
        from flax_resnet import training as T

        args = self.args
        step = self.epoch * self.spe + done
        if self.lead and not args.no_progress and (done % args.log_every == 0
                                                   or done == self.spe):
            m = T.summarize(metrics)  # the one host sync of a logging interval
            now = time.perf_counter()
            ips = (done - self.mark[1]) * self.cfg.batch_size / max(now - self.mark[0], 1e-9)
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{100 * m['acc']:.2f}%",
                                 img_s=f"{ips:,.0f}", refresh=False)
            self.mark = (now, done)
        every = args.checkpoint_every_steps
        if every and step % every == 0 and done != self.spe:  # epoch ends save after eval
            import jax

            host = jax.device_get(metrics)
            partial = {"loss_sum": float(host["loss_sum"]), "correct": int(host["correct"]),
                       "count": int(host["count"])}
            elapsed = self.elapsed + time.perf_counter() - self.t_epoch
            self.save(state, step, self.epoch, done, partial, elapsed)
        return bool(args.stop_after_steps and step >= args.stop_after_steps)

    def finish(self, train: dict[str, float], test: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{train['loss']:.4f}", acc=f"{100 * train['acc']:.2f}%",
                             test_acc=f"{100 * test['acc']:.2f}%", refresh=False)
        self.bar.close()


def _flip_note(result: dict[str, float]) -> str:
    return f" (flip TTA {100 * result['acc_flip']:.2f}%)" if "acc_flip" in result else ""


def compilation_cache_dir(flag: str | None) -> str | None:
    """The persistent compilation cache directory: the flag, else JAX's own environment
    variable, else one under the user's cache folder; ``''`` disables it."""
    if flag is not None:
        return flag or None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_resnet", "jax")


def run(args: argparse.Namespace) -> int:
    init_distributed(args)

    import jax

    from flax_resnet import training as T
    from flax_resnet.checkpoint import Checkpointer
    from flax_resnet.data import DataError, load_dataset
    from flax_resnet.models import ARCHS

    workdir = Path(args.workdir)
    config_path = workdir / "config.json"
    stored = _read_json(config_path) if config_path.exists() else None
    cfg, notes = resolve_config(args, stored)
    if args.eval_only and stored is None:
        raise UsageError(f"--eval-only: no run in --workdir {args.workdir} (no config.json)")
    for name in ("log_every", "keep_checkpoints"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("checkpoint_every_steps", "checkpoint_every_epochs"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    # Set only once the command line is known to be good: it is process-wide JAX state.
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir(args.compilation_cache))

    lead = jax.process_index() == 0

    def say(*msg: Any) -> None:
        if lead:
            print(*msg, flush=True)

    for note in notes:
        say(note)
    try:
        ds = load_dataset(cfg.dataset, args.data_dir)
    except DataError as e:
        raise UsageError(str(e)) from None

    mesh = T.make_mesh()
    eval_batch = args.eval_batch_size or cfg.batch_size
    try:
        T.check_batch_size(cfg.batch_size, mesh)
        T.check_batch_size(eval_batch, mesh, "--eval-batch-size")
    except ValueError as e:
        raise UsageError(str(e)) from None
    spe = T.steps_per_epoch(len(ds.train), cfg.batch_size)
    if spe < 1:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is larger than the {len(ds.train)} training images"
        )

    model = T.create_model(cfg, ds.num_classes)
    if args.init_from and stored is None:
        from flax_resnet.convert import load_pretrained

        try:
            load_pretrained(model, args.init_from, num_classes=ds.num_classes)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"--init-from {args.init_from}: {e}") from None
        say(f"initialised from {args.init_from}")
    tx = T.make_optimizer(cfg, spe)
    defs, state = T.init_train_state(model, tx, cfg.seed)
    del model
    state = T.replicate(jax.device_get(state), mesh)
    n_params = T.param_count(state.params)

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    say(f"devices: {len(devices)} x {', '.join(kinds)} ({jax.default_backend()}) on "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}, batch {cfg.batch_size} "
        f"= {cfg.batch_size // mesh.devices.size}/device, parallel={cfg.parallel}")
    stem = cfg.stem or ARCHS[cfg.depth].default_stem
    say(f"model: ResNet-{cfg.depth} norm={cfg.norm} stem={stem} "
        f"width={cfg.width} dtype={cfg.dtype}: {n_params:,} parameters; data {ds.name}: "
        f"{len(ds.train)} train / {len(ds.test)} test, {ds.num_classes} classes, "
        f"{spe} steps/epoch")

    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(config_path, cfg.to_dict())
    ckpt = Checkpointer(workdir / "checkpoints", keep=args.keep_checkpoints)
    meta: dict[str, Any] = {}
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(state, latest)
        if meta.get("steps_per_epoch") != spe:
            raise UsageError(
                f"the checkpoint in {args.workdir} was taken at {meta.get('steps_per_epoch')} "
                f"steps per epoch, this run has {spe}: the data set or batch size differs"
            )
        say(f"resumed from step {latest} (epoch {meta['epoch'] + 1}, batch "
            f"{meta['step_in_epoch']} of {spe})")
    elif args.eval_only:
        raise UsageError(f"--eval-only: no checkpoint in {workdir / 'checkpoints'}")

    eval_step = T.make_eval_step(defs.eval, cfg, ds.mean, ds.std, mesh)
    if args.eval_only:
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
        return 0

    train_step = T.make_train_step(defs.train, tx, cfg, ds.mean, ds.std, mesh)
    schedule = T.make_schedule(cfg, spe)
    start_epoch = int(meta.get("epoch", 0))
    start_in_epoch = int(meta.get("step_in_epoch", 0))
    elapsed = float(meta.get("elapsed_s", 0.0))
    metrics_path = workdir / "metrics.jsonl"
    rows = [r for r in _read_metrics(metrics_path) if r.get("epoch", 0) <= start_epoch]
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
    progress = EpochProgress(cfg, spe, args, ckpt, lead, elapsed + compile_s)
    stopped = False
    for epoch in range(start_epoch, cfg.epochs):
        first = start_in_epoch if epoch == start_epoch else 0
        partial = meta.get("partial_metrics") if epoch == start_epoch and first else None
        metrics = T.replicate_metrics(partial, mesh)
        lr = float(schedule((epoch + 1) * spe - 1))  # the lr of the epoch's last update
        progress.start(epoch, first)
        state, metrics, stopped = T.train_epoch(
            train_step, state, metrics, ds.train, seed=cfg.seed, epoch=epoch,
            batch_size=cfg.batch_size, mesh=mesh, start=first, callback=progress.after_step,
        )
        if stopped:
            progress.bar.close()
            say(f"stopped after step {int(jax.device_get(state.step))} (--stop-after-steps); "
                "rerun to resume from the last checkpoint")
            break
        train = T.summarize(metrics)
        train_time = time.perf_counter() - progress.t_epoch
        test = T.evaluate(eval_step, state, ds.test, eval_batch, mesh)
        epoch_time = time.perf_counter() - progress.t_epoch
        progress.elapsed += epoch_time
        epoch_time += compile_s
        progress.finish(train, test)
        row = {
            "epoch": epoch + 1, "step": (epoch + 1) * spe,
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
            _write_metrics(metrics_path, rows)
            plot_curves(rows, workdir / "curves.png")
        every = args.checkpoint_every_epochs
        if epoch + 1 == cfg.epochs or (every and (epoch + 1) % every == 0):
            progress.save(state, (epoch + 1) * spe, epoch + 1, 0, None, progress.elapsed)
    ckpt.close()
    if stopped:
        return 0
    if lead and rows:
        last = rows[-1]
        flip = {}
        if "test_acc_flip" in last:  # --eval-flip may have been switched on when resuming
            flip = {"final_test_acc_flip": last["test_acc_flip"],
                    "best_test_acc_flip": max(r.get("test_acc_flip", 0.0) for r in rows)}
        _write_json(workdir / "summary.json", {
            "final_test_acc": last["test_acc"], "final_test_loss": last["test_loss"],
            "best_test_acc": max(r["test_acc"] for r in rows), **flip,
            "final_train_acc": last["train_acc"], "epochs": last["epoch"],
            "global_step": last["step"], "parameters": n_params,
            "wall_time_s": last["elapsed_s"],
            "devices": f"{len(devices)} x {', '.join(kinds)}",
            "processes": jax.process_count(), "config": cfg.to_dict(),
        })
        say(f"final test accuracy {100 * last['test_acc']:.2f}% "
            f"(best {100 * max(r['test_acc'] for r in rows):.2f}%)"
            + (f", with flip TTA {100 * flip['final_test_acc_flip']:.2f}% (best "
               f"{100 * flip['best_test_acc_flip']:.2f}%)" if flip else "")
            + f"; wrote {workdir}/summary.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
