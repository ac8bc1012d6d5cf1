"""The names the library knows and the model configuration, in one place.

Free of JAX and torch, so that ``torch_ref``, the command line and the tests read the same
vocabulary from here: norms (with their aliases), stems, shortcuts, init schemes,
optimizers, schedules, compute dtypes. ``ModelConfig`` is exactly the keyword arguments that
``flax_resnet.create_resnet`` and ``torch_ref.create_resnet`` share, validated once, when it
is made, with errors in the library's own words (``ConfigError`` names the field).
(``make_config`` of a recipe with bfloat16 compute imports JAX, to ask for its backend.)
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
# imagenet: 7x7/2 conv + 3x3/2 max-pool; cifar: one 3x3/1 conv; deep / deep_tiered: timm's
# ResNet-C/D stem (three 3x3 convs, the first with stride 2, + the max-pool).
STEMS: tuple[str, ...] = ("imagenet", "cifar", "deep", "deep_tiered")
DEEP_STEMS: tuple[str, ...] = ("deep", "deep_tiered")
SHORTCUTS: tuple[str, ...] = ("A", "B")
# Which conv of a bottleneck carries its stride: the 3x3 (ResNet v1.5: torchvision, timm) or
# the first 1x1 (v1, the paper's; Hugging Face's downsample_in_bottleneck=True).
BOTTLENECK_STRIDES: tuple[str, ...] = ("3x3", "1x1")
# Model-level init schemes; "study" is the study's init_weights() (He fan_out convs, Glorot
# with ReLU gain for the classifier, zero biases).
INIT_SCHEMES: tuple[str, ...] = (
    "torch", "study", "torchvision", "kaiming_normal", "kaiming_uniform", "xavier_normal",
    "xavier_uniform", "orthogonal",
)  # fmt: skip
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adam")
# "study": the study's lr / 3 every 20 epochs; "step" is an alias of "multistep". steplr and
# cosine-epoch are torchvision's classification reference's --lr-scheduler steplr and
# cosineannealinglr (with its linear warmup), stepped once per epoch; "cosineannealinglr" is
# an alias of cosine-epoch.
SCHEDULES: tuple[str, ...] = ("study", "multistep", "cosine", "onecycle", "constant", "steplr",
                              "cosine-epoch")
SCHEDULE_ALIASES: dict[str, str] = {**{s: s for s in SCHEDULES}, "step": "multistep",
                                    "cosineannealinglr": "cosine-epoch"}
# The schedules whose lr changes only at epoch boundaries (the others change every update).
PER_EPOCH_SCHEDULES: tuple[str, ...] = ("study", "multistep", "constant", "steplr",
                                        "cosine-epoch")


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
    check_choice("init", name, INIT_SCHEMES, "init scheme")
    return name


def canonical_schedule(name: str) -> str:
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
    26: ArchSpec("bottleneck", (2, 2, 2, 2), _IMAGENET_CHANNELS, "imagenet", "B"),  # timm's
    **{d: _he_cifar(d) for d in (20, 32, 44, 56, 110)},
}
DEPTHS: tuple[int, ...] = tuple(ARCHS)


def stage_widths(depth: int, width: float) -> tuple[int, ...]:
    """Each stage's channel count at the ``width`` multiplier."""
    return tuple(max(1, round(c * width)) for c in ARCHS[depth].stage_channels)


def bottleneck_width(stage_channels: int, groups: int, width_per_group: int) -> int:
    """The channels of a bottleneck's 1x1 reduce and grouped 3x3 conv (torchvision's and
    timm's rule: ``floor(planes * width_per_group / 64) * groups``)."""
    return (stage_channels * width_per_group // 64) * groups


def infer_width(base: Sequence[int], channels: Sequence[int | None]) -> float:
    """The shortest decimal ``w`` with ``max(1, round(b * w)) == c`` for each stage's base
    and actual channels (``None``: unknown), as ``width`` scales them."""
    pairs = [(b, c) for b, c in zip(base, channels, strict=False) if c is not None]
    if not pairs:
        raise ConfigError("width", "cannot infer the width: no stage channels")
    lo = max((c - 0.5) / b for b, c in pairs)
    hi = min((c + 0.5) / b for b, c in pairs)
    for digits in range(1, 8):
        for w in (round((lo + hi) / 2, digits), round(lo, digits), round(hi, digits)):
            if w > 0 and all(max(1, round(b * w)) == c for b, c in pairs):
                return w
    actual, bases = [c for _, c in pairs], [b for b, _ in pairs]
    raise ConfigError("width", f"cannot infer the width: stage channels {actual} are no "
                               f"multiple of {bases}")


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
    stem: str | None = option(None, "imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv; deep "
                              "(ResNet-C/D) and deep_tiered: three 3x3 convs + max-pool, as "
                              "timm's stem_type", choices=STEMS, none="the depth's")
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
    groups: int = option(1, "ResNeXt cardinality: groups of each bottleneck's 3x3 conv")
    width_per_group: int = option(64, "channels per group of each bottleneck's 3x3 conv at "
                                  "64 stage channels (ResNeXt 32x4d: 4; Wide ResNet-50-2: 128)")
    stem_width: int | None = option(
        None, "channels of the stem's convs: the 7x7/3x3 conv's output (Hugging Face's "
        "embedding_size), or the first two 3x3 convs' of a deep stem, whose third gives "
        "twice that (timm's stem_width)", none="the first stage's channels, half for deep")
    avg_down: bool = option(False, "ResNet-D shortcut: 2x2 average pool, then the 1x1 "
                            "projection without stride (timm's avg_down)")
    bottleneck_stride: str = option("3x3", "the bottleneck conv that carries the stride: 3x3 "
                                    "(v1.5, torchvision/timm) or 1x1 (v1, Hugging Face's "
                                    "downsample_in_bottleneck)", choices=BOTTLENECK_STRIDES)
    downsample_in_first_stage: bool = option(
        False, "the first stage has stride 2 too (Hugging Face's downsample_in_first_stage)")

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
        for field in ("num_classes", "in_channels", "norm_groups", "groups", "width_per_group"):
            check_integer(field, getattr(self, field), 1)
        for field in ("zero_init_residual", "avg_down", "downsample_in_first_stage"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(field, f"{field} {getattr(self, field)!r} is not allowed; it "
                                         "must be true or false")
        check_choice("bottleneck_stride", self.bottleneck_stride, BOTTLENECK_STRIDES)
        if self.stem_width is not None:
            check_integer("stem_width", self.stem_width, 4 if stem == "deep_tiered" else 1)
        for name, value in (("stem", stem), ("shortcut", shortcut), ("norm", norm),
                            ("init", init)):
            object.__setattr__(self, name, value)
        if spec.block == "basic":
            deep = ", ".join(str(d) for d, a in ARCHS.items() if a.block == "bottleneck")
            for field, default in (("groups", 1), ("width_per_group", 64),
                                   ("bottleneck_stride", "3x3")):
                if getattr(self, field) != default:
                    raise ConfigError(
                        field, f"{field} {getattr(self, field)!r} applies to bottleneck "
                        f"blocks only; ResNet-{self.depth} has basic blocks (bottleneck "
                        f"depths: {deep})")
        elif min(self.inner_widths()) < 1:
            raise ConfigError("width_per_group", f"width_per_group {self.width_per_group} "
                              f"leaves a bottleneck without channels at width {self.width}")
        if self.avg_down and shortcut != "B":
            raise ConfigError("avg_down", "avg_down is a projection shortcut: it needs "
                                          "shortcut B")
        if norm == "gn":
            widths = self.norm_widths()
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

    def stage_widths(self) -> tuple[int, ...]:
        """Each stage's channel count (a bottleneck stage outputs four times that)."""
        return stage_widths(self.depth, self.width)

    def inner_widths(self) -> tuple[int, ...]:
        """Each stage's bottleneck inner width (the stage width for basic blocks)."""
        if self.block == "basic":
            return self.stage_widths()
        return tuple(bottleneck_width(c, self.groups, self.width_per_group)
                     for c in self.stage_widths())

    def stem_widths(self) -> tuple[int, ...]:
        """The output channels of the stem's convs, the last one's feeding the first stage."""
        first = self.stage_widths()[0]
        if self.stem in DEEP_STEMS:
            sw = self.stem_width or max(1, first // 2)
            return ((3 * (sw // 4), sw, 2 * sw) if self.stem == "deep_tiered"
                    else (sw, sw, 2 * sw))
        return (self.stem_width or first,)

    def norm_widths(self) -> tuple[int, ...]:
        """Every channel count a norm layer of the model sees."""
        widths = set(self.stem_widths()) | set(self.stage_widths()) | set(self.inner_widths())
        if self.block == "bottleneck":
            widths |= {4 * c for c in self.stage_widths()}
        return tuple(sorted(widths))

    def stage_strides(self) -> tuple[int, ...]:
        n = len(ARCHS[self.depth].blocks_per_stage)
        return (2 if self.downsample_in_first_stage else 1,) + (2,) * (n - 1)

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




def _named_models() -> dict[str, dict[str, Any]]:
    plain = {f"resnet{d}": {"depth": d} for d in (18, 26, 34, 50, 101, 152)}
    resnet_d = {"stem": "deep", "stem_width": 32, "avg_down": True}
    timm_d = {f"resnet{d}d": {"depth": d, **resnet_d} for d in (18, 26, 34, 50, 101, 152)}
    tiered = {"stem": "deep_tiered", "stem_width": 32, "avg_down": True}
    return {
        **plain,
        **timm_d,
        "resnet50c": {"depth": 50, "stem": "deep", "stem_width": 32},
        "resnet50s": {"depth": 50, "stem": "deep", "stem_width": 64},
        "resnet26t": {"depth": 26, **tiered},
        "resnet50t": {"depth": 50, **tiered},
        "resnext50_32x4d": {"depth": 50, "groups": 32, "width_per_group": 4},
        "resnext50d_32x4d": {"depth": 50, "groups": 32, "width_per_group": 4, **resnet_d},
        "resnext101_32x4d": {"depth": 101, "groups": 32, "width_per_group": 4},
        "resnext101_32x8d": {"depth": 101, "groups": 32, "width_per_group": 8},
        "resnext101_32x16d": {"depth": 101, "groups": 32, "width_per_group": 16},
        "resnext101_64x4d": {"depth": 101, "groups": 64, "width_per_group": 4},
        "wide_resnet50_2": {"depth": 50, "width_per_group": 128},
        "wide_resnet101_2": {"depth": 101, "width_per_group": 128},
    }


# torchvision's and timm's model names (timm's pretrained tags, "resnet50.a1_in1k", name the
# same architecture as "resnet50") -> ModelConfig fields; 1000 ImageNet classes.
MODEL_NAMES: dict[str, dict[str, Any]] = _named_models()


def named_model(name: str, **fields: Any) -> ModelConfig:
    """The ``ModelConfig`` of a torchvision or timm model name (``resnet50d``,
    ``resnext50_32x4d``, ``resnet50.a1_in1k``...), 1000 classes unless ``fields`` say
    otherwise; ``fields`` that are not None override the name's."""
    base = name.split(".", 1)[0]
    check_choice("model", base, tuple(MODEL_NAMES))
    given = {k: v for k, v in fields.items() if v is not None}
    return ModelConfig(**{"num_classes": 1000, **MODEL_NAMES[base], **given})


MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelConfig))
# Model fields a training run takes from its data set, not from the config it is given.
DATA_MODEL_FIELDS: frozenset[str] = frozenset({"num_classes", "in_channels"})
# The fields that shape the network's layers (what pretrained weights fix): all but the
# data's and the init's.
ARCHITECTURE_FIELDS: tuple[str, ...] = tuple(
    f for f in MODEL_FIELDS if f not in DATA_MODEL_FIELDS | {"init", "zero_init_residual"})

# float32 and bfloat16 keep params, optimizer state and norm statistics in float32; float64
# is float64 throughout and needs 64-bit JAX (the parity proof trains in it), so the command
# line offers only CLI_DTYPES.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float64")
CLI_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
PARALLEL_MODES: tuple[str, ...] = ("jit", "pmap")
# Where a run's input mean/std come from: "auto" takes the init_from weights' preprocessing
# when they carry one (timm's pretrained_cfg, Hugging Face's preprocessor_config.json, the
# ImageNet constants of torchvision/timm/Hugging Face state_dicts), else the data set's.
INPUT_STATS: tuple[str, ...] = ("auto", "data", "weights")
# The training augmentation. pad-crop-flip runs on the device (the study's Pad(4) +
# RandomCrop + RandomHorizontalFlip); random-resized-crop runs on the host per image
# (torchvision's RandomResizedCrop + RandomHorizontalFlip); auto picks pad-crop-flip when
# every training image already has the training size (CIFAR), random-resized-crop otherwise.
AUGMENTS: tuple[str, ...] = ("auto", "pad-crop-flip", "random-resized-crop", "none")
# PIL's resampling filters by torchvision's names.
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "box", "hamming",
                                   "lanczos")


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
    dataset: str = option("cifar10", "cifar10, cifar100, imagenet2012, folder:DIR or "
                           "synthetic[:TRAIN:TEST]", group="data")
    dtype: str = option("float32", "compute dtype (params and optimizer state stay float32); "
                         "a recipe's bfloat16 becomes float32 on a CPU backend",
                         choices=CLI_DTYPES, group="model")
    optimizer: str = option("adamw", "adamw = torch AdamW, sgd = torch SGD (coupled decay), "
                             "adam = torch Adam (coupled decay)", choices=OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate (the imagenet, imagenet-cosine and finetune "
                       "recipes' scales linearly with a batch size given without an lr)")
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
        "cosine: warmup + cosine (per step); onecycle; constant; steplr: lr*gamma every "
        "lr-step-epochs epochs (torchvision's StepLR); cosine-epoch (alias cosineannealinglr): "
        "torchvision's LinearLR warmup from lr*warmup-start-factor + CosineAnnealingLR to 0, "
        "per epoch. All but cosine and onecycle change at epoch boundaries",
        choices=tuple(SCHEDULE_ALIASES))
    warmup_epochs: float = option(0.0, "linear warmup (cosine, cosine-epoch: whole epochs) / "
                                  "rising phase (onecycle)")
    lr_milestones: tuple[float, ...] = option((0.5, 0.75), "multistep milestones as "
                                               "fractions of the epochs")
    lr_gamma: float = option(0.1, "multistep and steplr factor")
    lr_step_epochs: int = option(30, "steplr: multiply the lr by lr-gamma every this many "
                                 "epochs (torchvision's --lr-step-size)")
    warmup_start_factor: float = option(0.01, "cosine-epoch: the first warmup epoch's lr as a "
                                        "fraction of lr (torchvision's --lr-warmup-decay)")
    label_smoothing: float = option(0.0, "label smoothing of the training loss")
    augment: str = option("auto", "training augmentation: pad-crop-flip (on the device), "
                           "random-resized-crop (torchvision's, on the host), none, or auto "
                           "(pad-crop-flip when every image has the training size, else "
                           "random-resized-crop)", choices=AUGMENTS, group="data")
    image_size: int | None = option(None, "training and evaluation crop size of images read "
                                    "from files", group="data",
                                    none="the init_from weights' input size, else 224; "
                                    "in-memory data keeps its own size")
    resize_size: int | None = option(None, "evaluation: resize the shorter side to this, "
                                     "then center-crop image_size", group="data",
                                     none="image_size / crop_pct")
    crop_pct: float | None = option(None, "evaluation: image_size / resize_size (timm's "
                                    "crop_pct)", group="data",
                                    none="the init_from weights', else 0.875")
    interpolation: str | None = option(None, "resampling filter of the resizes",
                                       choices=INTERPOLATIONS, group="data",
                                       none="the init_from weights', else bilinear")
    augment_pad: int = option(4, "zero padding before the random crop", group="data")
    seed: int = option(0, "init, data order and augmentation seed")
    parallel: str = option(
        "jit", "jit: global (SyncBN) statistics over the sharded batch; pmap: per-device "
        "BatchNorm statistics and an explicit gradient mean like PyTorch DDP (running stats "
        "from device 0)", choices=PARALLEL_MODES, group="parallelism")
    init_from: str | None = option(
        None, "start from pretrained weights (torch_ref/torchvision .pt/.pth/.safetensors, a "
        "saved model, a run directory, or a name: hf-hub:ORG/NAME[@REV], "
        "torchvision:MODEL.ENTRY; the classifier is replaced if the class count "
        "differs); recorded with the run and used until its first checkpoint exists",
        group="model", metavar="WEIGHTS")
    reset_classifier: bool = option(
        False, "start from a freshly initialised classifier even when the init_from weights' "
        "has the data's class count (fine-tuning)", group="model")
    input_stats: str = option(
        "auto", "input mean/std: auto (the init_from weights' preprocessing when they carry "
        "one, else the data set's), data, or weights", choices=INPUT_STATS, group="data")
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
        check_choice("input_stats", self.input_stats, INPUT_STATS)
        if isinstance(self.augment, bool):  # run configs written when augment was on/off
            object.__setattr__(self, "augment", "pad-crop-flip" if self.augment else "none")
        check_choice("augment", self.augment, AUGMENTS)
        if self.interpolation is not None:
            check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        for name in ("image_size", "resize_size"):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), 1)
        if self.crop_pct is not None:
            check_positive("crop_pct", self.crop_pct)
            if self.crop_pct > 1:
                raise ConfigError("crop_pct", f"crop_pct {self.crop_pct!r} must be in (0, 1]")
            if self.resize_size is not None:
                raise ConfigError("crop_pct", "give resize_size or crop_pct, not both")
        if self.input_stats == "weights" and not self.init_from:
            raise ConfigError("input_stats", "input_stats weights needs init_from (the weights "
                                             "whose preprocessing to take)")
        schedule = canonical_schedule(self.schedule)
        check_positive("lr", self.lr)
        check_positive("lr_gamma", self.lr_gamma)
        check_integer("lr_step_epochs", self.lr_step_epochs, 1)
        if (isinstance(self.warmup_start_factor, bool)
                or not isinstance(self.warmup_start_factor, (int, float))
                or not 0.0 < self.warmup_start_factor <= 1.0):
            raise ConfigError("warmup_start_factor", f"warmup_start_factor "
                              f"{self.warmup_start_factor!r} is not allowed; it must be in (0, 1]")
        if not isinstance(self.reset_classifier, bool):
            raise ConfigError("reset_classifier", f"reset_classifier {self.reset_classifier!r} "
                                                  "is not allowed; it must be true or false")
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
        if (schedule in ("cosine", "onecycle", "cosine-epoch")
                and self.warmup_epochs >= self.epochs):
            raise ConfigError("warmup_epochs", f"warmup_epochs {self.warmup_epochs} must be "
                                               f"below epochs {self.epochs}")
        if schedule == "cosine-epoch" and self.warmup_epochs != int(self.warmup_epochs):
            raise ConfigError("warmup_epochs", f"warmup_epochs {self.warmup_epochs} is not "
                              "allowed with schedule cosine-epoch, which steps once per epoch: "
                              "give a whole number of epochs")
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
        """From ``to_dict()``'s form: the model's fields under ``"model"``, the rest beside."""
        if not isinstance(d, Mapping):
            raise ConfigError("config", f"a run config is a mapping, not {type(d).__name__}")
        misplaced = sorted(set(d) & set(MODEL_FIELDS))
        if not isinstance(d.get("model"), Mapping) or misplaced:
            found = f"has {misplaced} at its top level" if misplaced else "has no 'model' mapping"
            raise ConfigError(
                "model",
                "a run config holds the model's fields under 'model' (TrainConfig.to_dict()'s "
                f"form); this one {found} (the flat form of runs written before the first "
                "release is not read)",
            )
        _check_known(cls, d, "run config")
        return cls(**d)


# torchvision's classic ImageNet training (references/classification/train.py defaults with
# --model resnet50), shared by the imagenet recipes; bfloat16 compute on GPU/TPU.
_IMAGENET: dict[str, Any] = {
    "depth": 50, "stem": "imagenet", "init": "torchvision", "optimizer": "sgd", "lr": 0.1,
    "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "decay_norm_and_bias": True,
    "batch_size": 256, "epochs": 90, "augment": "random-resized-crop", "image_size": 224,
    "resize_size": 256, "interpolation": "bilinear", "dataset": "imagenet2012",
    "dtype": "bfloat16", "scale_lr_with_batch": True,
}  # fmt: skip

# Recipe keys that are no config fields: "scale_lr_with_batch": the recipe's lr is for its
# batch_size, and make_config scales it linearly when only the batch size is overridden.
RECIPE_OPTIONS: frozenset[str] = frozenset({"scale_lr_with_batch"})

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
    # torchvision's classification reference, the classic recipe behind IMAGENET1K_V1
    # (--lr-scheduler steplr): ResNet-50, torchvision's init, SGD 0.1 per 256 images, momentum
    # 0.9, weight decay 1e-4 (coupled) on every parameter (--norm-weight-decay None), batch
    # 256, 90 epochs, lr / 10 every 30 epochs (StepLR, per epoch: --epochs 120 steps at 30, 60
    # and 90), RandomResizedCrop 224 for training, resize 256 + center crop 224 to evaluate.
    "imagenet": {**_IMAGENET, "schedule": "steplr", "lr_step_epochs": 30, "lr_gamma": 0.1,
                 "label_smoothing": 0.0},
    # The same with torchvision's --lr-scheduler cosineannealinglr --lr-warmup-method linear
    # --lr-warmup-epochs 5 --lr-warmup-decay 0.01 (SequentialLR of LinearLR and
    # CosineAnnealingLR to 0, per epoch; the 5 warmup epochs stay 5 when --epochs changes) and
    # label smoothing 0.1.
    "imagenet-cosine": {**_IMAGENET, "schedule": "cosine-epoch", "warmup_epochs": 5.0,
                        "warmup_start_factor": 0.01, "label_smoothing": 0.1},
    # Fine-tuning pretrained weights (--init-from) on the user's data set (--dataset
    # folder:DIR) with a freshly initialised classifier: SGD 0.01 per 256 images (0.0025 at
    # the batch 64 of one GPU), momentum 0.9, weight decay 1e-4, cosine to 0 over 10 epochs
    # per epoch (no warmup), label smoothing 0.1, RandomResizedCrop at the weights' input
    # size.
    "finetune": {
        "depth": 50, "optimizer": "sgd", "lr": 0.0025, "momentum": 0.9,
        "nesterov": False, "weight_decay": 1e-4, "decay_norm_and_bias": True, "batch_size": 64,
        "epochs": 10, "schedule": "cosine-epoch", "warmup_epochs": 0.0,
        "label_smoothing": 0.1, "augment": "random-resized-crop", "reset_classifier": True,
        "dtype": "bfloat16", "scale_lr_with_batch": True,
    },
}  # fmt: skip


def make_config(recipe: str = "study", **overrides: Any) -> TrainConfig:
    """The recipe's config with ``overrides`` (any field by its own name; ``None`` values
    are ignored), validated.

    * When ``epochs`` is overridden but not ``warmup_epochs``, the preset's warmup is scaled
      by the same factor (``fast``: 2 of 30 epochs stays 1/15 of the run), except for the
      schedules stepped per epoch (``cosine-epoch``): their warmup counts whole epochs, as
      torchvision's ``--lr-warmup-epochs``, and stays.
    * Recipes with ``scale_lr_with_batch`` (``imagenet``, ``imagenet-cosine``,
      ``finetune``): when ``batch_size`` is overridden but not ``lr``, the lr is scaled
      linearly by ``batch_size / the recipe's batch_size`` (``imagenet`` at batch 1024: 0.4).
      The other recipes keep their lr (``fast``'s 0.4 is its own scaling of 0.1 per 128).
    * A recipe's ``bfloat16`` compute dtype, unless ``dtype`` is overridden, becomes
      ``float32`` when JAX's default backend is the CPU (bfloat16 is an accelerator's format;
      on a CPU it is slow and inexact). This asks JAX for its backend, which initialises it:
      in a multi-process run call this after ``jax.distributed.initialize``.
    """
    check_choice("recipe", recipe, tuple(RECIPES))
    preset = dict(RECIPES[recipe])
    options = {k: preset.pop(k) for k in RECIPE_OPTIONS if k in preset}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    schedule = SCHEDULE_ALIASES.get(overrides.get("schedule", preset.get("schedule")), "")
    if ("warmup_epochs" in preset and "epochs" in overrides and "warmup_epochs" not in overrides
            and schedule not in PER_EPOCH_SCHEDULES):
        preset["warmup_epochs"] = preset["warmup_epochs"] * overrides["epochs"] / preset["epochs"]
    if (options.get("scale_lr_with_batch") and "batch_size" in overrides
            and "lr" not in overrides):
        preset["lr"] = preset["lr"] * overrides["batch_size"] / preset["batch_size"]
    if preset.get("dtype") == "bfloat16" and "dtype" not in overrides and _backend() == "cpu":
        preset["dtype"] = "float32"
    return TrainConfig.from_flat({**preset, **overrides})


def _backend() -> str:
    """JAX's default backend ("cpu", "gpu", "tpu"), "cpu" without JAX (this module does
    not need it otherwise, so it is imported only here)."""
    try:
        import jax
    except ImportError:
        return "cpu"
    return jax.default_backend()
