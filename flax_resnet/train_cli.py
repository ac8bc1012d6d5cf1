"""Train a Flax NNX ResNet on CIFAR-10/100, an image folder or synthetic data.

    python train.py                                   # the study's run (ResNet-34, AdamW)
    python train.py --norm rms --depth 50             # same recipe, other model
    python train.py --recipe fast --dataset folder:data/cifar10-jpeg
    python train.py --recipe he --epochs 2 --dataset synthetic --workdir runs/smoke

The batch is sharded over every device of every host; rerunning a command resumes the run
in ``--workdir``. The flags are made from the fields of ``flax_resnet.config.TrainConfig``
(its ``ModelConfig`` included) and ``flax_resnet.trainer.RunOptions``: a field's name with
dashes, its help. This module only parses, wires, and turns the library's errors into
messages (naming the flag) with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import Any

from flax_resnet.config import (
    ARCHITECTURE_FIELDS,
    MODEL_NAMES,
    RECIPES,
    ConfigError,
    ModelConfig,
    TrainConfig,
    make_config,
    named_model,
)
from flax_resnet.distributed import ProcessOptions
from flax_resnet.trainer import RunOptions

PROG = "train.py"
EXIT_USAGE = 2  # a bad flag, data set or workdir: nothing was trained
EXIT_DIVERGED = 3  # the loss went non-finite: the last finite checkpoint is kept
# SIGTERM / SIGINT: 128 + the signal (143 / 130), after a checkpoint
GROUPS = {"data": "recipe and data", "model": "model", "optimization": "optimization",
          "parallelism": "parallelism", "run": "run"}


class UsageError(Exception):
    """A bad flag value, a missing data set, a conflicting workdir: message, exit code 2."""


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None


def _fields(cls: type, group: str) -> Iterator[tuple[dataclasses.Field, str, str]]:
    """(field, flag, group) of each field of ``cls`` that has a flag, the model's included."""
    for f in dataclasses.fields(cls):
        if f.name == "model":
            yield from _fields(ModelConfig, "model")
        elif "help" in f.metadata and f.metadata.get("flag", f.name) is not None:
            flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
            yield f, flag, f.metadata.get("group", group)


def _recipe_defaults(field: dataclasses.Field) -> str:
    def text(value: Any) -> str:
        return (field.metadata.get("none", "none") if value is None
                else ",".join(map(str, value)) if isinstance(value, tuple) else str(value))

    values = {name: text(preset.get(field.name, field.default)) for name, preset in RECIPES.items()}
    if len(set(values.values())) == 1:
        return f"default {values['study']}"
    return "default " + "; ".join(f"{name}: {value}" for name, value in values.items())


class _HelpFormatter(argparse.HelpFormatter):
    """``(default: X)`` only for flags with a fixed default: a config flag's help gives its
    value per recipe."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _add(group: argparse._ArgumentGroup, f: dataclasses.Field, flag: str, default: Any,
         help: str) -> None:
    kind, kw = str(f.type), {"dest": f.name, "default": default, "help": help}
    if "bool" in kind:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = (_csv_floats if "tuple" in kind else float if "float" in kind
                      else int if "int" in kind else str)
        kw.update({k: f.metadata[k] for k in ("choices", "metavar") if k in f.metadata})
    group.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Model and optimization flags override the --recipe preset; unset ones take "
        "the preset's value (shown per recipe). Exit status: 0 done; 2 bad input (flag, data, "
        "workdir); 3 diverged (the last finite checkpoint is kept); 130 / 143 stopped by "
        "SIGINT / SIGTERM after writing a checkpoint (rerun to resume).",
        formatter_class=_HelpFormatter)
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups["data"].add_argument(
        "--recipe", choices=tuple(RECIPES), default=None,
        help="preset (flax_resnet.config.RECIPES): study = the study's run (ResNet-34, AdamW "
        "1e-3, batch 100, 80 epochs, lr/3 every 20); he = He et al. CIFAR (ResNet-32, SGD "
        "0.1, lr/10 at 50%%/75%%); fast = ResNet-18, SGD Nesterov, cosine, label smoothing, "
        "30 epochs; imagenet = torchvision's ResNet-50 recipe (SGD 0.1 per 256 images, lr/10 "
        "every 30 of 90 epochs, random-resized-crop 224); imagenet-cosine = the same with 5 "
        "warmup epochs, cosine per epoch, label smoothing; finetune = from --init-from with a "
        "fresh classifier, SGD 0.01 per 256, cosine over 10 epochs. Default study")
    groups["model"].add_argument(
        "--model", metavar="NAME", default=None,
        help="a torchvision / timm architecture by name (resnet50d, resnext50_32x4d, "
        "wide_resnet50_2, ...: flax_resnet.config.MODEL_NAMES); the model flags below "
        "override its fields")
    for f, flag, group in _fields(TrainConfig, "optimization"):
        # None: not given, so the recipe's value (and a resumed run's stored one) holds
        _add(groups[group], f, flag, None, f"{f.metadata['help']}; {_recipe_defaults(f)}")
    groups["run"].add_argument(
        "--workdir", default="runs/default",
        help="checkpoints, config.json, metrics.jsonl, curves.png, summary.json")
    run_defaults = {"data_dir": os.environ.get("TFDS_DATA_DIR", "data")}
    for f, flag, group in (*_fields(RunOptions, "run"), *_fields(ProcessOptions, "run")):
        _add(groups[group], f, flag, run_defaults.get(f.name, f.default), f.metadata["help"])
    return p


def _flag_message(e: ConfigError | Exception, flags: dict[str, str]) -> str:
    """The library's message, its leading field name written as this command's flag."""
    text, field = str(e), getattr(e, "field", None)
    if field in flags and text.startswith(field):
        return flags[field] + text[len(field):]
    return text


def _flags() -> dict[str, str]:
    flags = {f.name: flag for cls in (TrainConfig, RunOptions, ProcessOptions)
             for f, flag, _ in _fields(cls, "")}
    return {**flags, "recipe": "--recipe", "workdir": "--workdir", "model": "--model"}


def configure(args: argparse.Namespace) -> tuple[TrainConfig, RunOptions, set[str]]:
    """(the run's config, its options, the config fields the command chose) from the flags;
    ``UsageError`` naming the flag for a bad value."""

    def given(cls: type) -> dict[str, Any]:
        return {f.name: getattr(args, f.name) for f, _, _ in _fields(cls, "")}

    explicit = {k: v for k, v in given(TrainConfig).items() if v is not None}
    try:
        if args.model:
            named = named_model(args.model).to_dict()
            fields = MODEL_NAMES[args.model.split(".", 1)[0]]
            explicit = {**{k: named[k] for k in fields}, **explicit}
        # Processes join first: a recipe's dtype asks JAX for its backend, after which
        # jax.distributed can no longer be initialised.
        ProcessOptions(**given(ProcessOptions)).start()
        config = make_config(args.recipe or "study", **explicit)
        options = RunOptions(**given(RunOptions))
    except (ConfigError, ValueError, TypeError) as e:
        raise UsageError(_flag_message(e, _flags())) from None
    # A recipe fixes every field it could set; init_from only when given, and then the
    # weights' architecture holds unless a flag says otherwise.
    recipe_fixes = set(config.flat()) - {"init_from"}
    if config.init_from:
        recipe_fixes -= set(ARCHITECTURE_FIELDS)
    asked = (recipe_fixes if args.recipe else set()) | set(explicit)
    return config, options, asked


def run(args: argparse.Namespace) -> int:
    """Wire the flags to ``flax_resnet.trainer.train_and_evaluate``."""
    from flax_resnet.trainer import DivergedError, Interrupted, RunError, train_and_evaluate

    flags = _flags()
    config, options, asked = configure(args)
    try:
        train_and_evaluate(config, args.workdir, options, asked=asked)
    except DivergedError as e:
        print(f"{PROG}: {_flag_message(e, flags)}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (RunError, ConfigError) as e:
        raise UsageError(_flag_message(e, flags)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the run's own handlers are in place
        print(f"{parser.prog}: interrupted before training started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
