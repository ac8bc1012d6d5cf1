"""Host-side image transforms in uint8, pixel for pixel torchvision's (PIL backend) and timm's.

The same PIL calls in the same order as ``torchvision.transforms`` on a PIL image (the
source of ``torchvision/transforms/functional.py`` and ``_functional_pil.py`` is the spec):

* ``load_rgb`` / ``decode_rgb``: ``torchvision.datasets.folder.pil_loader`` (any mode to RGB);
* ``EvalTransform``: ``Resize(resize_size)`` + ``CenterCrop(size)``, as torchvision's
  reference evaluation and timm's ``transforms_imagenet_eval`` (``crop_pct``) build them;
* ``RandomResizedCropFlip``: ``RandomResizedCrop(size, scale, ratio)`` (its algorithm: ten
  tries, log-uniform aspect ratio, the centre-crop fallback) + ``RandomHorizontalFlip``,
  drawing from a numpy ``Generator`` instead of torch's global RNG, so that the randomness
  of an example is a pure function of ``example_rng(seed, epoch, index)``.

torchvision's ``Weights.transforms()`` (``ImageClassification``) differs: it resizes a
tensor with torch's antialiased interpolation, not PIL; see docs/training.md.
Free of JAX and torch: the loader's worker processes import this.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from flax_resnet.config import INTERPOLATIONS

PIL_FILTERS: dict[str, int] = dict(zip(INTERPOLATIONS, (
    Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
    Image.Resampling.BOX, Image.Resampling.HAMMING, Image.Resampling.LANCZOS), strict=True))
_EXAMPLE_TAG = 0x1A6E  # keeps these streams apart from the other seeded ones of a run


class BadImageError(ValueError):
    """An image file that cannot be decoded; the message names it and the cause."""

    def __init__(self, path: str, cause: BaseException | str):
        self.path = path
        self.cause = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"image {path!r} cannot be decoded ({self.cause})")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses from the loader's worker processes
        return (type(self), (self.path, self.cause))


def _rgb(opened: Any, name: str) -> Image.Image:
    try:
        image = Image.open(opened)
        image.load()  # decode everything now: a truncated file fails here, not later
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(name, e) from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` as torchvision's ``ImageFolder`` loads it: RGB."""
    try:
        with open(path, "rb") as f:
            return _rgb(f, os.fspath(path))
    except OSError as e:  # unreadable file (permissions, vanished)
        raise BadImageError(os.fspath(path), e) from None


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Encoded image bytes (a JPEG/PNG file's content) as ``load_rgb`` would load the file."""
    return _rgb(io.BytesIO(data), name)


def _filter(interpolation: str) -> int:
    try:
        return PIL_FILTERS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation {interpolation!r} is not one of "
                         f"{', '.join(INTERPOLATIONS)}") from None


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bilinear"
                   ) -> Image.Image:
    """torchvision's ``F.resize(image, size)``: the shorter side to ``size``, the longer
    ``int(size · long / short)``; the image itself when it already has that size."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), _filter(interpolation))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``F.center_crop`` on a PIL image (zero padding when it is smaller)."""
    w, h = image.size
    if size > w or size > h:
        left, top = (size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0
        padded = Image.new(image.mode, (max(w, size), max(h, size)), 0)
        padded.paste(image, (left, top))
        image, (w, h) = padded, padded.size
        if (w, h) == (size, size):
            return image
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """``Resize(resize_size, interpolation)`` + ``CenterCrop(size)`` → uint8 HWC."""

    size: int
    resize_size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        _filter(self.interpolation)

    @classmethod
    def from_crop_pct(cls, size: int, crop_pct: float, interpolation: str = "bilinear"
                      ) -> EvalTransform:
        """timm's rule: resize to ``floor(size / crop_pct)``."""
        return cls(size, math.floor(size / crop_pct), interpolation)

    @classmethod
    def from_preprocessing(cls, pre: Any = None, size: int | None = None,
                           resize_size: int | None = None, crop_pct: float | None = None,
                           interpolation: str | None = None) -> EvalTransform:
        """From weights' ``Preprocessing`` (or None); explicit arguments win; defaults 224,
        crop_pct 0.875, bilinear."""
        if size is None:
            size = int(pre.input_size[-1]) if pre is not None and pre.input_size else 224
        interpolation = interpolation or (pre.interpolation if pre is not None and
                                          pre.interpolation else "bilinear")
        if resize_size is not None:
            return cls(size, resize_size, interpolation)
        crop_pct = crop_pct or (pre.crop_pct if pre is not None and pre.crop_pct else 0.875)
        return cls.from_crop_pct(size, crop_pct, interpolation)

    def __call__(self, image: Image.Image, rng: Any = None) -> np.ndarray:
        resized = resize_shorter(image, self.resize_size, self.interpolation)
        return np.asarray(center_crop(resized, self.size), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip:
    """torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip(0.5)`` → uint8 HWC."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    flip: bool = True

    def __post_init__(self) -> None:
        _filter(self.interpolation)

    def crop_box(self, height: int, width: int, rng: np.random.Generator
                 ) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` by ``RandomResizedCrop.get_params``'s algorithm."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = float(width) / float(height)  # the fallback: a central crop
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        top, left, h, w = self.crop_box(image.height, image.width, rng)
        out = image.crop((left, top, left + w, top + h))
        if (h, w) != (self.size, self.size):  # torchvision's resize returns it as it is
            out = out.resize((self.size, self.size), _filter(self.interpolation))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The randomness of example ``index`` of the data set in ``epoch``: a pure function of
    the three, so no worker count, host count or resume point changes a draw."""
    return np.random.default_rng([int(seed), int(epoch), int(index), _EXAMPLE_TAG])
