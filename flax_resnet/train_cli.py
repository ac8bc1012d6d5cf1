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
import os
import sys

EXIT_USAGE = 2


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


def compilation_cache_dir(flag: str | None) -> str | None:
    """The persistent compilation cache directory: the flag, else JAX's own environment
    variable, else one under the user's cache folder; ``''`` disables it."""
    if flag is not None:
        return flag or None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_resnet", "jax")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def run(args: argparse.Namespace) -> int:
    """Wire the flags to ``flax_resnet.trainer.train_and_evaluate``."""
    from flax_resnet.config import ConfigError
    from flax_resnet.trainer import RunError, RunOptions, train_and_evaluate
    from flax_resnet.training import TrainConfig, make_config

    explicit = {f: getattr(args, f) for f in CONFIG_FLAGS if getattr(args, f) is not None}
    try:
        config = make_config(args.recipe or "study", **explicit)
        options = RunOptions(
            data_dir=args.data_dir, eval_batch_size=args.eval_batch_size,
            init_from=args.init_from, eval_only=args.eval_only, log_every=args.log_every,
            checkpoint_every_steps=args.checkpoint_every_steps,
            checkpoint_every_epochs=args.checkpoint_every_epochs,
            keep_checkpoints=args.keep_checkpoints, stop_after_steps=args.stop_after_steps,
            progress=not args.no_progress,
        )
    except ConfigError as e:  # the library's field name, as this command's flag
        raise UsageError(str(e).replace(e.field, _flag(e.field), 1)) from None
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    init_distributed(args)
    import jax

    # Set only once the command line is known to be good: it is process-wide JAX state.
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir(args.compilation_cache))
    asked = {f.name for f in dataclasses.fields(TrainConfig)} if args.recipe else set(explicit)
    try:
        train_and_evaluate(config, args.workdir, options, asked=asked)
    except (RunError, ConfigError) as e:
        raise UsageError(str(e)) from None
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
