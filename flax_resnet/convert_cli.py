"""The converter's command line: ``python -m flax_resnet.convert SRC DST [options]``, also
installed as ``flax-resnet-convert``.

SRC is any source ``flax_resnet.weights.resolve`` reads; DST a PyTorch file (its suffix
chooses the format, ``--to`` the naming), a Flax checkpoint directory, or with ``--to hf`` /
``--to timm`` that library's model directory::

    python -m flax_resnet.convert resnet50d.pth r50d_flax/            # timm -> Flax
    python -m flax_resnet.convert r50d_flax/ back.safetensors --to timm
    python -m flax_resnet.convert ./resnet-50 hf_flax/                # Hugging Face dir -> Flax

Bad input exits 2 with one line naming the file or value, and nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from flax import nnx

from flax_resnet.config import ARCHITECTURE_FIELDS, INTERPOLATIONS
from flax_resnet.library_configs import LIBRARY_DIRS
from flax_resnet.namings import NAMINGS, ConversionError
from flax_resnet.preprocessing import Preprocessing
from flax_resnet.weights import FixedArchitectureError, resolve
from flax_resnet.writers import (
    FLAX_CONFIG_FILE,
    FLAX_STATE_FILE,
    PYTORCH_SUFFIXES,
    save_flax,
    save_library_dir,
    save_pytorch,
    suffix,
)


def _parser() -> argparse.ArgumentParser:
    from flax_resnet.config import MODEL_NAMES, ModelConfig

    p = argparse.ArgumentParser(
        prog="python -m flax_resnet.convert",
        description=(
            "Convert ResNet weights between PyTorch files (.pt/.pth/.bin/.safetensors in "
            "torch_ref, torchvision, timm or Hugging Face naming), Hugging Face and timm model "
            f"directories, and Flax checkpoint directories ({FLAX_STATE_FILE} + "
            f"{FLAX_CONFIG_FILE}). The architecture is read from a directory's config.json, or "
            "inferred from the keys and shapes; the options below fill in or override it."
        ),
    )
    p.add_argument(
        "src",
        help="a PyTorch weight file, a Hugging Face or timm model directory, a Flax checkpoint "
             "directory or a train.py --workdir",
    )
    p.add_argument(
        "dst",
        help="a .pt/.pth/.bin/.safetensors file, or a directory (no suffix): a Flax checkpoint, "
             "or with --to hf / --to timm a Hugging Face / timm model directory",
    )
    p.add_argument(
        "--from", "--naming", dest="naming", default="auto", choices=("auto", *NAMINGS),
        help="naming of a PyTorch SRC file (default: detected from its keys)",
    )
    p.add_argument(
        "--to", "--to-naming", dest="to_naming", choices=NAMINGS,
        help="naming of a PyTorch DST (default: SRC's; torch_ref from a Flax SRC); hf or timm "
             "with a directory DST writes that library's model directory",
    )
    p.add_argument("--model", metavar="NAME",
                   help="a torchvision / timm model name the weights are (resnet50d, "
                        "resnext50_32x4d, ...), for what the keys do not show: "
                        + ", ".join(MODEL_NAMES))
    p.add_argument("--step", type=int,
                   help="the checkpoint step of a train.py --workdir SRC (default: the latest)")
    pre = p.add_argument_group(
        "input preprocessing", "what the weights expect, recorded with a directory DST "
        "(preprocessing.json / the library's config) for flax-resnet-eval, -predict, -export "
        "and --init-from; each overrides what SRC states (a torch_ref state_dict states "
        "nothing: give --mean and --std)")
    pre.add_argument("--mean", type=_floats, metavar="R,G,B",
                     help="per-channel mean of (x / 255) the weights were trained on")
    pre.add_argument("--std", type=_floats, metavar="R,G,B", help="per-channel std")
    pre.add_argument("--image-size", type=int, metavar="S", help="input size S x S")
    pre.add_argument("--resize-size", type=int, metavar="R",
                     help="shorter side before the center crop")
    pre.add_argument("--crop-pct", type=float, help="image size / resize size (timm's)")
    pre.add_argument("--interpolation", choices=INTERPOLATIONS, help="resampling filter")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _ARCH_OPTIONS:
            continue
        kind = str(f.type)
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        if "bool" in kind:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = float if "float" in kind else int if "int" in kind else str
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        hint = _NOT_IN_KEYS.get(f.name, "inferred from the weights")
        kw["help"] = f"{f.metadata['help']} ({hint})"
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


# The ModelConfig fields the command line can set, and those the weights do not show:
_ARCH_OPTIONS = (*ARCHITECTURE_FIELDS, "num_classes")
_NOT_IN_KEYS = {
    "norm": "bn and rms are inferred; ln, gn and in look alike",
    "norm_groups": "default 32",
    "num_classes": "inferred from the classifier; for weights without one, a fresh "
                   "classifier of this size",
    "bottleneck_stride": "the keys do not show it; default 3x3, torchvision's and timm's",
    "downsample_in_first_stage": "the keys do not show it",
}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers, e.g. "
                                         "0.485,0.456,0.406") from None


# The preprocessing options: command-line dest -> Preprocessing field.
_PRE_OPTIONS = {"mean": "mean", "std": "std", "image_size": "input_size",
                "resize_size": "resize_size", "crop_pct": "crop_pct",
                "interpolation": "interpolation"}


def preprocessing_with(base: Preprocessing | None, src: str, channels: int,
                       **given: Any) -> Preprocessing | None:
    """``base`` (what SRC states) with the given options (``_PRE_OPTIONS`` keys, None: not
    given) in its place; ``ConversionError`` names a value that cannot be."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return base
    for key in ("mean", "std"):
        if key in given and len(given[key]) != channels:
            raise ConversionError(f"--{key} {','.join(map(str, given[key]))}: the model takes "
                                  f"{channels} channels, so give {channels} values")
    if any(v <= 0 for v in given.get("std", ())):
        raise ConversionError(f"--std {','.join(map(str, given['std']))}: every value must "
                              "be > 0")
    for key in ("image_size", "resize_size"):
        if key in given and given[key] < 1:
            raise ConversionError(f"{_flag(key)} {given[key]} must be >= 1")
    if "crop_pct" in given and not 0 < given["crop_pct"] <= 1:
        raise ConversionError(f"--crop-pct {given['crop_pct']} must be in (0, 1]")
    if base is None and not {"mean", "std"} <= set(given):
        raise ConversionError(f"{src} states no preprocessing: give --mean and --std (and "
                              "--image-size...) to record one")
    fields = {_PRE_OPTIONS[k]: v for k, v in given.items()}
    if "input_size" in fields:
        fields["input_size"] = (channels, fields["input_size"], fields["input_size"])
    if "crop_pct" in fields and "resize_size" not in fields:
        fields["resize_size"] = None  # a new ratio replaces an exact resize SRC stated
    said = " ".join(f"{_flag(k)} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in given.items())
    if base is None:
        return Preprocessing(source=f"flax-resnet-convert {said}", **fields)
    return dataclasses.replace(base, **fields, source=f"{base.source}; {said}")


def _is_dir_dst(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(os.sep) or not suffix(path)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def convert(src: str, dst: str, *, naming: str = "auto", to_naming: str | None = None,
            step: int | None = None, model: str | None = None,
            preprocessing: dict[str, Any] | None = None, **arch: Any
            ) -> tuple[nnx.Module, dict[str, Any], str]:
    """The command line's work: read ``src``, write ``dst``; returns (model, config, what was
    written: a naming, "flax", or "hf"/"timm" for a model directory). ``preprocessing``:
    the ``_PRE_OPTIONS`` given. A directory DST records SRC's provenance (``origin.json``)."""
    if not _is_dir_dst(dst) and suffix(dst) not in PYTORCH_SUFFIXES:
        raise ConversionError(
            f"unknown weight file type {suffix(dst)!r} for {dst}; a PyTorch DST is one of "
            f"{', '.join(PYTORCH_SUFFIXES)}, a Flax DST a directory (a path without suffix)"
        )
    num_classes = arch.pop("num_classes", None)
    try:
        weights = resolve(src, step=step, naming=naming, model=model, **arch)
    except FixedArchitectureError as err:
        raise ConversionError(f"{err.description} states its architecture in its config.json, "
                              f"so {', '.join(map(_flag, err.fields))} cannot apply") from None
    if num_classes is not None and weights.classifier_size not in (None, num_classes):
        raise ConversionError(f"--num-classes {num_classes}: {src} has a classifier of "
                              f"{weights.classifier_size} classes (--num-classes is for "
                              "weights without one)")
    if num_classes is None and weights.config.get("num_classes") is None:
        raise ConversionError(f"{src} has no classifier (a backbone); give --num-classes N "
                              "for a freshly initialised one")
    net = weights.build(num_classes=num_classes)
    config = weights.create_kwargs(num_classes)
    pre = preprocessing_with(weights.preprocessing, src, config["in_channels"],
                             **(preprocessing or {}))
    if _is_dir_dst(dst):
        origin = weights.provenance()
        if to_naming in LIBRARY_DIRS:
            save_library_dir(net, config, dst, to_naming, pre, origin)
            return net, config, to_naming
        if to_naming is not None:
            raise ConversionError(f"--to {to_naming} writes a file: give DST a suffix "
                                  f"({', '.join(PYTORCH_SUFFIXES)}); a directory DST is a Flax "
                                  f"checkpoint or, with --to hf / --to timm, that library's")
        save_flax(net, config, dst, pre, origin)
        return net, config, "flax"
    if preprocessing and any(v is not None for v in preprocessing.values()):
        raise ConversionError("a PyTorch file DST holds no preprocessing: --mean, --std, "
                              "--image-size... need a directory DST")
    out = to_naming or weights.naming
    save_pytorch(net, dst, out)
    return net, config, out


def main(argv: list[str] | None = None) -> int:
    """``python -m flax_resnet.convert SRC DST [options]``; 0 on success, 2 on bad input."""
    args = _parser().parse_args(argv)
    arch = {k: getattr(args, k) for k in _ARCH_OPTIONS}
    pre = {k: getattr(args, k) for k in _PRE_OPTIONS}
    try:
        _, config, written = convert(
            args.src, args.dst, naming=args.naming, to_naming=args.to_naming, step=args.step,
            model=args.model, preprocessing=pre, **arch,
        )
    except (ValueError, OSError) as err:  # ConversionError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = {"flax": "Flax checkpoint"}.get(written, f"{written} state_dict")
    if written in LIBRARY_DIRS and _is_dir_dst(args.dst):
        kind = f"{ {'hf': 'Hugging Face', 'timm': 'timm'}[written]} model directory"
    summary = ", ".join(f"{k}={v}" for k, v in sorted(config.items()))
    print(f"wrote {args.dst} ({kind}; {summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
