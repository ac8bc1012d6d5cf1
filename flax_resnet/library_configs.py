"""Hugging Face and timm model directories' ``config.json`` as ``ModelConfig`` fields, both ways.

A Hugging Face transformers directory (``save_pretrained``: ``config.json`` with
``model_type: resnet``, ``model.safetensors`` or ``pytorch_model.bin``, optionally
``preprocessor_config.json``) and a timm hub directory (``timm.models.save_for_hf``:
``config.json`` with ``architecture``, ``model_args`` and ``pretrained_cfg``, and the
weights). What flax_resnet does not build, or the library cannot express, is refused by
field. Reading the directories: ``flax_resnet.weights``; writing them:
``flax_resnet.writers``. Free of JAX, torch and file I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_resnet.config import ARCHS, MODEL_NAMES, ModelConfig, infer_width
from flax_resnet.namings import ConversionError
from flax_resnet.preprocessing import Preprocessing, to_timm_cfg

CONFIG_FILE = "config.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
LIBRARY_DIRS: tuple[str, ...] = ("hf", "timm")


def library_of(config_json: object) -> str | None:
    """``hf`` or ``timm`` for the parsed ``config.json`` of such a model directory, else None."""
    if not isinstance(config_json, dict):
        return None
    if "model_type" in config_json:
        return "hf"
    if "architecture" in config_json:
        return "timm"
    return None


# --- Hugging Face transformers ------------------------------------------------------------

_HF_LAYER_TYPES = {"basic": "basic", "bottleneck": "bottleneck"}


def hf_model_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a transformers ``ResNetConfig``; anything flax_resnet does not
    build is refused by its field name."""
    if hf.get("model_type") != "resnet":
        raise ConversionError(f"model_type {hf.get('model_type')!r} is not supported; only "
                              "Hugging Face's 'resnet' (ResNetModel, ResNetForImageClassification, "
                              "ResNetBackbone)")
    layer_type = hf.get("layer_type", "bottleneck")
    if layer_type not in _HF_LAYER_TYPES:
        raise ConversionError(f"layer_type {layer_type!r} is not supported; allowed: "
                              f"{', '.join(_HF_LAYER_TYPES)}")
    if hf.get("hidden_act", "relu") != "relu":
        raise ConversionError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'relu'")
    depths = tuple(hf.get("depths", (3, 4, 6, 3)))
    block = _HF_LAYER_TYPES[layer_type]
    found = [d for d, a in ARCHS.items() if (a.block, a.blocks_per_stage) == (block, depths)
             and a.default_stem == "imagenet"]
    if not found:
        raise ConversionError(f"depths {list(depths)} with layer_type {layer_type!r} is no "
                              f"ResNet depth flax_resnet builds ({', '.join(map(str, ARCHS))})")
    depth = found[0]
    hidden = list(hf.get("hidden_sizes", (256, 512, 1024, 2048)))
    planes = [h // 4 for h in hidden] if block == "bottleneck" else hidden
    if block == "bottleneck" and any(h % 4 for h in hidden):
        raise ConversionError(f"hidden_sizes {hidden} are not bottleneck outputs (4 x planes)")
    try:
        width = infer_width(ARCHS[depth].stage_channels, planes)
    except ValueError as err:
        raise ConversionError(f"hidden_sizes {hidden}: {err}") from None
    fields: dict[str, Any] = {
        "depth": depth, "width": width, "stem": "imagenet",
        "in_channels": int(hf.get("num_channels", 3)),
        "num_classes": len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2)),
        "downsample_in_first_stage": bool(hf.get("downsample_in_first_stage", False)),
    }
    if block == "bottleneck" and hf.get("downsample_in_bottleneck", False):
        fields["bottleneck_stride"] = "1x1"
    embedding = int(hf.get("embedding_size", 64))
    fields["stem_width"] = None if embedding == ModelConfig(**fields).stage_widths()[0] \
        else embedding
    return fields


def hf_config(cfg: ModelConfig, architecture: str = "ResNetForImageClassification"
              ) -> dict[str, Any]:
    """A transformers ``ResNetConfig`` (``config.json``) for ``cfg``; what Hugging Face's
    ResNet cannot express is refused by field."""
    unsupported = {
        "stem": (cfg.stem, "imagenet"), "groups": (cfg.groups, 1),
        "width_per_group": (cfg.width_per_group, 64), "avg_down": (cfg.avg_down, False),
        "shortcut": (cfg.shortcut, "B"), "norm": (cfg.norm, "bn"),
    }
    bad = [f"{k} {v!r} (Hugging Face's ResNet has only {ok!r})"
           for k, (v, ok) in unsupported.items() if v != ok]
    if bad:
        raise ConversionError(f"this model cannot be a Hugging Face ResNet: {'; '.join(bad)}; "
                              "write timm or torch_ref naming instead")
    spec = ARCHS[cfg.depth]
    expansion = 4 if spec.block == "bottleneck" else 1
    n = len(spec.blocks_per_stage)
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
    return {
        "architectures": [architecture], "model_type": "resnet",
        "num_channels": cfg.in_channels, "embedding_size": cfg.stem_widths()[-1],
        "hidden_sizes": [c * expansion for c in cfg.stage_widths()],
        "depths": list(spec.blocks_per_stage), "layer_type": spec.block, "hidden_act": "relu",
        "downsample_in_first_stage": cfg.downsample_in_first_stage,
        "downsample_in_bottleneck": cfg.bottleneck_stride == "1x1",
        "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()},
        "stage_names": ["stem", *(f"stage{i + 1}" for i in range(n))],
        "out_features": [f"stage{n}"], "out_indices": [n],
    }


# --- timm ------------------------------------------------------------------------------------

# The timm ResNet model_args that read as ModelConfig fields (or, drop rates, do not matter)
_TIMM_ARGS = {"num_classes", "in_chans", "channels", "stem_width", "stem_type", "cardinality",
              "base_width", "avg_down", "global_pool", "drop_rate", "drop_path_rate"}


def timm_model_fields(timm_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm architecture name, ModelConfig fields) of a timm hub ``config.json``."""
    arch = str(timm_config.get("architecture", ""))
    base = arch.split(".", 1)[0]
    if base not in MODEL_NAMES:
        raise ConversionError(f"timm architecture {arch!r} is not supported; supported: "
                              f"{', '.join(MODEL_NAMES)}")
    args = dict(timm_config.get("model_args") or {})
    unknown = sorted(set(args) - _TIMM_ARGS)
    if unknown:
        raise ConversionError(f"timm model_args {unknown} are not supported; supported: "
                              f"{', '.join(sorted(_TIMM_ARGS))}")
    if args.get("global_pool", "avg") != "avg":
        raise ConversionError(f"timm global_pool {args['global_pool']!r} is not supported; "
                              "only 'avg'")
    fields = dict(MODEL_NAMES[base])
    if "num_classes" in args or "num_classes" in timm_config:
        fields["num_classes"] = int(args.get("num_classes", timm_config.get("num_classes")))
    if "in_chans" in args:
        fields["in_channels"] = int(args["in_chans"])
    if "channels" in args:
        fields["width"] = infer_width(ARCHS[fields["depth"]].stage_channels,
                                      list(args["channels"]))
    if "stem_type" in args:
        fields["stem"] = {"": "imagenet", "deep": "deep", "deep_tiered": "deep_tiered"}.get(
            args["stem_type"], args["stem_type"])
    for timm_name, ours in (("stem_width", "stem_width"), ("cardinality", "groups"),
                            ("base_width", "width_per_group"), ("avg_down", "avg_down")):
        if timm_name in args:
            fields[ours] = args[timm_name]
    if fields.get("stem", "imagenet") == "imagenet":
        fields.pop("stem_width", None)  # timm's plain stem is 64 wide whatever stem_width says
    return arch, fields


def timm_config(cfg: ModelConfig, pre: Preprocessing | None) -> dict[str, Any]:
    """A timm hub ``config.json`` for ``cfg`` (``timm.create_model('local-dir:DIR')`` builds
    it); what timm's ResNet cannot express is refused by field."""
    unsupported = {
        "norm": (cfg.norm, "bn"), "shortcut": (cfg.shortcut, "B"),
        "bottleneck_stride": (cfg.bottleneck_stride, "3x3"),
        "downsample_in_first_stage": (cfg.downsample_in_first_stage, False),
    }
    bad = [f"{k} {v!r} (timm's ResNet has only {ok!r})"
           for k, (v, ok) in unsupported.items() if v != ok]
    if cfg.stem == "cifar":
        bad.append("stem 'cifar' (timm's ResNet stems have a stride-2 conv and a max-pool)")
    if cfg.stem == "imagenet" and cfg.stem_widths() != (64,):
        bad.append(f"a {cfg.stem_widths()[0]}-channel 7x7 stem (timm's is 64 wide)")
    if cfg.depth not in (18, 26, 34, 50, 101, 152):
        bad.append(f"depth {cfg.depth} (timm has no He et al. CIFAR depths)")
    if bad:
        raise ConversionError(f"this model cannot be a timm ResNet: {'; '.join(bad)}")
    args: dict[str, Any] = {
        "num_classes": cfg.num_classes, "in_chans": cfg.in_channels,
        "channels": list(cfg.stage_widths()), "cardinality": cfg.groups,
        "base_width": cfg.width_per_group, "avg_down": cfg.avg_down,
        "stem_type": "" if cfg.stem == "imagenet" else cfg.stem, "global_pool": "avg",
    }
    if cfg.stem != "imagenet":
        args["stem_width"] = cfg.stem_widths()[1]
    expansion = 4 if cfg.block == "bottleneck" else 1
    return {
        "architecture": f"resnet{cfg.depth}", "num_classes": cfg.num_classes,
        "num_features": cfg.stage_widths()[-1] * expansion, "global_pool": "avg",
        "model_args": args,
        "pretrained_cfg": {**(to_timm_cfg(pre) if pre else {}), "num_classes": cfg.num_classes,
                           "first_conv": "conv1" if cfg.stem == "imagenet" else "conv1.0",
                           "classifier": "fc"},
    }

