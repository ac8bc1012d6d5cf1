"""The names the library knows and the model configuration, in one place.

Free of JAX and torch, so that ``torch_ref``, the command line and the tests read the same
vocabulary from here: norms (with their aliases), stems, shortcuts, init schemes,
optimizers, schedules, compute dtypes. ``ModelConfig`` is exactly the keyword arguments that
``flax_resnet.create_resnet`` and ``torch_ref.create_resnet`` share, validated once, when it
is made, with errors in the library's own words (``ConfigError`` names the field).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

# name -> canonical short name; the canonical names are the values, in this order.
NORM_ALIASES: dict[str, str] = {
    "bn": "bn", "batch": "bn", "batchnorm": "bn",
    "ln": "ln", "layer": "ln", "layernorm": "ln",
    "gn": "gn", "group": "gn", "groupnorm": "gn",
    "in": "in", "instance": "in", "instancenorm": "in",
    "rms": "rms", "rmsnorm": "rms",
}  # fmt: skip
NORMS: tuple[str, ...] = tuple(dict.fromkeys(NORM_ALIASES.values()))
STEMS: tuple[str, ...] = ("imagenet", "cifar")
SHORTCUTS: tuple[str, ...] = ("A", "B")
# Model-level init schemes; "study" is the study's init_weights() (He fan_out convs, Glorot
# with ReLU gain for the classifier, zero biases).
INIT_SCHEMES: tuple[str, ...] = (
    "torch", "study", "torchvision", "kaiming_normal", "kaiming_uniform", "xavier_normal",
    "xavier_uniform", "orthogonal",
)  # fmt: skip
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adam")
# "study": the study's lr / 3 every 20 epochs; "step" is an alias of "multistep".
SCHEDULES: tuple[str, ...] = ("study", "multistep", "cosine", "onecycle", "constant")
SCHEDULE_ALIASES: dict[str, str] = {**{s: s for s in SCHEDULES}, "step": "multistep"}
# Names the study's recipe, init and schedule had before they were called "study" (accepted
# when reading a run written then).
LEGACY_NAMES: dict[str, str] = {"seed": "study"}


class ConfigError(ValueError):
    """A configuration value that is not allowed; ``field`` names it (for the CLI's flags)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_choice(field: str, value: Any, allowed: Sequence[Any], what: str | None = None) -> None:
    if value not in allowed:
        raise ConfigError(
            field,
            f"{what or field} {value!r} is not allowed; choose from {', '.join(map(str, allowed))}",
        )


def check_positive(field: str, value: Any, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value > 0 if strict else value >= 0
    )
    if not ok:
        raise ConfigError(field, f"{field} {value!r} is not allowed; it must be "
                                 f"{'> 0' if strict else '>= 0'}")


def canonical_norm(name: str) -> str:
    """A norm name or alias (``batch``, ``LayerNorm``, ...) as its short name."""
    key = name.lower() if isinstance(name, str) else name
    if key not in NORM_ALIASES:
        raise ConfigError(
            "norm",
            f"norm {name!r} is not allowed; choose from {', '.join(NORMS)} "
            f"(aliases: {', '.join(k for k in NORM_ALIASES if k not in NORMS)})",
        )
    return NORM_ALIASES[key]


def canonical_init(name: str) -> str:
    name = LEGACY_NAMES.get(name, name)
    check_choice("init", name, INIT_SCHEMES, "init scheme")
    return name


def canonical_schedule(name: str) -> str:
    name = LEGACY_NAMES.get(name, name)
    check_choice("schedule", name, tuple(SCHEDULE_ALIASES))
    return SCHEDULE_ALIASES[name]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    block: str  # "basic" or "bottleneck"
    blocks_per_stage: tuple[int, ...]
    stage_channels: tuple[int, ...]
    default_stem: str
    default_shortcut: str


def _he_cifar(depth: int) -> ArchSpec:
    n = (depth - 2) // 6
    return ArchSpec("basic", (n, n, n), (16, 32, 64), "cifar", "A")


_IMAGENET_CHANNELS = (64, 128, 256, 512)
ARCHS: dict[int, ArchSpec] = {
    18: ArchSpec("basic", (2, 2, 2, 2), _IMAGENET_CHANNELS, "imagenet", "B"),
    34: ArchSpec("basic", (3, 4, 6, 3), _IMAGENET_CHANNELS, "imagenet", "B"),
    50: ArchSpec("bottleneck", (3, 4, 6, 3), _IMAGENET_CHANNELS, "imagenet", "B"),
    101: ArchSpec("bottleneck", (3, 4, 23, 3), _IMAGENET_CHANNELS, "imagenet", "B"),
    152: ArchSpec("bottleneck", (3, 8, 36, 3), _IMAGENET_CHANNELS, "imagenet", "B"),
    **{d: _he_cifar(d) for d in (20, 32, 44, 56, 110)},
}
DEPTHS: tuple[int, ...] = tuple(ARCHS)


def stage_widths(depth: int, width: float) -> tuple[int, ...]:
    """Each stage's channel count at the ``width`` multiplier."""
    return tuple(max(1, round(c * width)) for c in ARCHS[depth].stage_channels)


def layer_widths(depth: int, width: float) -> tuple[int, ...]:
    """Every channel count a norm layer of the model sees (stem, inner and expanded)."""
    spec = ARCHS[depth]
    stages = stage_widths(depth, width)
    expanded = tuple(c * 4 for c in stages) if spec.block == "bottleneck" else ()
    return tuple(sorted(set(stages) | set(expanded)))


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its command-line help (``cli``: ``group``, ``choices``, ``flag``,
    or ``flag=None`` for a field without a flag); ``flax_resnet.train_cli`` makes the flags
    from these."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A ResNet: ``create_resnet(**config.kwargs())`` in either framework builds it.

    ``stem`` / ``shortcut`` ``None`` mean the depth's defaults and are resolved when the
    config is made, like every alias (``norm="batch"`` becomes ``"bn"``), so two configs of
    the same model compare equal.
    """

    depth: int = option(34, "ResNet depth", choices=DEPTHS)
    norm: str = option("bn", f"one of {', '.join(NORMS)} (or an alias: batch, layer, group, "
                        "instance, rmsnorm...)")
    stem: str | None = option(None, "imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv",
                              choices=STEMS, none="the depth's")
    num_classes: int = option(10, "classifier outputs (a training run takes its data "
                               "set's)", flag=None)
    width: float = option(1.0, "multiplies every stage's channels")
    shortcut: str | None = option(None, "B: 1x1 conv projection, A: zero-padded identity",
                                   choices=SHORTCUTS + tuple(s.lower() for s in SHORTCUTS),
                                   none="the depth's")
    init: str = option("torch", "weight init scheme", choices=INIT_SCHEMES)
    norm_groups: int = option(32, "groups of norm gn")
    zero_init_residual: bool = option(False, "zero each block's last norm scale")
    in_channels: int = option(3, "input image channels", flag=None)

    def __post_init__(self) -> None:
        check_choice("depth", self.depth, DEPTHS)
        spec = ARCHS[self.depth]
        stem = spec.default_stem if self.stem is None else self.stem
        check_choice("stem", stem, STEMS)
        shortcut = spec.default_shortcut if self.shortcut is None else str(self.shortcut).upper()
        check_choice("shortcut", shortcut, SHORTCUTS)
        norm = canonical_norm(self.norm)
        init = canonical_init(self.init)
        check_positive("width", self.width)
        for field in ("num_classes", "in_channels", "norm_groups"):
            check_integer(field, getattr(self, field), 1)
        if norm == "gn":
            widths = layer_widths(self.depth, self.width)
            bad = [c for c in widths if c % self.norm_groups]
            if bad:
                common = math.gcd(*widths)
                divisors = [g for g in range(1, common + 1) if common % g == 0]
                raise ConfigError(
                    "norm_groups",
                    f"norm_groups {self.norm_groups} does not divide the {bad[0]} channels of "
                    f"a layer of this model (its layers have {', '.join(map(str, widths))}); "
                    f"choose a common divisor: {', '.join(map(str, divisors))}",
                )
        for name, value in (("stem", stem), ("shortcut", shortcut), ("norm", norm),
                            ("init", init)):
            object.__setattr__(self, name, value)

    @property
    def block(self) -> str:
        return ARCHS[self.depth].block

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``create_resnet`` (both frameworks)."""
        return dataclasses.asdict(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        _check_known(cls, d, "model config")
        return cls(**d)


def check_integer(field: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(field, f"{field} {value!r} is not allowed; it must be an integer "
                                 f">= {least}")


def _check_known(cls: type, d: Mapping[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(unknown[0], f"unknown {what} fields {unknown}; known: "
                                      f"{', '.join(sorted(names))}")


MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelConfig))
# Model fields a training run takes from its data set, not from the config it is given.
DATA_MODEL_FIELDS: frozenset[str] = frozenset({"num_classes", "in_channels"})

# float32 and bfloat16 keep params, optimizer state and norm statistics in float32; float64
# is float64 throughout and needs 64-bit JAX (the parity proof trains in it), so the command
# line offers only CLI_DTYPES.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float64")
CLI_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
PARALLEL_MODES: tuple[str, ...] = ("jit", "pmap")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (the run's identity): the ``model`` and
    the data, optimization and augmentation fields. Defaults are the ``study`` recipe (the
    study's PyTorch run); validated when made, like ``ModelConfig``.

    A training run sets ``model.num_classes`` and ``model.in_channels`` from its data set.
    ``flat()`` / ``replace(**fields)`` / ``from_flat`` address every field by its own name
    (``depth`` is ``model.depth``): the names are unique across the two.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    dataset: str = option("cifar10", "cifar10, cifar100, folder:DIR or "
                           "synthetic[:TRAIN:TEST]", group="data")
    dtype: str = option("float32", "compute dtype (params and optimizer state stay float32)",
                         choices=CLI_DTYPES, group="model")
    optimizer: str = option("adamw", "adamw = torch AdamW, sgd = torch SGD (coupled decay), "
                             "adam = torch Adam (coupled decay)", choices=OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(1e-2, "weight decay (torch's semantics per optimizer)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum (SGD)")
    decay_norm_and_bias: bool = option(
        True, "apply weight decay to norm scales and biases too (torch's model.parameters())",
        flag="decay_norm_bias")
    batch_size: int = option(100, "global batch size, split over all devices")
    epochs: int = option(80, "training epochs")
    schedule: str = option(
        "study", "study: lr/3 every 20 epochs; step/multistep: lr*gamma at lr-milestones; "
        "cosine: warmup + cosine (per step); onecycle; constant. Epoch-based ones change at "
        "epoch boundaries", choices=tuple(SCHEDULE_ALIASES))
    warmup_epochs: float = option(0.0, "linear warmup (cosine) / rising phase (onecycle)")
    lr_milestones: tuple[float, ...] = option((0.5, 0.75), "multistep milestones as "
                                               "fractions of the epochs")
    lr_gamma: float = option(0.1, "multistep factor")
    label_smoothing: float = option(0.0, "label smoothing of the training loss")
    augment: bool = option(True, "pad + random crop + horizontal flip on the device",
                            group="data")
    augment_pad: int = option(4, "zero padding before the random crop", group="data")
    seed: int = option(0, "init, data order and augmentation seed")
    parallel: str = option(
        "jit", "jit: global (SyncBN) statistics over the sharded batch; pmap: per-device "
        "BatchNorm statistics and an explicit gradient mean like PyTorch DDP (running stats "
        "from device 0)", choices=PARALLEL_MODES, group="parallelism")
    init_from: str | None = option(
        None, "start from pretrained weights (torch_ref/torchvision .pt/.pth/.safetensors, a "
        "saved model or a run directory; the classifier is replaced if the class count "
        "differs); recorded with the run and used until its first checkpoint exists",
        group="model", metavar="PATH")
    eval_flip: bool = option(False, "also report test accuracy with flip test-time "
                              "augmentation (mean logits of image and mirror) as test_acc_flip",
                              group="data")

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if not isinstance(self.model, ModelConfig):
            raise ConfigError("model", f"model {self.model!r} is not a ModelConfig")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("parallel", self.parallel, PARALLEL_MODES)
        schedule = canonical_schedule(self.schedule)
        check_positive("lr", self.lr)
        check_positive("lr_gamma", self.lr_gamma)
        for name in ("weight_decay", "warmup_epochs"):
            check_positive(name, getattr(self, name), strict=False)
        for name, least in (("batch_size", 1), ("epochs", 1), ("augment_pad", 0)):
            check_integer(name, getattr(self, name), least)
        check_integer("seed", self.seed, 0)
        for name in ("momentum", "label_smoothing"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ConfigError(name, f"{name} {value!r} is not allowed; it must be in [0, 1)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("nesterov", "nesterov needs optimizer sgd and momentum > 0")
        milestones = tuple(self.lr_milestones)
        if any(not 0 < m <= 1 for m in milestones):
            raise ConfigError(
                "lr_milestones",
                f"lr_milestones {','.join(map(str, milestones))} is not allowed; they are "
                "fractions of the epochs, each in (0, 1]",
            )
        if schedule in ("cosine", "onecycle") and self.warmup_epochs >= self.epochs:
            raise ConfigError("warmup_epochs", f"warmup_epochs {self.warmup_epochs} must be "
                                               f"below epochs {self.epochs}")
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "lr_milestones", tuple(float(m) for m in milestones))

    def flat(self) -> dict[str, Any]:
        """Every field by its own name, the model's included."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**self.model.to_dict(), **{k: v for k, v in out.items() if k != "model"}}

    def replace(self, **fields: Any) -> TrainConfig:
        """A copy with ``fields`` (model fields by their own names) changed, validated."""
        return TrainConfig.from_flat({**self.flat(), **fields})

    @classmethod
    def from_flat(cls, fields: Mapping[str, Any]) -> TrainConfig:
        own = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = sorted(set(fields) - own - set(MODEL_FIELDS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown config fields {unknown}; known: "
                                          f"{', '.join(sorted(own | set(MODEL_FIELDS)))}")
        model = ModelConfig(**{k: v for k, v in fields.items() if k in MODEL_FIELDS})
        return cls(model=model, **{k: v for k, v in fields.items() if k in own})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**d, "model": self.model.to_dict(), "lr_milestones": list(self.lr_milestones)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """From ``to_dict()``'s form, or the flat form runs stored before the model was
        nested (and the study's names of then: ``config.LEGACY_NAMES``)."""
        if not isinstance(d, Mapping):
            raise ConfigError("config", f"a run config is a mapping, not {type(d).__name__}")
        d = dict(d)
        if isinstance(d.get("model"), Mapping):
            d = {**d.pop("model"), **d}
        return cls.from_flat(d)


RECIPES: dict[str, dict[str, Any]] = {
    # The study's PyTorch run: ResNet-34, imagenet stem, BatchNorm, AdamW(1e-3) with
    # torch's default weight decay 1e-2 on every parameter, batch 100, 80 epochs, lr / 3
    # every 20 epochs.
    "study": {},
    # He et al. 2015, CIFAR-10 section: ResNet-32 (3x3 stem, option-A shortcuts), SGD 0.1,
    # momentum 0.9, weight decay 1e-4 (coupled, as torch SGD), batch 128, lr / 10 at 50% and
    # 75% of training (32k and 48k of 64k iterations ~ 164 epochs of 50k images).
    "he": {
        "depth": 32, "init": "kaiming_normal", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
        "weight_decay": 1e-4, "batch_size": 128, "epochs": 164, "schedule": "multistep",
        "lr_milestones": (0.5, 0.75), "lr_gamma": 0.1,
    },
    # A modern fast recipe (on the lossy JPEG copy of CIFAR-10 both this and the same recipe
    # in PyTorch end at about 90% after 30 epochs; see docs/training.md): ResNet-18 with a
    # 3x3 stem, SGD Nesterov 0.4 (= 0.1 per 128 images, scaled linearly to 512), 2 warmup
    # epochs then cosine to 0 (per step), label smoothing 0.1, weight decay 5e-4 on conv/dense
    # kernels only, zero-initialised last norm of each block; the test accuracy is also
    # reported with flip test-time augmentation.
    "fast": {
        "depth": 18, "stem": "cifar", "width": 1.0, "init": "torchvision",
        "zero_init_residual": True, "optimizer": "sgd", "lr": 0.4, "momentum": 0.9,
        "nesterov": True, "weight_decay": 5e-4, "decay_norm_and_bias": False,
        "batch_size": 512, "epochs": 30, "schedule": "cosine", "warmup_epochs": 2.0,
        "label_smoothing": 0.1, "eval_flip": True,
    },
}  # fmt: skip


def make_config(recipe: str = "study", **overrides: Any) -> TrainConfig:
    """The recipe's config with ``overrides`` (any field by its own name; ``None`` values
    are ignored), validated.

    When ``epochs`` is overridden but not ``warmup_epochs``, the preset's warmup is scaled
    by the same factor (``fast``: 2 of 30 epochs stays 1/15 of the run).
    """
    recipe = LEGACY_NAMES.get(recipe, recipe)
    check_choice("recipe", recipe, tuple(RECIPES))
    preset = dict(RECIPES[recipe])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "warmup_epochs" in preset and "epochs" in overrides and "warmup_epochs" not in overrides:
        preset["warmup_epochs"] = preset["warmup_epochs"] * overrides["epochs"] / preset["epochs"]
    return TrainConfig.from_flat({**preset, **overrides})
