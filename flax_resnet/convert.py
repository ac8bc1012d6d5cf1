"""Weights between the PyTorch ResNets people hold and ``flax_resnet``.

The Flax module tree mirrors ``torch_ref``'s, so a Flax variable path maps to a ``torch_ref``
state_dict key by dropping the ``layers`` level of ``nnx.Sequential`` and renaming the leaf;
only conv kernels (HWIO ↔ OIHW) and dense kernels ((in, out) ↔ (out, in)) change layout.
Every other naming (torchvision, timm, Hugging Face) is a map from torch_ref keys:
``flax_resnet.namings``. Other libraries' model directories and the preprocessing that
travels with weights: ``flax_resnet.hub``.

Sources: PyTorch ``.pt``/``.pth``/``.bin``/``.safetensors`` state_dicts in any naming, Hugging
Face ``save_pretrained`` and timm ``save_for_hf`` directories, ``train.py`` run directories
and *Flax checkpoints*: a directory holding ``state.msgpack`` (``flax.serialization.to_bytes``
of ``nnx.to_pure_dict(nnx.state(model))``), ``config.json`` (the ``ModelConfig`` fields) and,
when known, ``preprocessing.json``; see :func:`load`, :func:`save_flax`. The command line
converts between them::

    python -m flax_resnet.convert resnet50d.pth r50d_flax/            # timm -> Flax
    python -m flax_resnet.convert r50d_flax/ back.safetensors --to timm
    python -m flax_resnet.convert ./resnet-50 hf_flax/                # Hugging Face dir -> Flax
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet import hub, namings
from flax_resnet.config import (
    ARCHITECTURE_FIELDS,
    ARCHS,
    bottleneck_width,
    infer_width,
    stage_widths,
)
from flax_resnet.namings import NAMINGS, REF_BLOCK, ConversionError

# ``python -m flax_resnet.convert``: the package imports this module before runpy runs it as
# ``__main__``, and runpy warns about exactly that. The duplicate is harmless: the ``__main__``
# copy only calls ``main`` of this, the canonical, module.
warnings.filterwarnings(
    "ignore", message=r"'flax_resnet\.convert' found in sys\.modules", category=RuntimeWarning
)

log = logging.getLogger(__name__)

TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin")
PYTORCH_SUFFIXES: tuple[str, ...] = (*TORCH_SUFFIXES, ".safetensors")
FLAX_STATE_FILE = "state.msgpack"
FLAX_CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
RUN_CONFIG_FILE = "config.json"  # a train.py run directory: config.json + checkpoints/<step>/
RUN_CHECKPOINT_DIR = "checkpoints"

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}


# --- key names ----------------------------------------------------------------------------


def torch_key(path: tuple[Any, ...]) -> str:
    """The ``torch_ref`` state_dict key of a Flax variable path."""
    *parents, leaf = path
    if leaf not in _LEAF_TO_TORCH:
        raise ConversionError(f"no PyTorch name for Flax variable {'/'.join(map(str, path))}")
    names = [str(p) for p in parents if p != "layers"]
    return ".".join([*names, _LEAF_TO_TORCH[leaf]])


def torchvision_key(key: str) -> str:
    """The torchvision name of a ``torch_ref`` key of a torchvision-shaped model."""
    return namings.from_torch_ref([key], "torchvision")[key]


def torch_ref_key(key: str) -> str:
    """The ``torch_ref`` name of a torchvision state_dict key (inverse of torchvision_key)."""
    renamed, unknown = namings.to_torch_ref([key], "torchvision")
    if unknown:
        raise ConversionError(f"no torch_ref name for torchvision key {key!r}")
    return renamed[key]


def _check_naming(naming: str, allow_auto: bool = False) -> None:
    allowed = ("auto", *NAMINGS) if allow_auto else NAMINGS
    if naming not in allowed:
        raise ConversionError(f"unknown naming {naming!r}; allowed: {', '.join(allowed)}")


def detect_naming(keys: Any) -> str:
    """The naming of a state_dict (see ``flax_resnet.namings.detect_naming``)."""
    return namings.detect_naming(keys)


def _refuse_unsupported(keys: Any) -> None:
    if message := namings.unsupported_keys(keys):
        raise ConversionError(message)


def to_torch_ref_names(state_dict: Mapping[str, Any], naming: str = "auto") -> dict[str, Any]:
    """``state_dict`` with ``torch_ref`` keys; ``naming`` is its current naming or ``auto``.

    Keys that have no torch_ref name raise ``ConversionError`` naming them.
    """
    _check_naming(naming, allow_auto=True)
    _refuse_unsupported(state_dict)
    if naming == "auto":
        naming = detect_naming(state_dict)
    renamed, unknown = namings.to_torch_ref(state_dict, naming)
    if unknown:
        raise ConversionError(f"unknown {naming} keys {_key_list(unknown)}")
    return {renamed[k]: v for k, v in state_dict.items()}


# --- layouts and variables ------------------------------------------------------------------


# Kernel axis orders by rank: conv HWIO -> OIHW and dense (in, out) -> (out, in), and back.
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}
_TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}


def _relayout(leaf: str, value: np.ndarray, axes: dict[int, tuple[int, ...]]) -> np.ndarray:
    if leaf == "kernel" and value.ndim in axes:
        return value.transpose(axes[value.ndim])
    return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    return _relayout(leaf, value, _TO_TORCH_AXES)


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    return _relayout(leaf, value, _TO_FLAX_AXES)


def model_variables(
    model: nnx.Module, naming: str = "torch_ref"
) -> Iterator[tuple[str, tuple[Any, ...], nnx.Variable]]:
    """(PyTorch key in ``naming``, Flax path, variable) for every Param and BatchStat."""
    _check_naming(naming)
    found = [(torch_key(path), path, node) for path, node in nnx.iter_graph(model)
             if isinstance(node, (nnx.Param, nnx.BatchStat))]
    names = namings.from_torch_ref([k for k, _, _ in found], naming)
    for key, path, node in found:
        yield names[key], path, node


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    # Copy: JAX on CPU may alias a numpy buffer, and torch would keep mutating it in place.
    return np.array(value, copy=True)


def _key_list(keys: Any, limit: int = 20) -> str:
    keys = sorted(keys)
    if len(keys) <= limit:
        return str(keys)
    return f"{keys[:limit]} and {len(keys) - limit} more"


def _load(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    naming: str,
    keep_classifier: bool = False,
) -> list[str]:
    """Check every key and shape, then copy; returns the model keys left as they were.

    With ``keep_classifier``, a classifier (``fc.*``) that is absent from ``state_dict`` or
    shaped differently from the model's is skipped instead of raising.
    """
    _check_naming(naming)
    _refuse_unsupported(state_dict)
    original = {k: k for k in state_dict}  # torch_ref key -> the key as the caller named it
    foreign: list[str] = []  # keys with no torch_ref name
    if naming != "torch_ref":
        renamed, foreign = namings.to_torch_ref(state_dict, naming)
        original = {ref: key for key, ref in renamed.items()}
        state_dict = {ref: state_dict[key] for key, ref in renamed.items()}
    targets = {key: (path, var) for key, path, var in model_variables(model)}
    kept: list[str] = []
    if keep_classifier:
        fc = [k for k in targets if k.startswith("fc.")]
        fits = all(
            k in state_dict
            and _to_flax_layout(targets[k][0][-1], _as_numpy(state_dict[k])).shape
            == tuple(targets[k][1].shape)
            for k in fc
        )
        if not fits:
            kept = fc
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            targets = {k: t for k, t in targets.items() if k not in fc}
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted({original[k] for k in set(state_dict) - set(targets)} | set(foreign))
    if missing or unexpected:
        try:
            missing = sorted(namings.from_torch_ref(targets, naming)[k] for k in missing)
        except ConversionError:
            pass  # the model itself has no such names: say them as torch_ref's
        looks = detect_naming(list(original.values()) + foreign)
        hint = (f"; its keys look like {looks} naming, not {naming}: pass naming={looks!r} "
                "or naming='auto'" if looks != naming else "")
        raise ConversionError(
            f"state_dict does not match the model: missing keys {_key_list(missing)}, "
            f"unexpected keys {_key_list(unexpected)}{hint}"
        )
    staged, bad = {}, []
    for key, (path, var) in targets.items():
        source = _as_numpy(state_dict[key])
        value = _to_flax_layout(path[-1], source)
        if value.shape != tuple(var.shape):
            bad.append(
                f"{original.get(key, key)!r}: PyTorch {tuple(source.shape)} -> Flax {value.shape}, "
                f"model expects Flax {tuple(var.shape)}"
            )
            continue
        staged[key] = jnp.asarray(value, dtype=var.dtype)
    if bad:
        shown = "; ".join(bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ConversionError(f"shape mismatch for {shown}")
    for key, (_, var) in targets.items():
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):  # from _abstract_model
            var.set_value(staged[key])
        else:  # in place, keeping the variable's sharding
            var[...] = staged[key]
    return kept


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, Any], naming: str = "auto"
) -> nnx.Module:
    """Copy a PyTorch state_dict (tensors or arrays) into ``model`` in place.

    ``naming``: ``auto`` (default: detected from the keys, see :func:`detect_naming`),
    ``torch_ref`` or ``torchvision``.
    Every key must match: missing, unexpected and mis-shaped keys raise ``ConversionError``
    naming them (no partial load). Values are cast to each Flax variable's dtype.
    """
    _check_naming(naming, allow_auto=True)
    if naming == "auto":
        naming = detect_naming(state_dict)
    _load(model, state_dict, naming)
    return model


def to_numpy_state_dict(model: nnx.Module, naming: str = "torch_ref") -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch-layout state_dict of numpy arrays, keys in ``naming``."""
    out = {}
    for key, path, var in model_variables(model, naming):
        value = np.asarray(var[...])
        if path[-1] == "num_batches_tracked":
            value = value.astype(np.int64)
        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d).
        out[key] = np.require(_to_torch_layout(path[-1], value), requirements="C")
    return out


def to_torch_state_dict(model: nnx.Module, naming: str = "torch_ref") -> dict[str, Any]:
    """The model's weights as a state_dict of torch tensors, keys in ``naming``.

    ``naming="torchvision"`` gives a dict that ``torchvision.models.resnetXX()`` accepts with
    ``load_state_dict(strict=True)`` (for a model with torchvision's architecture).
    """

    return {k: _numpy_to_torch(v) for k, v in to_numpy_state_dict(model, naming).items()}


def _numpy_to_torch(value: np.ndarray) -> Any:
    import torch

    if value.dtype == jnp.bfloat16:
        # torch.from_numpy does not know ml_dtypes' bfloat16: move the bits, then reinterpret.
        return torch.from_numpy(value.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(value.copy())


# --- PyTorch files --------------------------------------------------------------------------


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state_dict from ``.pt``/``.pth``/``.safetensors`` without building a model."""
    path = os.fspath(path)
    suffix = _suffix(path)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    if suffix in TORCH_SUFFIXES:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{path}: expected a state_dict, found {type(obj).__name__}")
        return dict(obj)
    raise ConversionError(
        f"unknown weight file type {suffix!r} for {path}; allowed: .pt, .pth, .bin, .safetensors"
    )


def _read_pytorch_file(path: str) -> dict[str, Any]:
    """read_state_dict with every failure as a ConversionError, and ``module.`` stripped."""
    if not os.path.isfile(path):
        raise ConversionError(f"no such file: {path}")
    try:
        state_dict = read_state_dict(path)
    except ConversionError:
        raise
    except Exception as err:  # torch/safetensors raise many kinds on a corrupt file
        raise ConversionError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if state_dict and all(k.startswith("module.") for k in state_dict):  # DataParallel / DDP
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_torch_checkpoint(
    model: nnx.Module, path: str | os.PathLike, naming: str = "auto"
) -> nnx.Module:
    """Load a ``.pt``/``.pth`` (a state_dict, or a dict holding one under ``state_dict`` or
    ``model``) or a ``.safetensors`` file into ``model``; ``naming`` as in
    :func:`load_torch_state_dict`, detected by default."""
    return load_torch_state_dict(model, read_state_dict(path), naming)


def _write_atomic(path: str, write: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - OSError, or safetensors' and torch's own kinds
        raise ConversionError(f"cannot write {path}: {type(err).__name__}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(
    model: nnx.Module, path: str | os.PathLike, naming: str = "torch_ref"
) -> None:
    """Write the model as a PyTorch-layout ``.safetensors`` file, atomically."""
    from safetensors.numpy import save_file

    state_dict = to_numpy_state_dict(model, naming)
    _write_atomic(os.fspath(path), lambda tmp: save_file(state_dict, tmp))


def save_pytorch(model: nnx.Module, path: str | os.PathLike, naming: str = "torch_ref") -> None:
    """Write the model's state_dict to ``.safetensors`` or (``torch.save``) ``.pt``/``.pth``/
    ``.bin``, chosen by suffix, atomically; keys in ``naming``."""
    path = os.fspath(path)
    suffix = _suffix(path)
    if suffix == ".safetensors":
        save_safetensors(model, path, naming)
    elif suffix in TORCH_SUFFIXES:
        import torch

        state_dict = to_torch_state_dict(model, naming)
        _write_atomic(path, lambda tmp: torch.save(state_dict, tmp))
    else:
        raise ConversionError(
            f"unknown weight file type {suffix!r} for {path}; "
            f"allowed: {', '.join(PYTORCH_SUFFIXES)}"
        )


# --- architecture from a state_dict ------------------------------------------------------------


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def _infer_width(base: tuple[int, ...], channels: list[int | None]) -> float:
    try:
        return infer_width(base, channels)
    except ValueError as err:
        raise ConversionError(f"{err}; set width (--width)") from None


def _infer_width_per_group(planes: list[int], inner: list[int], groups: int) -> int:
    """The group width that gives every stage's bottleneck inner width (64 when it fits)."""
    for wpg in (64, *range(1, 1025)):
        if all(bottleneck_width(p, groups, wpg) == c for p, c in zip(planes, inner, strict=True)):
            return wpg
    raise ConversionError(f"cannot infer width_per_group: bottleneck widths {inner} at stage "
                          f"widths {planes} and {groups} groups; set width_per_group")


def infer_config(
    state_dict: Mapping[str, Any], naming: str = "auto", *, model: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``ModelConfig`` fields that fit ``state_dict``.

    ``model``: a torchvision / timm model name (``config.MODEL_NAMES``) to start from; the
    keys still decide what they show. Inferred: ``depth`` (blocks per stage; BottleNeck
    when ``residual_function.6`` exists), ``stem`` (stem kernel 7 or 3, three convs for a
    deep stem, tiered when its first two differ) and ``stem_width``, ``shortcut`` (B when
    projection shortcuts exist), ``avg_down`` (a pooled projection), ``groups`` and
    ``width_per_group`` (the grouped 3x3's shape), ``norm`` (``bn`` with running statistics,
    ``rms`` with ``.norm.weight``; the GroupNorm family — ``ln``/``gn``/``in`` — looks the
    same and needs ``norm=``), ``num_classes``, ``width`` and ``in_channels``. The keys do
    not show which conv carries a stride (``bottleneck_stride``,
    ``downsample_in_first_stage``): those keep their defaults, torchvision's and timm's,
    unless given. Keyword ``overrides`` that are not None win; the result is not checked
    against every key (loading does that).
    """
    from flax_resnet.config import MODEL_NAMES, named_model
    from flax_resnet.norms import canonical_norm

    config = {k: v for k, v in overrides.items() if v is not None}
    if model is not None:
        try:
            named = named_model(model).to_dict()
        except ValueError as err:
            raise ConversionError(str(err)) from None
        config = {**{k: v for k, v in named.items() if k in MODEL_NAMES[model.split(".")[0]]},
                  **config}
    sd = to_torch_ref_names(state_dict, naming)
    if "conv1.0.weight" not in sd or len(_shape(sd["conv1.0.weight"])) != 4:
        raise ConversionError("cannot infer the architecture: no 4-D stem conv 'conv1.0.weight'")
    stem_out, in_channels, kh, _ = _shape(sd["conv1.0.weight"])
    blocks: dict[int, set[int]] = {}
    for key in sd:
        if m := REF_BLOCK.fullmatch(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(blocks)
    if stages != list(range(2, 2 + len(stages))) or not stages:
        raise ConversionError(f"cannot infer the architecture: stages conv{stages}_x")
    blocks_per_stage = tuple(len(blocks[s]) for s in stages)
    block = "bottleneck" if any(".residual_function.6." in k for k in sd) else "basic"
    if "depth" not in config:
        depths = [
            d for d, a in ARCHS.items()
            if (a.block, a.blocks_per_stage) == (block, blocks_per_stage)
        ]
        if not depths:
            raise ConversionError(
                f"no ResNet depth has {block} blocks {list(blocks_per_stage)} per stage; "
                f"known depths: {', '.join(map(str, ARCHS))}"
            )
        config["depth"] = depths[0]
    deep = "conv1.3.weight" in sd
    if "stem" not in config:
        if deep:
            tiered = _shape(sd["conv1.0.weight"])[0] != _shape(sd["conv1.3.weight"])[0]
            config["stem"] = "deep_tiered" if tiered else "deep"
        else:
            stems = {7: "imagenet", 3: "cifar"}
            if kh not in stems:
                raise ConversionError(
                    f"stem conv kernel {kh}x{kh} is neither 7x7 nor 3x3; set stem (--stem)"
                )
            config["stem"] = stems[kh]
    if "norm" in config:
        config["norm"] = canonical_norm(config["norm"])
    else:
        stem_norm = {k[len("conv1.1."):] for k in sd if k.startswith("conv1.1.")}
        if "running_mean" in stem_norm:
            config["norm"] = "bn"
        elif "norm.weight" in stem_norm:
            config["norm"] = "rms"
        else:
            raise ConversionError(
                "cannot infer the norm: without running statistics ln, gn and in have the "
                "same weights; set norm (--norm): ln, gn or in"
            )
    config.setdefault("shortcut", "B" if any(".shortcut." in k for k in sd) else "A")
    config.setdefault("avg_down", any(re.search(r"\.shortcut\.2\.", k) for k in sd))
    if "num_classes" not in config:  # None: no classifier (a backbone)
        config["num_classes"] = _shape(sd["fc.weight"])[0] if "fc.weight" in sd else None
    bottleneck = ARCHS[config["depth"]].block == "bottleneck"

    def out_channels(stage: int, index: int) -> int | None:
        key = f"conv{stage}_x.0.residual_function.{index}.weight"
        return _shape(sd[key])[0] if key in sd else None

    # a stage's planes: its output over the expansion (the inner width may be grouped/wide)
    planes = [c // 4 if bottleneck and c else c
              for c in (out_channels(s, 6 if bottleneck else 0) for s in stages)]
    if "width" not in config:
        config["width"] = _infer_width(ARCHS[config["depth"]].stage_channels, planes)
    if bottleneck and "groups" not in config and "conv2_x.0.residual_function.3.weight" in sd:
        out, per_group = _shape(sd["conv2_x.0.residual_function.3.weight"])[:2]
        config["groups"] = out // per_group
    if bottleneck and "width_per_group" not in config and None not in planes:
        inner = [out_channels(s, 3) for s in stages]
        if None not in inner:
            config["width_per_group"] = _infer_width_per_group(planes, inner,
                                                               config.get("groups", 1))
    if "stem_width" not in config:
        first = stage_widths(config["depth"], config["width"])[0]
        stem_width = _shape(sd["conv1.3.weight"])[0] if deep else stem_out
        default = max(1, first // 2) if deep else first
        config["stem_width"] = None if stem_width == default else stem_width
    config.setdefault("in_channels", in_channels)
    for field, default in (("avg_down", False), ("stem_width", None), ("groups", 1),
                           ("width_per_group", 64)):  # said only where they differ
        if overrides.get(field) is None and config.get(field, default) == default:
            config.pop(field, None)
    return config


# --- Flax checkpoints ------------------------------------------------------------------------


def _create_kwargs() -> set[str]:
    from flax_resnet.config import MODEL_FIELDS

    return {*MODEL_FIELDS, "dtype", "param_dtype"}


def _json_config(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - _create_kwargs())
    if unknown:
        raise ConversionError(f"config has keys create_resnet does not take: {unknown}")
    out = dict(config)
    for key in ("dtype", "param_dtype"):
        if out.get(key) is not None:
            out[key] = jnp.dtype(out[key]).name
    return out


def _abstract_model(config: Mapping[str, Any]) -> nnx.Module:
    """The model ``config`` builds, with shapes for values (no random init); filling every
    variable (``_load``) makes it concrete."""
    from flax_resnet.models import create_resnet

    kwargs = dict(config)
    for key in ("dtype", "param_dtype"):
        if kwargs.get(key) is not None:
            kwargs[key] = jnp.dtype(kwargs[key])
    try:
        return nnx.eval_shape(lambda: create_resnet(**kwargs, rngs=nnx.Rngs(0)))
    except (TypeError, ValueError) as err:
        raise ConversionError(f"config {dict(config)} does not build a ResNet: {err}") from err


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def _is_flax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, FLAX_STATE_FILE)) and os.path.isfile(
        os.path.join(path, FLAX_CONFIG_FILE)
    )


def save_flax(model: nnx.Module, config: Mapping[str, Any], path: str | os.PathLike,
              preprocessing: hub.Preprocessing | None = None) -> None:
    """Write a Flax checkpoint directory: ``state.msgpack``, ``config.json`` and, when
    given, the weights' ``preprocessing.json``.

    ``config`` holds the ``create_resnet`` keyword arguments (less ``rngs``) that build
    ``model``; it is checked against the model's variables. The directory is written next to
    ``path`` and renamed into place, so ``path`` never holds half a checkpoint; an existing
    ``path`` must be empty or a Flax checkpoint (it is replaced).
    """
    import flax.serialization

    path = os.fspath(path).rstrip(os.sep) or os.sep
    config = _json_config(config)
    expected = {p: tuple(v.shape) for _, p, v in model_variables(_abstract_model(config))}
    actual = {p: tuple(v.shape) for _, p, v in model_variables(model)}
    if expected != actual:
        diff = sorted(
            "/".join(map(str, p)) for p in set(expected) ^ set(actual)
            | {p for p in set(expected) & set(actual) if expected[p] != actual[p]}
        )
        raise ConversionError(f"config {config} does not describe the model: differs at {diff}")
    if os.path.exists(path) and not (
        os.path.isdir(path) and (not os.listdir(path) or _is_flax_dir(path))
    ):
        raise ConversionError(f"{path} exists and is not a Flax checkpoint directory")
    data = flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, FLAX_STATE_FILE), "wb") as f:
            f.write(data)
        with open(os.path.join(tmp, FLAX_CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if preprocessing is not None:
            with open(os.path.join(tmp, PREPROCESSING_FILE), "w") as f:
                json.dump(preprocessing.to_dict(), f, indent=2)
                f.write("\n")
        if os.path.isdir(path) and os.listdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _read_flax(path: str) -> tuple[dict[str, Any], dict[tuple, np.ndarray]]:
    """(config, {Flax path of str: array}) of a Flax checkpoint directory."""
    import flax.serialization

    if not os.path.isdir(path):
        raise ConversionError(f"no such Flax checkpoint directory: {path}")
    if not _is_flax_dir(path):
        raise ConversionError(
            f"{path} is not a Flax checkpoint: it needs {FLAX_STATE_FILE} and {FLAX_CONFIG_FILE}"
        )
    try:
        with open(os.path.join(path, FLAX_CONFIG_FILE)) as f:
            config = json.load(f)
        with open(os.path.join(path, FLAX_STATE_FILE), "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
    except Exception as err:
        raise ConversionError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ConversionError(f"cannot read {path}: malformed {FLAX_CONFIG_FILE} or state")
    return config, {p: np.asarray(v) for p, v in _flatten(state).items()}


def _flax_to_torch_ref(flat: Mapping[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    return {torch_key(p): _to_torch_layout(p[-1], v) for p, v in flat.items()}


def _is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, RUN_CHECKPOINT_DIR)
    )


def _read_run(path: str, step: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(create_resnet config, torch_ref state_dict) of a ``train.py`` run directory at
    ``step`` (default: the latest checkpoint)."""
    from flax_resnet.checkpoint import Checkpointer
    from flax_resnet.config import ModelConfig

    try:
        with open(os.path.join(path, RUN_CONFIG_FILE)) as f:
            run_config = json.load(f)
        model_fields = {f.name for f in ModelConfig.__dataclass_fields__.values()}
        # A run's config.json is a flat TrainConfig (older runs) or holds a "model" entry.
        source = run_config.get("model", run_config) if isinstance(run_config, dict) else {}
        config = {k: v for k, v in source.items() if k in model_fields}
    except (OSError, ValueError, AttributeError) as err:
        raise ConversionError(f"cannot read {path}/{RUN_CONFIG_FILE}: {err}") from err
    absl = logging.getLogger("absl")  # Orbax's read-only notes are not the user's business
    level = absl.level
    absl.setLevel(logging.ERROR)
    ckpt = Checkpointer(os.path.join(path, RUN_CHECKPOINT_DIR), read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConversionError(f"{path} is a run directory without any checkpoint yet")
        if step is not None and step not in steps:
            raise ConversionError(
                f"{path} has no checkpoint of step {step}; it has steps "
                f"{', '.join(map(str, sorted(steps)))}"
            )
        try:
            state, _ = ckpt.restore_raw(step)
        except Exception as err:
            raise ConversionError(
                f"cannot read the checkpoint of step {step or max(steps)} in {path}: "
                f"{type(err).__name__}: {err}"
            ) from err
    finally:
        ckpt.close()
        absl.setLevel(level)
    flat = {}
    for part in ("params", "batch_stats"):
        for p, v in _flatten(state.get(part, {})).items():
            flat[p[:-1] if p[-1] == "value" else p] = np.asarray(v)
    state_dict = _flax_to_torch_ref(flat)
    if "fc.bias" not in state_dict:
        raise ConversionError(f"the checkpoint in {path} holds no classifier (fc.bias)")
    config["num_classes"] = int(state_dict["fc.bias"].shape[0])
    return config, state_dict


def _read_library_dir(path: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelConfig fields, torch_ref state_dict) of a Hugging Face or timm directory: the
    architecture from its config.json, completed and checked from its keys."""
    config_json = hub.read_json(os.path.join(path, hub.CONFIG_FILE))
    sd = to_torch_ref_names(_read_pytorch_file(hub.weights_file(path)), kind)
    fields = hub.hf_model_fields(config_json) if kind == "hf" else \
        hub.timm_model_fields(config_json)[1]
    if "fc.weight" not in sd:  # a ResNetModel / ResNetBackbone
        fields.pop("num_classes", None)
    given = {k: v for k, v in fields.items() if v is not None}
    return infer_config(sd, "torch_ref", **given), sd


def read_saved(
    path: str | os.PathLike, step: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The one reader of a saved model directory: a Flax checkpoint (:func:`save_flax`), a
    ``train.py`` run directory (its latest checkpoint, or ``step``), a Hugging Face
    transformers directory (``save_pretrained``) or a timm hub directory (``save_for_hf``).
    Returns ``(ModelConfig fields, torch_ref state_dict)``; ``num_classes`` is None for
    weights without a classifier (a Hugging Face ``ResNetModel`` / ``ResNetBackbone``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"no such directory: {path}")
    if _is_flax_dir(path) and hub.dir_kind(path) is None:
        if step is not None:
            raise ConversionError(f"{path} is a Flax checkpoint: it has no steps to choose")
        config, flat = _read_flax(path)
        return config, _flax_to_torch_ref(flat)
    if _is_run_dir(path):
        return _read_run(path, step)
    if (kind := hub.dir_kind(path)) is not None:
        if step is not None:
            raise ConversionError(f"{path} is a {kind} model directory: it has no steps")
        return _read_library_dir(path, kind)
    raise ConversionError(
        f"{path} is neither a Flax checkpoint ({FLAX_STATE_FILE} + {FLAX_CONFIG_FILE}), a "
        f"train.py run directory ({RUN_CONFIG_FILE} + {RUN_CHECKPOINT_DIR}/), a Hugging Face "
        f"model directory nor a timm one ({hub.CONFIG_FILE} + one of "
        f"{', '.join(hub.WEIGHT_FILES)})"
    )


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``ModelConfig`` fields of the weights at ``path`` (any source :func:`load`
    reads): a directory's own, or inferred from a file's keys."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_saved(path)[0]
    state_dict, naming = _read_any(path)
    return infer_config(state_dict, naming)


def read_preprocessing(path: str | os.PathLike) -> hub.Preprocessing | None:
    """The input preprocessing the weights at ``path`` expect, as far as it is known: a Flax
    checkpoint's or run's own, timm's ``pretrained_cfg``, Hugging Face's
    ``preprocessor_config.json``; for a bare torchvision / timm / Hugging Face state_dict,
    the ImageNet constants those libraries train with (an assumption the ``source`` says);
    None for a bare ``torch_ref`` file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        kind = hub.dir_kind(path)
        if kind == "timm":
            cfg = hub.read_json(os.path.join(path, hub.CONFIG_FILE)).get("pretrained_cfg")
            return hub.from_timm_cfg(cfg, f"timm pretrained_cfg of {path}") if cfg else None
        if kind == "hf":
            pre = os.path.join(path, hub.HF_PREPROCESSOR_FILE)
            if os.path.isfile(pre):
                return hub.from_hf_preprocessor(hub.read_json(pre), pre)
            return hub.imagenet(f"ImageNet constants assumed for {path} (no "
                                f"{hub.HF_PREPROCESSOR_FILE})")
        own = os.path.join(path, PREPROCESSING_FILE)
        if os.path.isfile(own):
            return hub.Preprocessing.from_dict(hub.read_json(own))
        return None
    naming = detect_naming(_read_pytorch_file(path))
    if naming == "torch_ref":
        return None
    return hub.imagenet(f"ImageNet constants assumed for a {naming} state_dict ({path})")


def load(
    path: str | os.PathLike, step: int | None = None, *, dtype: Any = None,
    model: str | None = None, naming: str = "auto", **arch: Any,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Build and load the model saved in ``path``. Returns ``(model, config)`` with
    ``config`` the ``create_resnet`` keyword arguments; the model is in training mode like a
    fresh ``create_resnet`` (``model.eval()`` for inference).

    ``path``: a Flax checkpoint directory, a ``train.py`` run directory (latest checkpoint,
    or ``step``), a Hugging Face or timm model directory (the architecture from its
    ``config.json``), or a PyTorch state_dict file in any naming (the architecture inferred
    from its keys; ``model``: a torchvision / timm name, and ``arch``: ``ModelConfig``
    fields, for what the keys do not show). ``dtype``: the parameter and compute dtype
    (default float32; float64 needs ``jax.enable_x64``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if model is not None or any(v is not None for v in arch.values()):
            raise ConversionError(f"{path} is a saved model: its config.json fixes the "
                                  "architecture")
        config, state_dict = read_saved(path, step)
    else:
        if step is not None:
            raise ConversionError(f"step chooses a checkpoint of a train.py run; {path} is a file")
        state_dict, found = _read_any(path, naming)
        state_dict = to_torch_ref_names(state_dict, found)
        config = infer_config(state_dict, "torch_ref", model=model, **arch)
    if config.get("num_classes") is None:
        raise ConversionError(f"{path} holds a backbone without a classifier; build a model "
                              "and use load_pretrained(model, path) to add a fresh one")
    dtypes = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
    net = _abstract_model({**config, **dtypes})
    _load(net, state_dict, "torch_ref")
    return net, config


def load_flax(path: str | os.PathLike) -> tuple[nnx.Module, dict[str, Any]]:
    """:func:`load` of a Flax checkpoint directory (see :func:`save_flax`)."""
    return load(path)


# --- pretrained weights ------------------------------------------------------------------------


def _read_any(path: str, naming: str = "auto") -> tuple[dict[str, Any], str]:
    """(state_dict, its naming) of a PyTorch file or a saved model directory (a Flax
    checkpoint or a ``train.py`` run)."""
    _check_naming(naming, allow_auto=True)
    if os.path.isdir(path):
        return read_saved(path)[1], "torch_ref"
    state_dict = _read_pytorch_file(path)
    return state_dict, detect_naming(state_dict) if naming == "auto" else naming


def load_pretrained(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    naming: str = "auto",
) -> nnx.Module:
    """Initialise ``model`` in place from pretrained weights and return it.

    ``path``: a ``torch_ref`` or torchvision state_dict (``.pt``/``.pth``/``.bin``/
    ``.safetensors``; ``naming`` ``auto`` detects which), a Flax checkpoint directory or a
    ``train.py`` run directory (its latest checkpoint).
    Every backbone variable must match in name and shape. The classifier ``fc`` is loaded
    when its shape matches the model's; when it differs (e.g. torchvision's 1000 ImageNet
    classes into a 10-class model) or the file has none, the model keeps its freshly
    initialised ``fc``. ``num_classes``, when given, must equal the model's classifier size
    (a guard for callers that build the model elsewhere). Anything else that does not fit
    raises ``ConversionError`` naming the keys and shapes, and nothing is loaded.
    """
    path = os.fspath(path)
    out_features = int(model.fc.kernel.shape[-1])
    if num_classes is not None and num_classes != out_features:
        raise ConversionError(
            f"num_classes={num_classes} but the model's classifier has {out_features} outputs"
        )
    state_dict, naming = _read_any(path, naming)
    kept = _load(model, state_dict, naming, keep_classifier=True)
    if kept:
        log.warning(
            "%s: the classifier does not fit the model's %d classes (or the file has none): "
            "kept the model's freshly initialised %s",
            path, out_features, ", ".join(kept),
        )
    return model


# --- command line --------------------------------------------------------------------------------


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
LIBRARY_DIRS: tuple[str, ...] = ("hf", "timm")


def _is_dir_dst(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(os.sep) or not _suffix(path)


def _with_fresh_classifier(config: dict[str, Any], state_dict: Mapping[str, Any],
                           num_classes: int | None, src: str) -> nnx.Module:
    from flax_resnet.models import create_resnet

    if num_classes is None:
        raise ConversionError(f"{src} has no classifier (a backbone); give --num-classes N "
                              "for a freshly initialised one")
    config["num_classes"] = num_classes
    try:
        model = create_resnet(**config, rngs=nnx.Rngs(0))
    except ValueError as err:
        raise ConversionError(f"config {config} does not build a ResNet: {err}") from err
    _load(model, state_dict, "torch_ref", keep_classifier=True)
    return model


def convert(src: str, dst: str, *, naming: str = "auto", to_naming: str | None = None,
            step: int | None = None, model: str | None = None, **arch: Any
            ) -> tuple[nnx.Module, dict[str, Any], str]:
    """The command line's work: read ``src``, write ``dst``; returns (model, config, what was
    written: a naming, "flax", or "hf"/"timm" for a model directory)."""
    if not _is_dir_dst(dst) and _suffix(dst) not in PYTORCH_SUFFIXES:
        raise ConversionError(
            f"unknown weight file type {_suffix(dst)!r} for {dst}; a PyTorch DST is one of "
            f"{', '.join(PYTORCH_SUFFIXES)}, a Flax DST a directory (a path without suffix)"
        )
    num_classes = arch.pop("num_classes", None)
    if os.path.isdir(src):
        given = sorted(k for k, v in arch.items() if v is not None)
        if given or model:
            flags = [*(["--model"] if model else []), *("--" + k.replace("_", "-") for k in given)]
            raise ConversionError(
                f"{src} is a saved model; its config.json fixes the architecture, so "
                f"{', '.join(flags)} cannot apply"
            )
        config, state_dict = read_saved(src, step)
        src_naming, load_naming = hub.dir_kind(src) or "torch_ref", "torch_ref"
    else:
        if step is not None:
            raise ConversionError(f"--step chooses a checkpoint of a train.py run; {src} is a file")
        if _suffix(src) not in PYTORCH_SUFFIXES:
            raise ConversionError(
                f"unknown weight file type {_suffix(src)!r} for {src}; a PyTorch SRC is one of "
                f"{', '.join(PYTORCH_SUFFIXES)}, a Flax SRC a checkpoint directory"
            )
        state_dict, src_naming = _read_any(src, naming)
        load_naming = src_naming  # missing/unexpected keys are named as the file names them
        config = infer_config(state_dict, src_naming, model=model, num_classes=num_classes,
                              **arch)
    if config.get("num_classes") is None or num_classes is not None and \
            "fc.weight" not in to_torch_ref_names(state_dict, load_naming):
        net = _with_fresh_classifier(config, to_torch_ref_names(state_dict, load_naming),
                                     num_classes, src)
    else:
        net = _abstract_model(config)
        _load(net, state_dict, load_naming)
    preprocessing = read_preprocessing(src)
    out = to_naming or src_naming
    if _is_dir_dst(dst):
        if to_naming in LIBRARY_DIRS:
            save_library_dir(net, config, dst, to_naming, preprocessing)
            return net, config, to_naming
        if to_naming is not None:
            raise ConversionError(f"--to {to_naming} writes a file: give DST a suffix "
                                  f"({', '.join(PYTORCH_SUFFIXES)}); a directory DST is a Flax "
                                  f"checkpoint or, with --to hf / --to timm, that library's")
        save_flax(net, config, dst, preprocessing)
        return net, config, "flax"
    save_pytorch(net, dst, out)
    return net, config, out


def save_library_dir(model: nnx.Module, config: Mapping[str, Any], path: str | os.PathLike,
                     library: str, preprocessing: hub.Preprocessing | None = None) -> None:
    """Write ``model`` as a Hugging Face transformers directory (``library="hf"``:
    ``ResNetForImageClassification.from_pretrained(path)`` loads it) or a timm hub directory
    (``"timm"``: ``timm.create_model("local-dir:" + path, pretrained=True)``), with the
    weights' preprocessing when known. What the library cannot express is refused."""
    from flax_resnet.config import ModelConfig

    path = os.fspath(path)
    cfg = ModelConfig(**{k: v for k, v in config.items() if k not in ("dtype", "param_dtype")})
    if library == "hf":
        files = {hub.CONFIG_FILE: hub.hf_config(cfg)}
        if preprocessing is not None:
            files[hub.HF_PREPROCESSOR_FILE] = hub.to_hf_preprocessor(preprocessing)
    elif library == "timm":
        files = {hub.CONFIG_FILE: hub.timm_config(cfg, preprocessing)}
    else:
        raise ConversionError(f"unknown library {library!r}; allowed: {', '.join(LIBRARY_DIRS)}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"{path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    save_safetensors(model, os.path.join(path, hub.WEIGHT_FILES[0]), library)
    for name, content in files.items():
        text = json.dumps(content, indent=2) + "\n"
        _write_atomic(os.path.join(path, name), lambda tmp, t=text: _write_text(tmp, t))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    """``python -m flax_resnet.convert SRC DST [options]``; 0 on success, 2 on bad input."""
    args = _parser().parse_args(argv)
    arch = {k: getattr(args, k) for k in _ARCH_OPTIONS}
    try:
        if not os.path.exists(args.src):
            raise ConversionError(f"no such file or directory: {args.src}")
        _, config, written = convert(
            args.src, args.dst, naming=args.naming, to_naming=args.to_naming, step=args.step,
            model=args.model, **arch,
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
    from flax_resnet.convert import main as _main  # the package's copy, not this __main__ one

    sys.exit(_main())
