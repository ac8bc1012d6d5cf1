"""Analytic FLOP count of a ResNet training step, from the model config alone.

Counted: every convolution and the classifier, 2 FLOPs per multiply-accumulate. Not counted:
norms, ReLUs, pooling, the residual adds, the loss and the optimizer (all memory-bound, and
together a few percent of the arithmetic). A training step is taken as 3x the forward pass
(the backward computes a data gradient and a weight gradient, each as costly as the forward),
the usual MFU convention; the stem's data gradient, which no framework computes, is counted too.
"""

from __future__ import annotations

from dataclasses import dataclass

from flax_resnet.config import ARCHS, ModelConfig, stage_widths


@dataclass(frozen=True)
class FlopCount:
    forward_per_image: int
    conv_per_image: int
    fc_per_image: int

    @property
    def train_per_image(self) -> int:
        return 3 * self.forward_per_image


def _out(size: int, kernel: int, stride: int) -> int:
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1


def resnet_flops(
    depth: int,
    *,
    stem: str = "cifar",
    width: float = 1.0,
    shortcut: str | None = None,
    num_classes: int = 10,
    image_size: int = 32,
    in_channels: int = 3,
) -> FlopCount:
    """FLOPs of one image through ``create_resnet(depth, stem=..., width=...)``."""
    cfg = ModelConfig(depth=depth, stem=stem, shortcut=shortcut, width=width)
    spec, stem, shortcut = ARCHS[depth], cfg.stem, cfg.shortcut
    channels = stage_widths(depth, width)
    conv = 0

    def add_conv(h: int, w: int, cin: int, cout: int, k: int, s: int) -> tuple[int, int]:
        nonlocal conv
        ho, wo = _out(h, k, s), _out(w, k, s)
        conv += 2 * ho * wo * cout * cin * k * k
        return ho, wo

    h = w = image_size
    c = channels[0]
    if stem == "imagenet":
        h, w = add_conv(h, w, in_channels, c, 7, 2)
        h, w = _out(h, 3, 2), _out(w, 3, 2)  # max-pool
    else:
        h, w = add_conv(h, w, in_channels, c, 3, 1)
    expansion = 4 if spec.block == "bottleneck" else 1
    for i, (n, out) in enumerate(zip(spec.blocks_per_stage, channels, strict=True)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            cout = out * expansion
            if spec.block == "basic":
                ho, wo = add_conv(h, w, c, out, 3, stride)
                add_conv(ho, wo, out, out, 3, 1)
            else:
                add_conv(h, w, c, out, 1, 1)
                ho, wo = add_conv(h, w, out, out, 3, stride)
                add_conv(ho, wo, out, cout, 1, 1)
            if (stride != 1 or c != cout) and shortcut == "B":
                add_conv(h, w, c, cout, 1, stride)
            h, w, c = ho, wo, cout
    fc = 2 * c * num_classes
    return FlopCount(forward_per_image=conv + fc, conv_per_image=conv, fc_per_image=fc)


# Dense peak TFLOP/s by (device-name substring, compute class). "tf32" is the tensor-core
# rate fp32 convs/matmuls run at when TF32 is allowed; "fp32" the plain CUDA-core rate.
# Vendor datasheets (dense, no sparsity). First match wins, so longer names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIE", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),  # SXM
    ("GH200", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),  # SXM: H100's compute
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
)


def compute_class(precision: str, tf32: bool) -> str:
    if precision == "bf16":
        return "bf16"
    return "tf32" if tf32 else "fp32"


def lookup_peak_tflops(device_name: str, precision: str, tf32: bool) -> float | None:
    """The datasheet peak for this device and precision, or None (CPU, unknown GPU)."""
    name = device_name.upper()
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[compute_class(precision, tf32)]
    return None


# HBM bandwidth in TB/s by device-name substring (datasheets; first match wins). The A100's
# 80 GB parts are faster than its 40 GB ones, hence the longer names first.
PEAK_HBM_TBS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM
    ("GH200 144G", 4.9),  # HBM3e
    ("GH200", 4.0),  # HBM3
    ("H200", 4.8),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIE", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("L40", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
)


def lookup_hbm_tbs(device_name: str) -> float | None:
    """The datasheet memory bandwidth of this device in TB/s, or None (CPU, unknown GPU)."""
    name = device_name.upper()
    for key, tbs in PEAK_HBM_TBS:
        if key.upper() in name:
            return tbs
    return None


@dataclass(frozen=True)
class DeviceRates:
    """A device's datasheet peaks for one precision; None where unknown (CPU, other GPUs)."""

    peak_tflops: float | None
    hbm_tbs: float | None

    @property
    def flops_per_s(self) -> float | None:
        return self.peak_tflops * 1e12 if self.peak_tflops else None

    @property
    def bytes_per_s(self) -> float | None:
        return self.hbm_tbs * 1e12 if self.hbm_tbs else None


def device_rates(device_name: str, precision: str, tf32: bool) -> DeviceRates:
    """Peak FLOP/s for ``precision`` (see ``compute_class``) and HBM bandwidth of a device."""
    return DeviceRates(lookup_peak_tflops(device_name, precision, tf32),
                       lookup_hbm_tbs(device_name))
