"""How weights expect their inputs, and that metadata as timm and Hugging Face store it.

``Preprocessing`` travels with converted weights (``preprocessing.json`` of a Flax checkpoint
or a ``train.py`` run, timm's ``pretrained_cfg``, Hugging Face's ``preprocessor_config.json``).
Free of JAX and torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL's resampling codes, as Hugging Face's image processors store them.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How the weights expect their inputs: ``(x / 255 - mean) / std`` per channel, at
    ``input_size`` (C, H, W) after resizing with ``interpolation`` and a ``crop_pct`` center
    crop; ``source`` says where this came from. ``resize_size``: the shorter side before the
    crop where the weights state it as a number (torchvision's entries: 232 for 224), which
    wins over ``crop_pct`` (a ratio can floor one pixel short)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    source: str = ""
    resize_size: int | None = None  # last: callers pass the fields above by position

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("mean", "std", "input_size"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def imagenet(source: str) -> Preprocessing:
    """torchvision's ImageNet preprocessing (mean/std, 224 after a 256 resize, bilinear)."""
    return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224), "bilinear", 0.875, source)


def from_timm_cfg(cfg: Mapping[str, Any], source: str) -> Preprocessing:
    """From timm's ``pretrained_cfg``."""
    return Preprocessing(
        tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
        tuple(cfg["input_size"]) if cfg.get("input_size") else None,
        cfg.get("interpolation"), cfg.get("crop_pct"), source)


def to_timm_cfg(pre: Preprocessing) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": list(pre.mean), "std": list(pre.std)}
    if pre.input_size:
        out["input_size"] = list(pre.input_size)
    if pre.interpolation:
        out["interpolation"] = pre.interpolation
    if pre.crop_pct:
        out["crop_pct"] = pre.crop_pct
    return out


def from_hf_preprocessor(d: Mapping[str, Any], source: str) -> Preprocessing:
    """From a Hugging Face ``preprocessor_config.json``."""
    size = d.get("size") or {}
    side = size.get("shortest_edge") or size.get("height") if isinstance(size, Mapping) else size
    channels = len(d.get("image_mean") or IMAGENET_MEAN)
    return Preprocessing(
        tuple(d.get("image_mean") or IMAGENET_MEAN), tuple(d.get("image_std") or IMAGENET_STD),
        (channels, int(side), int(side)) if side else None,
        _PIL_RESAMPLE.get(d.get("resample")), d.get("crop_pct"), source)


def to_hf_preprocessor(pre: Preprocessing) -> dict[str, Any]:
    resample = {v: k for k, v in _PIL_RESAMPLE.items()}.get(pre.interpolation or "", 2)
    side = pre.input_size[-1] if pre.input_size else 224
    return {
        "image_processor_type": "ConvNextImageProcessor", "do_resize": True,
        "size": {"shortest_edge": side}, "crop_pct": pre.crop_pct or 0.875,
        "resample": resample, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std),
    }
