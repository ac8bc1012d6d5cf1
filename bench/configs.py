"""Benchmark configurations: named ``resnet{depth}[w{width}]-b{batch}-{fp32|bf16}``.

Every configuration uses the CIFAR stem, BatchNorm, 10 classes and 32x32 RGB images (the
image size can be changed for smoke tests). ``resnet18w0.25-b32-fp32`` is ResNet-18 at a
quarter of the channels, batch 32, float32.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# a benchmark name's precision -> the compute dtype (flax_resnet.config.DTYPES)
PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16"}
PRECISIONS = tuple(PRECISION_DTYPES)
_NAME = re.compile(r"^resnet(\d+)(?:w([0-9.]+))?-b(\d+)-(fp32|bf16)$")


@dataclass(frozen=True)
class BenchConfig:
    depth: int
    batch: int
    precision: str
    width: float = 1.0
    stem: str = "cifar"
    image_size: int = 32
    num_classes: int = 10

    @property
    def name(self) -> str:
        w = "" if self.width == 1.0 else f"w{self.width:g}"
        return f"resnet{self.depth}{w}-b{self.batch}-{self.precision}"

    @property
    def dtype(self) -> str:
        return PRECISION_DTYPES[self.precision]

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def parse_config(name: str, image_size: int = 32) -> BenchConfig:
    m = _NAME.match(name.strip())
    if not m:
        raise ValueError(
            f"bad config {name!r}: expected resnet<depth>[w<width>]-b<batch>-<fp32|bf16>, "
            f"e.g. resnet18-b512-bf16 or resnet18w0.25-b32-fp32"
        )
    depth, width, batch, precision = m.groups()
    return BenchConfig(
        depth=int(depth),
        batch=int(batch),
        precision=precision,
        width=float(width) if width else 1.0,
        image_size=image_size,
    )


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
}


def parse_configs(spec: str, image_size: int = 32) -> list[BenchConfig]:
    """Comma-separated names and/or presets (all, bf16, fp32, target, cpu, tiny)."""
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
