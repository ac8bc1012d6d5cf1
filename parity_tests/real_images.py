"""Trained weights on real images: PyTorch's model against its conversion, image by image.

Random weights (the rest of the parity proof) leave BatchNorm's running statistics at their
initial values and spread the logits evenly; trained weights make the logits confident and
the running statistics matter. Here both frameworks see the same uint8 images, normalised
once in float64 and then cast, and are compared per image:

- float64: flax64 against torch64, relative to the image's largest logit, must be within
  ``harness.F64_RTOL``;
- float32: flax32's error against torch64 must be within ``harness.F32_K`` x PyTorch's own
  float32 error on that image + ``harness.F32_FLOOR`` (the parity proof's float32 claim);
- every image whose float32 argmax differs between the two must be a near-tie: the top-2
  margin of PyTorch's float64 logits below ``NEAR_TIE_K`` x PyTorch's own largest float32
  logit error on that image.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import torch
from flax import nnx

from parity_tests import harness

# A float32 argmax may differ from the other framework's only where float32 rounding alone
# can reorder the top two classes: a float64 margin within 10x PyTorch's own float32 logit
# error on the image (the definition of a near-tie).
NEAR_TIE_K = 10.0


@dataclasses.dataclass(frozen=True)
class Logits:
    torch32: np.ndarray
    torch64: np.ndarray
    flax32: np.ndarray
    flax64: np.ndarray


def normalised(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float64 NHWC, (x / 255 - mean) / std."""
    return (images.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)


def all_logits(torch_model: torch.nn.Module, flax32: nnx.Module, flax64: nnx.Module,
               images: np.ndarray, mean: Sequence[float], std: Sequence[float],
               batch: int = 500) -> Logits:
    """Eval-mode logits of both frameworks in both precisions on ``images`` (uint8 NHWC).

    ``torch_model`` is float32 (a float64 copy is made); ``flax64`` has float64 parameters.
    """
    twins = {torch.float32: torch_model.eval(),
             torch.float64: copy.deepcopy(torch_model).double().eval()}
    flax32.eval()
    flax64.eval()
    fwd = nnx.jit(lambda m, x: m(x))
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("torch32", "torch64", "flax32",
                                                         "flax64")}
    with harness.full_precision(), torch.no_grad():
        for i in range(0, len(images), batch):
            x64 = normalised(images[i:i + batch], mean, std)
            nchw = torch.from_numpy(x64.transpose(0, 3, 1, 2).copy())
            out["torch32"].append(twins[torch.float32](nchw.float()).double().numpy())
            out["torch64"].append(twins[torch.float64](nchw).numpy())
            out["flax32"].append(np.asarray(fwd(flax32, x64.astype(np.float32)),
                                            np.float64))
            with jax.enable_x64(True):
                out["flax64"].append(np.asarray(fwd(flax64, x64)))
    return Logits(**{k: np.concatenate(v) for k, v in out.items()})


def near_ties(logits: Logits) -> np.ndarray:
    """Per image: whether float32 rounding alone may reorder its top two classes (PyTorch's
    float64 top-2 margin below ``NEAR_TIE_K`` x PyTorch's own largest float32 logit error)."""
    top2 = np.sort(logits.torch64, 1)[:, -2:]
    torch_abs = np.abs(logits.torch32 - logits.torch64).max(1)
    return top2[:, 1] - top2[:, 0] < NEAR_TIE_K * torch_abs


def _per_image_rel(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.abs(actual - expected).max(1) / np.abs(expected).max(1)


def compare(logits: Logits, labels: np.ndarray) -> dict[str, Any]:
    """Every figure of the proof, and whether each criterion holds (``ok_*``)."""
    t32, t64, f32, f64 = logits.torch32, logits.torch64, logits.flax32, logits.flax64
    err64 = _per_image_rel(f64, t64)
    torch_err = _per_image_rel(t32, t64)
    flax_err = _per_image_rel(f32, t64)
    bound = harness.F32_K * torch_err + harness.F32_FLOOR
    torch_abs = np.abs(t32 - t64).max(1)
    top2 = np.sort(t64, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    differ = np.flatnonzero(f32.argmax(1) != t32.argmax(1))
    near_tie = near_ties(logits)[differ]
    used = flax_err / bound
    worst = int(np.argmax(used))
    return {
        "images": len(labels),
        "top1": {name: float((x.argmax(1) == labels).mean())
                 for name, x in (("torch32", t32), ("flax32", f32), ("torch64", t64),
                                 ("flax64", f64))},
        "float64_worst": float(err64.max()),
        "float64_bar": harness.F64_RTOL,
        "ok_float64": bool(err64.max() <= harness.F64_RTOL),
        "float32_torch_worst": float(torch_err.max()),
        "float32_flax_worst": float(flax_err.max()),
        "float32_worst_image": worst,
        "float32_worst_image_errors": [float(flax_err[worst]), float(torch_err[worst])],
        # the largest share of its bound an image's flax32 error takes (<= 1 passes)
        "float32_worst_bound_used": float(used.max()),
        "float32_median_ratio": float(np.median(flax_err / np.maximum(torch_err, 1e-300))),
        "float32_bar": f"flax32 <= {harness.F32_K:g} x torch32 + {harness.F32_FLOOR:g}",
        "ok_float32": bool((flax_err <= bound).all()),
        "float32_abs_logit_worst": float(np.abs(f32 - t32).max()),
        "argmax_differ": [
            {"image": int(i), "torch64_margin": float(margin[i]),
             "torch32_abs_error": float(torch_abs[i]), "near_tie": bool(t)}
            for i, t in zip(differ, near_tie, strict=True)],
        "ok_argmax": bool(near_tie.all()),
        "min_margin": float(margin.min()),
    }


def failures(report: dict[str, Any]) -> list[str]:
    """The criteria that fail, in words (empty when the proof holds)."""
    out = []
    if not report["ok_float64"]:
        out.append(f"float64: worst {report['float64_worst']:.3g} > {report['float64_bar']:g}")
    if not report["ok_float32"]:
        f, t = report["float32_worst_image_errors"]
        out.append(f"float32: image {report['float32_worst_image']}: flax32 {f:.3g}, torch32 "
                   f"{t:.3g}; bar {report['float32_bar']}")
    out += [f"argmax differs on image {d['image']}, no near-tie: margin "
            f"{d['torch64_margin']:.3g} >= {NEAR_TIE_K:g} x {d['torch32_abs_error']:.3g}"
            for d in report["argmax_differ"] if not d["near_tie"]]
    return out
