"""The on-device augmentation both sides run inside their timed step.

The input is a uint8 NHWC batch already on the device; the augmentation is the seed's
``Pad(4) + RandomCrop(32) + RandomHorizontalFlip`` followed by ``(x/255 - mean) / std`` into
float32, after which each model's precision policy casts (Flax ``dtype=bf16``; torch autocast).

* Flax: ``flax_resnet.data.augment`` + ``flax_resnet.data.normalize`` inside
  ``flax_resnet.training.make_train_step`` (the product's own step; ``normalize`` casts to
  the compute dtype).
* torch: ``torch_augment`` below, the same algorithm in torch ops on the GPU tensor (pad,
  per-sample crop as one gather, flip folded into the gather's column index, normalize),
  producing an NCHW tensor in channels_last memory (a permuted view of NHWC).
"""

from __future__ import annotations

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
PAD = 4


def normalize_coeffs(
    mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, shift) with ``x_u8 * scale + shift == (x/255 - mean) / std``."""
    scale = tuple(1.0 / (255.0 * s) for s in std)
    shift = tuple(-m / s for m, s in zip(mean, std, strict=True))
    return scale, shift


def torch_augment(images_u8, scale, shift):
    """torch side: uint8 NHWC (device) -> float32 NCHW in channels_last memory."""
    import torch
    import torch.nn.functional as F

    n, h, w, _ = images_u8.shape
    dev = images_u8.device
    off = torch.randint(0, 2 * PAD + 1, (n, 2), device=dev)
    flip = torch.rand(n, device=dev) < 0.5
    padded = F.pad(images_u8, (0, 0, PAD, PAD, PAD, PAD))  # (N, H+2p, W+2p, C)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = off[:, :1] + ar_h
    cols = off[:, 1:] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)
    idx = torch.arange(n, device=dev)[:, None, None]
    x = padded[idx, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    x = x.float() * scale + shift
    return x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory == channels_last
