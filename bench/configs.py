"""Benchmark configurations: named ``resnet{depth}[w{width}]-b{batch}-{fp32|bf16}[-in{size}]``.

Without a suffix: the CIFAR stem, BatchNorm, 10 classes and 32x32 RGB images (the image size
can be changed for smoke tests), and the step augments on the device (pad-crop-flip), as
``train.py`` does for CIFAR. ``resnet18w0.25-b32-fp32`` is ResNet-18 at a quarter of the
channels, batch 32, float32.

``-in{size}``: ImageNet's shape of the problem: the ImageNet stem (7x7/2 conv + max-pool),
``size`` x ``size`` images, 1000 classes, ImageNet's mean/std. Its random-resized crop and
flip happen on the host in the real pipeline (``flax_resnet.pipeline``; torchvision's
``RandomResizedCrop`` in a DataLoader), so the timed step of such a config normalises only,
on both sides alike. ``resnet50-b256-bf16-in224`` is the usual ImageNet training step.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# a benchmark name's precision -> the compute dtype (flax_resnet.config.DTYPES)
PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16"}
PRECISIONS = tuple(PRECISION_DTYPES)
_NAME = re.compile(r"^resnet(\d+)(?:w([0-9.]+))?-b(\d+)-(fp32|bf16)(?:-in(\d+))?$")
IMAGENET_CLASSES = 1000
# ImageNet's images per epoch: the schedule's steps per epoch of an -in config's step.
IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class BenchConfig:
    depth: int
    batch: int
    precision: str
    width: float = 1.0
    stem: str = "cifar"
    image_size: int = 32
    num_classes: int = 10
    imagenet: bool = False  # -in{size}: ImageNet stem and classes, the crop made on the host

    @property
    def name(self) -> str:
        w = "" if self.width == 1.0 else f"w{self.width:g}"
        suffix = f"-in{self.image_size}" if self.imagenet else ""
        return f"resnet{self.depth}{w}-b{self.batch}-{self.precision}{suffix}"

    @property
    def dtype(self) -> str:
        return PRECISION_DTYPES[self.precision]

    @property
    def device_augment(self) -> bool:
        """Whether the timed step crops and flips on the device (CIFAR's pad-crop-flip);
        else it only normalises, the crop being the host pipeline's."""
        return not self.imagenet

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The input mean/std the step normalises with (their values change constants only)."""
        from bench.augment import CIFAR_MEAN, CIFAR_STD
        from flax_resnet.preprocessing import IMAGENET_MEAN, IMAGENET_STD  # free of JAX

        if self.imagenet:
            return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        return CIFAR_MEAN, CIFAR_STD

    @property
    def train_images(self) -> int:
        """Images per epoch for the step's schedule: CIFAR's 50,000 or ImageNet's."""
        return IMAGENET_TRAIN_IMAGES if self.imagenet else 50_000

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def parse_config(name: str, image_size: int = 32) -> BenchConfig:
    """The config of ``name``; ``image_size`` is the size of a CIFAR-stem config (an ``-in``
    suffix names its own)."""
    m = _NAME.match(name.strip())
    if not m:
        raise ValueError(
            f"bad config {name!r}: expected resnet<depth>[w<width>]-b<batch>-<fp32|bf16>"
            "[-in<size>], e.g. resnet18-b512-bf16, resnet18w0.25-b32-fp32 or "
            f"resnet50-b256-bf16-in224; presets: {', '.join(PRESETS)}"
        )
    depth, width, batch, precision, in_size = m.groups()
    common = dict(depth=int(depth), batch=int(batch), precision=precision,
                  width=float(width) if width else 1.0)
    if in_size is None:
        return BenchConfig(**common, image_size=image_size)
    if int(in_size) < 32:
        # the ImageNet stem and four stages halve the image five times
        raise ValueError(f"bad config {name!r}: -in{in_size} is too small; at least -in32")
    return BenchConfig(**common, stem="imagenet", image_size=int(in_size),
                       num_classes=IMAGENET_CLASSES, imagenet=True)


# The matrix, most important first (the GPU target is the first one).
FULL = tuple(
    f"resnet{d}-b{b}-{p}"
    for p in ("bf16", "fp32")
    for d in (18, 50, 32)
    for b in (512, 128)
)
PRESETS: dict[str, tuple[str, ...]] = {
    "all": FULL,
    "bf16": tuple(c for c in FULL if c.endswith("bf16")),
    "fp32": tuple(c for c in FULL if c.endswith("fp32")),
    "target": ("resnet18-b512-bf16",),
    "cpu": ("resnet18w0.25-b32-fp32",),
    "tiny": ("resnet18w0.125-b8-fp32",),
    # ImageNet's step (ImageNet stem, 224x224, 1000 classes, the crop on the host)
    "imagenet": ("resnet50-b256-bf16-in224",),
    "imagenet_tiny": ("resnet18w0.125-b8-fp32-in64",),
}


def parse_configs(spec: str, image_size: int = 32) -> list[BenchConfig]:
    """Comma-separated names and/or presets (all, bf16, fp32, target, cpu, tiny, imagenet,
    imagenet_tiny)."""
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        for name in PRESETS.get(part, (part,)):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("no configs selected")
    return [parse_config(n, image_size) for n in names]
