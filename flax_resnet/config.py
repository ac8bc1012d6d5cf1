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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A ResNet: ``create_resnet(**config.kwargs())`` in either framework builds it.

    ``stem`` / ``shortcut`` ``None`` mean the depth's defaults and are resolved when the
    config is made, like every alias (``norm="batch"`` becomes ``"bn"``), so two configs of
    the same model compare equal.
    """

    depth: int = 34
    norm: str = "bn"
    stem: str | None = None
    num_classes: int = 10
    width: float = 1.0
    shortcut: str | None = None
    init: str = "torch"
    norm_groups: int = 32
    zero_init_residual: bool = False
    in_channels: int = 3

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
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(field, f"{field} {value!r} is not allowed; it must be an "
                                         "integer >= 1")
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown model config fields {unknown}; known: "
                                          f"{', '.join(sorted(names))}")
        return cls(**d)
