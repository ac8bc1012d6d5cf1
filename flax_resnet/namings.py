"""The state_dict key names of the PyTorch ResNets people hold, mapped to ``torch_ref``'s.

``flax_resnet``'s module tree is ``torch_ref``'s, so every naming is one map from
``torch_ref`` keys. The namings:

    torch_ref                          torchvision / timm       Hugging Face (hf)
    conv1.0.*                          conv1.*                  embedder.embedder.convolution.*
    conv1.1.*                          bn1.*                    embedder.embedder.normalization.*
    conv1.{0,1,3,4,6}.* (deep stem)    the same (timm)          -
    conv1.7.* (deep stem)              bn1.* (timm)             -
    conv{s}_x.{j}.                     layer{s-1}.{j}.          encoder.stages.{s-2}.layers.{j}.
      residual_function.{i}.*            conv|bn{i//3+1}.*        layer.{i//3}.convolution|...
      shortcut.{n}.*                     downsample.{n}.*         shortcut.convolution|...
    fc.*                               fc.*                     classifier.1.*

(``convolution|...``: ``convolution`` for a conv, ``normalization`` for its norm.
``residual_function`` holds conv, norm, ReLU, conv, norm[, ReLU, conv, norm]: the ReLUs sit at
2 and 5, so one rule serves both blocks. timm's avg-down shortcut is pool, conv, norm: its
``downsample.1/2`` are ``shortcut.1/2``.) Hugging Face's ``ResNetForImageClassification``
prefixes the backbone with ``resnet.``; ``ResNetModel`` and ``ResNetBackbone`` do not and
have no classifier.

torchvision's names are timm's for the architectures torchvision has (no deep stem, no
avg-down); :func:`detect_naming` calls such a file ``torchvision``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NAMINGS: tuple[str, ...] = ("torch_ref", "torchvision", "timm", "hf")
HF_PREFIX = "resnet."


class ConversionError(ValueError):
    """Weights that do not fit: missing, unexpected or mis-shaped keys, a key with no name in
    a naming, or a ResNet variant the library does not build."""



_REF_STEM = re.compile(r"conv1\.(\d+)\.(.+)")
REF_BLOCK = re.compile(r"conv(\d+)_x\.(\d+)\.(residual_function|shortcut)\.(\d+)\.(.+)")
_TV_STEM = re.compile(r"(conv1|bn1)\.(?:(\d+)\.)?(.+)")
_TV_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(?:(conv|bn)(\d+)|downsample\.(\d+))\.(.+)")
_HF_STEM = re.compile(r"embedder\.embedder\.(convolution|normalization)\.(.+)")
_HF_BLOCK = re.compile(
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|shortcut)\."
    r"(convolution|normalization)\.(.+)"
)
_HF_PART = {"convolution": 0, "normalization": 1}

# Keys of ResNet variants the library does not build, and what they are.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"layer\d+\.\d+\.se\.", "squeeze-and-excitation / ECA attention (timm's seresnet*, "
                             "ecaresnet*, skresnet*)"),
    (r"layer\d+\.\d+\.aa\.", "anti-aliased downsampling (timm's aa_layer)"),
    (r"layer\d+\.\d+\.(conv2|conv1)\.(conv|bn)\d*\.", "split-attention or selective-kernel "
                                                     "convs (timm's resnest*, skresnet*)"),
    (r"maxpool\.\d+\.", "a strided-conv stem pool (timm's replace_stem_pool)"),
    (r"(stem\.conv|stages\.\d+\.blocks\.)", "a pre-activation ResNetV2 (timm's resnetv2_*, "
                                            "BiT)"),
)


def unsupported_keys(keys: Iterable[str]) -> str | None:
    """A message naming the keys of a ResNet variant the library lacks, or None."""
    keys = list(keys)
    for pattern, what in UNSUPPORTED:
        hits = sorted(k for k in keys if re.match(pattern, k))
        if hits:
            shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
            return (f"these weights are {what}, which flax_resnet does not build (keys {shown}); "
                    "supported: torch_ref, torchvision and timm ResNet / ResNeXt / Wide ResNet / "
                    "ResNet-C/D/S/T, Hugging Face ResNet")
    return None


def detect_naming(keys: Iterable[str]) -> str:
    """The naming of a state_dict's keys: ``hf`` (``embedder.embedder.*``,
    ``encoder.stages.*``), ``torch_ref`` (``conv2_x.*``), ``timm`` (torchvision's names with a
    deep stem ``conv1.3.*`` or avg-down ``downsample.2.*``), ``torchvision`` (``layer1.*``,
    ``bn1.*``, a bare ``conv1.weight``); ``torch_ref`` when none of them is recognised."""
    keys = [k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k for k in keys]
    if any(_HF_STEM.fullmatch(k) or _HF_BLOCK.fullmatch(k) for k in keys):
        return "hf"
    if any(re.match(r"conv\d+_x\.", k) for k in keys):
        return "torch_ref"
    if any(re.match(r"(bn1|layer\d+)\.", k) or k == "conv1.weight" for k in keys):
        timm = any(k.startswith("conv1.3.") or re.search(r"\.downsample\.2\.", k) for k in keys)
        return "timm" if timm else "torchvision"
    return "torch_ref"


def _is_deep(ref_keys: Iterable[str]) -> bool:
    return any(k.startswith("conv1.3.") for k in ref_keys)


def from_torch_ref(ref_keys: Iterable[str], naming: str) -> dict[str, str]:
    """{torch_ref key: its name in ``naming``} for a model's whole key set (the stem's names
    depend on its kind). Keys the naming cannot express raise ``ConversionError``."""
    ref_keys = list(ref_keys)
    if naming not in NAMINGS:
        raise ConversionError(f"unknown naming {naming!r}; allowed: {', '.join(NAMINGS)}")
    if naming == "torch_ref":
        return {k: k for k in ref_keys}
    deep = _is_deep(ref_keys)
    if naming == "torchvision":
        avg = sorted(k for k in ref_keys if re.search(r"\.shortcut\.2\.", k))
        if deep or avg:
            key = "conv1.3..." if deep else avg[0]
            what = "deep stem" if deep else "avg-down shortcut"
            raise ConversionError(f"no torchvision name for {key}: torchvision's ResNets have no "
                              f"{what}; write timm naming instead")
    rename = _to_hf if naming == "hf" else _to_timm
    return {k: rename(k, deep) for k in ref_keys}


def _to_timm(key: str, deep: bool) -> str:
    if key.startswith("fc."):
        return key
    if m := _REF_STEM.fullmatch(key):
        index, rest = int(m[1]), m[2]
        last_norm = 7 if deep else 1
        if index == last_norm:
            return f"bn1.{rest}"
        return f"conv1.{index}.{rest}" if deep else f"conv1.{rest}"
    if m := REF_BLOCK.fullmatch(key):
        stage, block, kind, index, rest = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}"
        index = int(index)
        if kind == "shortcut":
            return f"{prefix}.downsample.{index}.{rest}"
        if index % 3 != 2:  # 2 and 5 are ReLUs
            return f"{prefix}.{('conv', 'bn')[index % 3]}{index // 3 + 1}.{rest}"
    raise ConversionError(f"no torchvision name (nor timm's) for torch_ref key {key!r}")


def _to_hf(key: str, deep: bool) -> str:
    if key.startswith("fc."):
        return f"classifier.1.{key[3:]}"
    if deep:
        raise ConversionError("Hugging Face's ResNet has no deep stem (conv1.3...)")
    if m := _REF_STEM.fullmatch(key):
        if int(m[1]) < 2:
            part = ("convolution", "normalization")[int(m[1])]
            return f"{HF_PREFIX}embedder.embedder.{part}.{m[2]}"
    if m := REF_BLOCK.fullmatch(key):
        stage, block, kind, index, rest = m.groups()
        prefix = f"{HF_PREFIX}encoder.stages.{int(stage) - 2}.layers.{block}"
        index = int(index)
        part = ("convolution", "normalization")
        if kind == "shortcut" and index < 2:
            return f"{prefix}.shortcut.{part[index]}.{rest}"
        if kind == "residual_function" and index % 3 != 2:
            return f"{prefix}.layer.{index // 3}.{part[index % 3]}.{rest}"
    raise ConversionError(f"no Hugging Face name for torch_ref key {key!r} (Hugging Face's "
                      "ResNet has no avg-down shortcut)")


def to_torch_ref(keys: Iterable[str], naming: str) -> tuple[dict[str, str], list[str]]:
    """({key in ``naming``: its torch_ref key}, keys with no torch_ref name)."""
    keys = list(keys)
    if naming == "torch_ref":
        return {k: k for k in keys}, []
    if naming not in NAMINGS:
        raise ConversionError(f"unknown naming {naming!r}; allowed: {', '.join(NAMINGS)}")
    out, unknown = {}, []
    deep = any(k.startswith("conv1.3.") for k in keys)
    for key in keys:
        ref = _from_hf(key) if naming == "hf" else _from_timm(key, deep)
        if ref is None:
            unknown.append(key)
        else:
            out[key] = ref
    return out, unknown


def _from_timm(key: str, deep: bool) -> str | None:
    if key.startswith("fc."):
        return key
    if m := _TV_STEM.fullmatch(key):
        name, index, rest = m.groups()
        if name == "bn1" and index is None:
            return f"conv1.{7 if deep else 1}.{rest}"
        if name == "conv1":
            if index is None and not deep:
                return f"conv1.0.{rest}"
            if index is not None and deep:
                return f"conv1.{index}.{rest}"
        return None
    if m := _TV_BLOCK.fullmatch(key):
        stage, block, kind, k, downsample, rest = m.groups()
        prefix = f"conv{int(stage) + 1}_x.{block}"
        if downsample is not None:
            return f"{prefix}.shortcut.{downsample}.{rest}"
        if int(k) >= 1:
            return f"{prefix}.residual_function.{3 * (int(k) - 1) + (kind == 'bn')}.{rest}"
    return None


def _from_hf(key: str) -> str | None:
    if key.startswith("classifier.1."):
        return f"fc.{key[len('classifier.1.'):]}"
    if key.startswith(HF_PREFIX):
        key = key[len(HF_PREFIX):]
    if m := _HF_STEM.fullmatch(key):
        return f"conv1.{_HF_PART[m[1]]}.{m[2]}"
    if m := _HF_BLOCK.fullmatch(key):
        stage, block, layer, part, rest = m.groups()
        prefix = f"conv{int(stage) + 2}_x.{block}"
        if layer is None:
            return f"{prefix}.shortcut.{_HF_PART[part]}.{rest}"
        return f"{prefix}.residual_function.{3 * int(layer) + _HF_PART[part]}.{rest}"
    return None
