"""The architecture a state_dict shows: ``ModelConfig`` fields from its keys and shapes.

What the keys cannot show (which conv carries a stride, the GroupNorm family's kind) comes
from a torchvision / timm model name or from the caller's fields; see :func:`infer_config`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flax_resnet.config import ARCHS, bottleneck_width, infer_width, stage_widths
from flax_resnet.namings import REF_BLOCK, ConversionError
from flax_resnet.state_dict import to_torch_ref_names


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def _infer_width(base: tuple[int, ...], channels: list[int | None]) -> float:
    try:
        return infer_width(base, channels)
    except ValueError as err:
        raise ConversionError(f"{err}; set width (--width)") from None


def _infer_width_per_group(planes: list[int], inner: list[int], groups: int) -> int:
    """The group width that gives every stage's bottleneck inner width (64 when it fits)."""
    for wpg in (64, *range(1, 1025)):
        if all(bottleneck_width(p, groups, wpg) == c for p, c in zip(planes, inner, strict=True)):
            return wpg
    raise ConversionError(f"cannot infer width_per_group: bottleneck widths {inner} at stage "
                          f"widths {planes} and {groups} groups; set width_per_group")


def infer_config(
    state_dict: Mapping[str, Any], naming: str = "auto", *, model: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``ModelConfig`` fields that fit ``state_dict``.

    ``model``: a torchvision / timm model name (``config.MODEL_NAMES``) to start from; the
    keys still decide what they show. Inferred: ``depth`` (blocks per stage; BottleNeck
    when ``residual_function.6`` exists), ``stem`` (stem kernel 7 or 3, three convs for a
    deep stem, tiered when its first two differ) and ``stem_width``, ``shortcut`` (B when
    projection shortcuts exist), ``avg_down`` (a pooled projection), ``groups`` and
    ``width_per_group`` (the grouped 3x3's shape), ``norm`` (``bn`` with running statistics,
    ``rms`` with ``.norm.weight``; the GroupNorm family — ``ln``/``gn``/``in`` — looks the
    same and needs ``norm=``), ``num_classes``, ``width`` and ``in_channels``. The keys do
    not show which conv carries a stride (``bottleneck_stride``,
    ``downsample_in_first_stage``): those keep their defaults, torchvision's and timm's,
    unless given. Keyword ``overrides`` that are not None win; the result is not checked
    against every key (loading does that).
    """
    from flax_resnet.config import MODEL_NAMES, named_model
    from flax_resnet.norms import canonical_norm

    config = {k: v for k, v in overrides.items() if v is not None}
    if model is not None:
        try:
            named = named_model(model).to_dict()
        except ValueError as err:
            raise ConversionError(str(err)) from None
        config = {**{k: v for k, v in named.items() if k in MODEL_NAMES[model.split(".")[0]]},
                  **config}
    sd = to_torch_ref_names(state_dict, naming)
    if "conv1.0.weight" not in sd or len(_shape(sd["conv1.0.weight"])) != 4:
        raise ConversionError("cannot infer the architecture: no 4-D stem conv 'conv1.0.weight'")
    stem_out, in_channels, kh, _ = _shape(sd["conv1.0.weight"])
    blocks: dict[int, set[int]] = {}
    for key in sd:
        if m := REF_BLOCK.fullmatch(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(blocks)
    if stages != list(range(2, 2 + len(stages))) or not stages:
        raise ConversionError(f"cannot infer the architecture: stages conv{stages}_x")
    blocks_per_stage = tuple(len(blocks[s]) for s in stages)
    block = "bottleneck" if any(".residual_function.6." in k for k in sd) else "basic"
    if "depth" not in config:
        depths = [
            d for d, a in ARCHS.items()
            if (a.block, a.blocks_per_stage) == (block, blocks_per_stage)
        ]
        if not depths:
            raise ConversionError(
                f"no ResNet depth has {block} blocks {list(blocks_per_stage)} per stage; "
                f"known depths: {', '.join(map(str, ARCHS))}"
            )
        config["depth"] = depths[0]
    deep = "conv1.3.weight" in sd
    if "stem" not in config:
        if deep:
            tiered = _shape(sd["conv1.0.weight"])[0] != _shape(sd["conv1.3.weight"])[0]
            config["stem"] = "deep_tiered" if tiered else "deep"
        else:
            stems = {7: "imagenet", 3: "cifar"}
            if kh not in stems:
                raise ConversionError(
                    f"stem conv kernel {kh}x{kh} is neither 7x7 nor 3x3; set stem (--stem)"
                )
            config["stem"] = stems[kh]
    if "norm" in config:
        config["norm"] = canonical_norm(config["norm"])
    else:
        stem_norm = {k[len("conv1.1."):] for k in sd if k.startswith("conv1.1.")}
        if "running_mean" in stem_norm:
            config["norm"] = "bn"
        elif "norm.weight" in stem_norm:
            config["norm"] = "rms"
        else:
            raise ConversionError(
                "cannot infer the norm: without running statistics ln, gn and in have the "
                "same weights; set norm (--norm): ln, gn or in"
            )
    config.setdefault("shortcut", "B" if any(".shortcut." in k for k in sd) else "A")
    config.setdefault("avg_down", any(re.search(r"\.shortcut\.2\.", k) for k in sd))
    if "num_classes" not in config:  # None: no classifier (a backbone)
        config["num_classes"] = _shape(sd["fc.weight"])[0] if "fc.weight" in sd else None
    bottleneck = ARCHS[config["depth"]].block == "bottleneck"

    def out_channels(stage: int, index: int) -> int | None:
        key = f"conv{stage}_x.0.residual_function.{index}.weight"
        return _shape(sd[key])[0] if key in sd else None

    # a stage's planes: its output over the expansion (the inner width may be grouped/wide)
    planes = [c // 4 if bottleneck and c else c
              for c in (out_channels(s, 6 if bottleneck else 0) for s in stages)]
    if "width" not in config:
        config["width"] = _infer_width(ARCHS[config["depth"]].stage_channels, planes)
    if bottleneck and "groups" not in config and "conv2_x.0.residual_function.3.weight" in sd:
        out, per_group = _shape(sd["conv2_x.0.residual_function.3.weight"])[:2]
        config["groups"] = out // per_group
    if bottleneck and "width_per_group" not in config and None not in planes:
        inner = [out_channels(s, 3) for s in stages]
        if None not in inner:
            config["width_per_group"] = _infer_width_per_group(planes, inner,
                                                               config.get("groups", 1))
    if "stem_width" not in config:
        first = stage_widths(config["depth"], config["width"])[0]
        stem_width = _shape(sd["conv1.3.weight"])[0] if deep else stem_out
        default = max(1, first // 2) if deep else first
        config["stem_width"] = None if stem_width == default else stem_width
    config.setdefault("in_channels", in_channels)
    for field, default in (("avg_down", False), ("stem_width", None), ("groups", 1),
                           ("width_per_group", 64)):  # said only where they differ
        if overrides.get(field) is None and config.get(field, default) == default:
            config.pop(field, None)
    return config
