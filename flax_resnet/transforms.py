"""Host-side image transforms in uint8, pixel for pixel torchvision's (PIL backend) and timm's.

The same PIL calls in the same order as ``torchvision.transforms`` on a PIL image (the
source of ``torchvision/transforms/functional.py`` and ``_functional_pil.py`` is the spec):

* ``load_rgb`` / ``decode_rgb``: ``torchvision.datasets.folder.pil_loader`` (any mode to RGB;
  16-bit grey saturates at 255 there as here);
* ``EvalTransform``: ``Resize(resize_size)`` + ``CenterCrop(size)``, as torchvision's
  reference evaluation and timm's ``transforms_imagenet_eval`` (``crop_pct``) build them;
* ``RandomResizedCropFlip``: ``RandomResizedCrop(size, scale, ratio)`` (its algorithm: ten
  tries, log-uniform aspect ratio, the centre-crop fallback) + ``RandomHorizontalFlip``,
  drawing from a numpy ``Generator`` instead of torch's global RNG, so that the randomness
  of an example is a pure function of ``example_rng(seed, epoch, index)``.

torchvision's ``Weights.transforms()`` (``ImageClassification``) gives these pixels on a PIL
image, but resizes a *tensor* (``read_image``'s) with torch's antialiased interpolation,
whose pixels differ from these by a level or two; see docs/training.md.
Free of JAX and torch: the loader's worker processes import this.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from flax_resnet.config import INTERPOLATIONS

# torchvision's ``pil_modes_mapping``, by the names the config accepts.
PIL_FILTERS: dict[str, Image.Resampling] = {
    name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}
_EXAMPLE_TAG = 0x1A6E  # keeps these streams apart from the other seeded ones of a run
_RRC_TRIES = 10  # torchvision's RandomResizedCrop.get_params


class BadImageError(ValueError):
    """An image file that cannot be decoded; the message names it and the cause, so that
    the run can say which file to replace (or skip it)."""

    def __init__(self, path: str, cause: BaseException | str):
        self.path = path
        self.cause = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"image {path!r} cannot be decoded ({self.cause})")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses from the loader's worker processes
        return (type(self), (self.path, self.cause))


def _rgb(opened: Any, name: str) -> Image.Image:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With it PIL fills in a truncated file's missing part and says nothing: a damaged data set
        # would train silently. Some libraries set it process-wide (tfds' thumbnails).
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so "
                           f"truncated images (e.g. {name!r}) would be silently padded; set it "
                           "back to False")
    try:
        image = Image.open(opened)
        image.load()  # decode everything now: a truncated file fails here, not later
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(name, e) from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` as torchvision's ``ImageFolder`` loads it (``pil_loader``):
    any mode converted to RGB, so that our pixels start where torchvision's do."""
    try:
        with open(path, "rb") as f:
            return _rgb(f, os.fspath(path))
    except OSError as e:  # unreadable file (permissions, vanished)
        raise BadImageError(os.fspath(path), e) from None


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Encoded image bytes (a JPEG/PNG file's content, as tfds holds them) as ``load_rgb``
    would load the file; ``name`` is what a ``BadImageError`` names."""
    return _rgb(io.BytesIO(data), name)


def _filter(interpolation: str) -> Image.Resampling:
    try:
        return PIL_FILTERS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation {interpolation!r} is not one of "
                         f"{', '.join(INTERPOLATIONS)}") from None


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} {value!r} must be a positive integer")


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bilinear"
                   ) -> Image.Image:
    """torchvision's ``F.resize(image, size)`` with an int size: the shorter side to ``size``,
    the longer ``int(size * long / short)`` (its ``_compute_resized_output_size``); the
    image itself when it already has that size, as torchvision returns it."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), _filter(interpolation))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``F.center_crop`` on a PIL image: its rounding of the offsets, and its
    zero padding (``ImageOps.expand``) when the image is smaller than the crop."""
    w, h = image.size
    if size > w or size > h:
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        image = ImageOps.expand(image, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2,
                                               (pad_h + 1) // 2), fill=0)
        w, h = image.size
        if (w, h) == (size, size):
            return image
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """``Resize(resize_size, interpolation)`` + ``CenterCrop(size)`` → uint8 HWC: the
    evaluation of torchvision's reference scripts and of timm (crop_mode "center")."""

    size: int
    resize_size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        _positive("size", self.size)
        _positive("resize_size", self.resize_size)
        _filter(self.interpolation)

    @classmethod
    def from_crop_pct(cls, size: int, crop_pct: float, interpolation: str = "bilinear"
                      ) -> EvalTransform:
        """timm's rule, ``resize_size = floor(size / crop_pct)``, float artefacts included
        (``floor(224 / (224 / 354))`` is 353): timm's pixels. When the resize is known as
        a number (torchvision's V2 weights: 232 for 224), give it, not a ratio."""
        if not crop_pct > 0:
            raise ValueError(f"crop_pct {crop_pct!r} must be > 0")
        return cls(size, math.floor(size / crop_pct), interpolation)

    @classmethod
    def from_preprocessing(cls, pre: Any = None, size: int | None = None,
                           resize_size: int | None = None, crop_pct: float | None = None,
                           interpolation: str | None = None) -> EvalTransform:
        """From weights' metadata (a ``flax_resnet.preprocessing.Preprocessing`` or None);
        explicit arguments win over it, then 224, crop_pct 0.875 and bilinear. An exact
        ``resize_size`` (an argument, or a ``resize_size`` the metadata may carry) wins
        over any ``crop_pct``, since a ratio can floor one pixel short (see
        ``from_crop_pct``)."""
        input_size = getattr(pre, "input_size", None)
        if size is None and input_size:
            if len(input_size) >= 2 and input_size[-2] != input_size[-1]:
                raise ValueError(f"input_size {tuple(input_size)!r} is not square; this "
                                 "evaluation crops squares (give size)")
            size = int(input_size[-1])
        size = 224 if size is None else size
        interpolation = interpolation or getattr(pre, "interpolation", None) or "bilinear"
        if resize_size is None and crop_pct is None:
            resize_size = getattr(pre, "resize_size", None)
        if resize_size is not None:
            return cls(size, int(resize_size), interpolation)
        crop_pct = crop_pct or getattr(pre, "crop_pct", None) or 0.875
        return cls.from_crop_pct(size, crop_pct, interpolation)

    def __call__(self, image: Image.Image) -> np.ndarray:
        resized = resize_shorter(image, self.resize_size, self.interpolation)
        return np.asarray(center_crop(resized, self.size), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip:
    """torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip(0.5)`` → uint8 HWC, the
    randomness drawn from the ``Generator`` given to each call."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    flip: bool = True

    def __post_init__(self) -> None:
        _positive("size", self.size)
        _filter(self.interpolation)
        if not 0 <= self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale {self.scale!r} must be (min, max) with 0 <= min <= max")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio {self.ratio!r} must be (min, max) with 0 < min <= max")

    def crop_box(self, height: int, width: int, rng: np.random.Generator
                 ) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` by ``RandomResizedCrop.get_params``'s algorithm: the same
        law as torchvision's boxes, from numpy's draws instead of torch's."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(_RRC_TRIES):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = float(width) / float(height)  # the fallback: a central crop
        if in_ratio < self.ratio[0]:
            w = width
            h = int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h = height
            w = int(round(h * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        top, left, h, w = self.crop_box(image.height, image.width, rng)
        # F.resized_crop: crop, then resize; resize(box=...) would read pixels outside it.
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
