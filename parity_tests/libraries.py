"""The PyTorch libraries' ResNets the converter reads and writes, built and saved as each
library does, and compared with their ``flax_resnet`` conversions.

One list of cases (``CASES``) serves the table of ``docs/interop.md``
(``scripts/interop_report.py``) and, less ``REPORT_ONLY``, the tests
(``test_libraries.py``). Every model gets random weights and random BatchNorm statistics and
affine parameters (``harness.randomize_norms_``); widths are reduced where the library's
constructor allows it (timm's ``channels``/``stem_width``, Hugging Face's
``hidden_sizes``/``embedding_size``; torchvision's ResNeXt / Wide ResNet are full size).
Inputs are 2 x 3 x 33 x 35: odd sizes at every stride-2 step, so avg-down's ceil-mode
pooling sees a partial window.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from flax_resnet import convert
from parity_tests import harness as H

INPUT_SHAPE = (2, 3, 33, 35)
NUM_CLASSES = 7
TIMM_SMALL = {"channels": (8, 16, 32, 64), "stem_width": 8}
TIMM_GROUPED = {"channels": (16, 32, 64, 128), "stem_width": 8}  # 32 groups need >= 16


@dataclasses.dataclass(frozen=True)
class Case:
    source: str  # "torchvision", "timm" or "hf"
    name: str  # the library's model name
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    saved_as: str = "file"  # "file": torch.save(state_dict); "dir": the library's directory

    @property
    def label(self) -> str:
        return f"{self.source}-{self.name}-{self.saved_as}"


def _timm(name: str, small: dict[str, Any], saved_as: str = "file") -> Case:
    return Case("timm", name, dict(small), saved_as)


def _hf(name: str, layer_type: str, depths: tuple[int, ...], **extra: Any) -> Case:
    hidden = (8, 16, 32, 64) if layer_type == "basic" else (32, 64, 128, 256)
    return Case("hf", name, {"layer_type": layer_type, "depths": list(depths),
                             "hidden_sizes": list(hidden), "embedding_size": 8, **extra}, "dir")


CASES: tuple[Case, ...] = (
    Case("torchvision", "resnext50_32x4d"),
    Case("torchvision", "resnext101_32x8d"),
    Case("torchvision", "resnext101_64x4d"),
    Case("torchvision", "wide_resnet50_2"),
    Case("torchvision", "wide_resnet101_2"),
    *(_timm(f"resnet{d}d", TIMM_SMALL, "dir" if d in (18, 50) else "file")
      for d in (18, 26, 34, 50, 101, 152)),
    _timm("resnet50c", TIMM_SMALL),
    _timm("resnet50s", {"channels": (8, 16, 32, 64), "stem_width": 16}),
    _timm("resnet26t", TIMM_SMALL),
    _timm("resnet50t", TIMM_SMALL, "dir"),
    _timm("resnext50_32x4d", TIMM_GROUPED),
    _timm("resnext50d_32x4d", TIMM_GROUPED, "dir"),
    _hf("resnet-18", "basic", (2, 2, 2, 2)),
    _hf("resnet-34", "basic", (3, 4, 6, 3)),
    _hf("resnet-50", "bottleneck", (3, 4, 6, 3)),
    _hf("resnet-101", "bottleneck", (3, 4, 23, 3)),
    _hf("resnet-152", "bottleneck", (3, 8, 36, 3)),
    _hf("resnet-50-v1", "bottleneck", (3, 4, 6, 3), downsample_in_bottleneck=True,
        downsample_in_first_stage=True),
)
# Run by the interop report, not by the CI suite: full-size torchvision models (its
# constructors cannot be shrunk) that add nothing the suite's other cases lack (torchvision's
# depth-101 naming: resnext101_64x4d; width_per_group read from the shapes: wide_resnet50_2;
# 32 groups: resnext50_32x4d) but take about 2 minutes of its 2-core budget.
REPORT_ONLY: frozenset[str] = frozenset({"resnext101_32x8d", "wide_resnet101_2"})
SUITE_CASES: tuple[Case, ...] = tuple(c for c in CASES if c.name not in REPORT_ONLY)


def build(case: Case, seed: int = 0) -> nn.Module:
    """The library's model with random weights, norms randomised, in eval mode."""
    torch.manual_seed(seed)
    if case.source == "torchvision":
        import torchvision

        model = getattr(torchvision.models, case.name)(num_classes=NUM_CLASSES)
    elif case.source == "timm":
        import timm

        model = timm.create_model(case.name, num_classes=NUM_CLASSES, **case.kwargs)
    else:
        from transformers import ResNetConfig, ResNetForImageClassification

        model = ResNetForImageClassification(ResNetConfig(num_labels=NUM_CLASSES, **case.kwargs))
    H.randomize_norms_(model, seed + 1)
    return model.eval()


def save(case: Case, model: nn.Module, directory: str) -> str:
    """Save ``model`` as its library saves it; returns the path to convert."""
    if case.saved_as == "file":
        path = os.path.join(directory, f"{case.name}.pth")
        torch.save(model.state_dict(), path)
        return path
    path = os.path.join(directory, case.name)
    if case.source == "timm":
        from timm.models import save_for_hf

        save_for_hf(model, path, safe_serialization=True)
    else:
        model.save_pretrained(path)
    return path


def torch_outputs(case: Case, model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Logits and stage features (NCHW) of the library's model, in the input's dtype."""
    feats: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if case.source == "hf":
            out = model(torch.from_numpy(x), output_hidden_states=True)
            logits = out.logits
            names = ["stem", *(f"stage{i + 1}" for i in range(len(out.hidden_states) - 1))]
            feats = dict(zip(names, out.hidden_states, strict=True))
        else:
            hooks = [getattr(model, m).register_forward_hook(
                lambda _m, _i, o, n=n: feats.__setitem__(n, o))
                for m, n in (("layer1", "stage1"), ("layer2", "stage2"), ("layer3", "stage3"),
                             ("layer4", "stage4"), ("maxpool", "stem"),
                             ("act1" if case.source == "timm" else "relu", "stem_pre_pool"))]
            logits = model(torch.from_numpy(x))
            for h in hooks:
                h.remove()
    return {"logits": logits.numpy(), **{k: v.numpy() for k, v in feats.items()}}


def flax_outputs(model: Any, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    xs = jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    feats = model.features(xs)
    out = {"logits": np.asarray(model(xs))}
    out.update({n: np.asarray(feats[n]).transpose(0, 3, 1, 2) for n in names})
    return out


@dataclasses.dataclass
class Result:
    case: Case
    f64: dict[str, float]  # flax64 vs torch64 per output
    flax32: dict[str, float]  # flax32 vs torch64
    torch32: dict[str, float]  # torch32 vs torch64
    config: dict[str, Any]
    seconds: float

    def failures(self) -> list[str]:
        out = [f"float64 {k}: rel err {v:.3g} > {H.F64_RTOL:g}" for k, v in self.f64.items()
               if not v <= H.F64_RTOL]
        out += [f"float32 {k}: flax err {v:.3g} > {H.F32_K:g} x torch err "
                f"{self.torch32[k]:.3g} + {H.F32_FLOOR:g}" for k, v in self.flax32.items()
                if not H.float32_ok(v, self.torch32[k])]
        return out


def compare(case: Case, src: str, model: nn.Module,
            load32: Callable[[], tuple[Any, dict[str, Any]]] | None = None) -> Result:
    """Convert ``src`` (float64 through ``convert.load``; float32 through ``load32``, by
    default the same) and compare logits and features with the library's model."""
    start = time.perf_counter()
    x32 = np.random.default_rng(7).standard_normal(INPUT_SHAPE).astype(np.float32)
    with H.full_precision():
        t32 = torch_outputs(case, model, x32)
        t64 = torch_outputs(case, model.double(), x32.astype(np.float64))
        model.float()
        names = [k for k in t64 if k != "logits"]
        flax32, config = (load32 or (lambda: convert.load(src)))()
        flax32.eval()
        f32 = flax_outputs(flax32, x32, names)
        with jax.enable_x64(True):
            flax64, _ = convert.load(src, dtype=jnp.float64)
            flax64.eval()
            f64 = flax_outputs(flax64, x32.astype(np.float64), names)
    return Result(
        case,
        f64={k: H.rel_err(f64[k], t64[k]) for k in t64},
        flax32={k: H.rel_err(f32[k], t64[k]) for k in t64},
        torch32={k: H.rel_err(t32[k], t64[k]) for k in t64},
        config=config,
        seconds=time.perf_counter() - start,
    )
