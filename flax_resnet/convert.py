"""Weights between PyTorch (``torch_ref`` or torchvision naming, NCHW) and ``flax_resnet``.

The Flax module tree mirrors ``torch_ref``'s, so a Flax variable path maps to a ``torch_ref``
state_dict key by dropping the ``layers`` level of ``nnx.Sequential`` and renaming the leaf;
only conv kernels (HWIO ↔ OIHW) and dense kernels ((in, out) ↔ (out, in)) change layout.

torchvision's ResNets (``torchvision.models.resnet18`` ... ``resnet152``) have the same
structure under other names; :func:`torchvision_key` / :func:`torch_ref_key` rename one key::

    torchvision                       torch_ref
    conv1.weight                      conv1.0.weight
    bn1.*                             conv1.1.*
    layer{i}.{j}.conv{k}.weight       conv{i+1}_x.{j}.residual_function.{3(k-1)}.weight
    layer{i}.{j}.bn{k}.*              conv{i+1}_x.{j}.residual_function.{3(k-1)+1}.*
    layer{i}.{j}.downsample.{n}.*     conv{i+1}_x.{j}.shortcut.{n}.*
    fc.*                              fc.*

(The ReLUs sit at indices 2 and 5 of ``residual_function``, so BasicBlock's conv2/bn2 are at
3/4 and BottleNeck's conv2/bn2/conv3/bn3 at 3/4/6/7: one rule serves both blocks.)

Files: PyTorch ``.pt``/``.pth``/``.bin``/``.safetensors`` state_dicts in either naming, and a
*Flax checkpoint*: a directory holding ``state.msgpack`` (``flax.serialization.to_bytes`` of
``nnx.to_pure_dict(nnx.state(model))``) and ``config.json`` (the JSON-able keyword arguments of
``create_resnet``), see :func:`save_flax` / :func:`load_flax`. The command line converts
between them::

    python -m flax_resnet.convert resnet18.pth resnet18_flax/        # torchvision -> Flax
    python -m flax_resnet.convert resnet18_flax/ out.safetensors --to-naming torchvision
"""

from __future__ import annotations

import argparse
import inspect
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

# ``python -m flax_resnet.convert``: the package imports this module before runpy runs it as
# ``__main__``, and runpy warns about exactly that. The duplicate is harmless: the ``__main__``
# copy only calls ``main`` of this, the canonical, module.
warnings.filterwarnings(
    "ignore", message=r"'flax_resnet\.convert' found in sys\.modules", category=RuntimeWarning
)

log = logging.getLogger(__name__)

NAMINGS: tuple[str, ...] = ("torch_ref", "torchvision")
TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin")
PYTORCH_SUFFIXES: tuple[str, ...] = (*TORCH_SUFFIXES, ".safetensors")
FLAX_STATE_FILE = "state.msgpack"
FLAX_CONFIG_FILE = "config.json"
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


class ConversionError(ValueError):
    """A state_dict does not fit the model: missing, unexpected or mis-shaped keys."""


# --- key names ----------------------------------------------------------------------------


def torch_key(path: tuple[Any, ...]) -> str:
    """The ``torch_ref`` state_dict key of a Flax variable path."""
    *parents, leaf = path
    if leaf not in _LEAF_TO_TORCH:
        raise ConversionError(f"no PyTorch name for Flax variable {'/'.join(map(str, path))}")
    names = [str(p) for p in parents if p != "layers"]
    return ".".join([*names, _LEAF_TO_TORCH[leaf]])


_REF_STEM = re.compile(r"conv1\.([01])\.(.+)")
_REF_BLOCK = re.compile(r"conv(\d+)_x\.(\d+)\.(residual_function|shortcut)\.(\d+)\.(.+)")
_TV_STEM = re.compile(r"(conv1|bn1)\.(.+)")
_TV_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(?:(conv|bn)(\d+)|downsample\.(\d+))\.(.+)")


def torchvision_key(key: str) -> str:
    """The torchvision name of a ``torch_ref`` state_dict key (see the module docstring)."""
    if key.startswith("fc."):
        return key
    if m := _REF_STEM.fullmatch(key):
        return f"{('conv1', 'bn1')[int(m[1])]}.{m[2]}"
    if m := _REF_BLOCK.fullmatch(key):
        stage, block, kind, index, rest = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}"
        index = int(index)
        if kind == "shortcut":
            return f"{prefix}.downsample.{index}.{rest}"
        if index % 3 != 2:  # 2 and 5 are ReLUs
            return f"{prefix}.{('conv', 'bn')[index % 3]}{index // 3 + 1}.{rest}"
    raise ConversionError(f"no torchvision name for torch_ref key {key!r}")


def torch_ref_key(key: str) -> str:
    """The ``torch_ref`` name of a torchvision state_dict key (inverse of torchvision_key)."""
    if key.startswith("fc."):
        return key
    if m := _TV_STEM.fullmatch(key):
        return f"conv1.{int(m[1] == 'bn1')}.{m[2]}"
    if m := _TV_BLOCK.fullmatch(key):
        stage, block, kind, k, downsample, rest = m.groups()
        prefix = f"conv{int(stage) + 1}_x.{block}"
        if downsample is not None:
            return f"{prefix}.shortcut.{downsample}.{rest}"
        if int(k) >= 1:
            return f"{prefix}.residual_function.{3 * (int(k) - 1) + (kind == 'bn')}.{rest}"
    raise ConversionError(f"no torch_ref name for torchvision key {key!r}")


def _check_naming(naming: str, allow_auto: bool = False) -> None:
    allowed = ("auto", *NAMINGS) if allow_auto else NAMINGS
    if naming not in allowed:
        raise ConversionError(f"unknown naming {naming!r}; allowed: {', '.join(allowed)}")


def _rename(key: str, naming: str) -> str:
    """A ``torch_ref`` key in ``naming``."""
    return key if naming == "torch_ref" else torchvision_key(key)


def detect_naming(keys: Any) -> str:
    """``torchvision`` if the keys use torchvision's names (``bn1.*``, ``layer1.*``, a bare
    ``conv1.weight``) and none of torch_ref's; otherwise ``torch_ref``."""
    keys = list(keys)
    torchvision = any(re.match(r"(bn1|layer\d+)\.", k) or k == "conv1.weight" for k in keys)
    torch_ref = any(re.match(r"conv1\.\d+\.|conv\d+_x\.", k) for k in keys)
    return "torchvision" if torchvision and not torch_ref else "torch_ref"


def to_torch_ref_names(state_dict: Mapping[str, Any], naming: str = "auto") -> dict[str, Any]:
    """``state_dict`` with ``torch_ref`` keys; ``naming`` is its current naming or ``auto``.

    Keys that have no torch_ref name raise ``ConversionError`` naming them.
    """
    _check_naming(naming, allow_auto=True)
    if naming == "auto":
        naming = detect_naming(state_dict)
    if naming == "torch_ref":
        return dict(state_dict)
    out, unknown = {}, []
    for key, value in state_dict.items():
        try:
            out[torch_ref_key(key)] = value
        except ConversionError:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"unknown torchvision keys {_key_list(unknown)}")
    return out


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
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Param, nnx.BatchStat)):
            yield _rename(torch_key(path), naming), path, node


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
    targets = {key: (path, var) for key, path, var in model_variables(model, naming)}
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
    unexpected = sorted(set(state_dict) - set(targets))
    if missing or unexpected:
        looks = detect_naming(state_dict)
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
                f"{key!r}: PyTorch {tuple(source.shape)} -> Flax {value.shape}, "
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
    """The shortest decimal ``w`` with ``round(b * w) == c`` for every stage (as
    ``create_resnet`` scales widths)."""
    pairs = [(b, c) for b, c in zip(base, channels, strict=False) if c is not None]
    if not pairs:
        raise ConversionError("cannot infer the width: no stage convs; set width (--width)")
    lo = max((c - 0.5) / b for b, c in pairs)
    hi = min((c + 0.5) / b for b, c in pairs)
    for digits in range(1, 8):
        for w in (round((lo + hi) / 2, digits), round(lo, digits), round(hi, digits)):
            if w > 0 and all(max(1, round(b * w)) == c for b, c in pairs):
                return w
    raise ConversionError(
        f"cannot infer the width: stage channels {[c for _, c in pairs]} are no multiple of "
        f"{[b for b, _ in pairs]}; set width (--width)"
    )


def infer_config(
    state_dict: Mapping[str, Any], naming: str = "auto", **overrides: Any
) -> dict[str, Any]:
    """``create_resnet`` keyword arguments that fit ``state_dict``.

    Inferred: ``depth`` (blocks per stage; BottleNeck when ``residual_function.6`` exists),
    ``stem`` (stem kernel 7 or 3), ``shortcut`` (B when projection shortcuts exist), ``norm``
    (``bn`` with running statistics, ``rms`` with ``.norm.weight``; the GroupNorm family —
    ``ln``/``gn``/``in`` — looks the same and needs ``norm=``), ``num_classes``, ``width``
    and ``in_channels``. Keyword ``overrides`` that are not None win; the result is not
    checked against every key (loading does that).
    """
    from flax_resnet.models import ARCHS
    from flax_resnet.norms import canonical_norm

    config = {k: v for k, v in overrides.items() if v is not None}
    sd = to_torch_ref_names(state_dict, naming)
    if "conv1.0.weight" not in sd or len(_shape(sd["conv1.0.weight"])) != 4:
        raise ConversionError("cannot infer the architecture: no 4-D stem conv 'conv1.0.weight'")
    stem_out, in_channels, kh, _ = _shape(sd["conv1.0.weight"])
    blocks: dict[int, set[int]] = {}
    for key in sd:
        if m := _REF_BLOCK.fullmatch(key):
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
    if "stem" not in config:
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
    if "num_classes" not in config:
        if "fc.weight" not in sd:
            raise ConversionError(
                "cannot infer num_classes: no 'fc.weight'; set num_classes (--num-classes)"
            )
        config["num_classes"] = _shape(sd["fc.weight"])[0]
    if "width" not in config:
        stage_out = [
            _shape(sd[k])[0] if (k := f"conv{s}_x.0.residual_function.0.weight") in sd else None
            for s in stages
        ]
        config["width"] = _infer_width(ARCHS[config["depth"]].stage_channels, stage_out)
    config.setdefault("in_channels", in_channels)
    return config


# --- Flax checkpoints ------------------------------------------------------------------------


def _create_kwargs() -> set[str]:
    from flax_resnet.models import create_resnet

    return set(inspect.signature(create_resnet).parameters) - {"rngs"}


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


def save_flax(model: nnx.Module, config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a Flax checkpoint directory: ``state.msgpack`` and ``config.json``.

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


def read_saved(
    path: str | os.PathLike, step: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The one reader of a saved model directory: a Flax checkpoint (:func:`save_flax`) or a
    ``train.py`` run directory (its latest checkpoint, or ``step``). Returns
    ``(create_resnet config, torch_ref state_dict)``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"no such directory: {path}")
    if _is_flax_dir(path):
        if step is not None:
            raise ConversionError(f"{path} is a Flax checkpoint: it has no steps to choose")
        config, flat = _read_flax(path)
        return config, _flax_to_torch_ref(flat)
    if _is_run_dir(path):
        return _read_run(path, step)
    raise ConversionError(
        f"{path} is neither a Flax checkpoint ({FLAX_STATE_FILE} + {FLAX_CONFIG_FILE}) nor a "
        f"train.py run directory ({RUN_CONFIG_FILE} + {RUN_CHECKPOINT_DIR}/)"
    )


def load(path: str | os.PathLike, step: int | None = None) -> tuple[nnx.Module, dict[str, Any]]:
    """Build and load the model saved in ``path``: a Flax checkpoint directory or a
    ``train.py`` run directory (latest checkpoint, or ``step``). Returns ``(model, config)``
    with ``config`` the ``create_resnet`` keyword arguments; the model is in training mode
    like a fresh ``create_resnet``."""
    config, state_dict = read_saved(path, step)
    model = _abstract_model(config)
    _load(model, state_dict, "torch_ref")
    return model, config


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
    p = argparse.ArgumentParser(
        prog="python -m flax_resnet.convert",
        description=(
            "Convert ResNet weights between PyTorch files (.pt/.pth/.bin/.safetensors, "
            "torch_ref or torchvision naming) and Flax checkpoint directories "
            f"({FLAX_STATE_FILE} + {FLAX_CONFIG_FILE}). The architecture is inferred from "
            "the keys and shapes; the options below fill in or override it."
        ),
    )
    p.add_argument(
        "src",
        help="a PyTorch weight file, a Flax checkpoint directory or a train.py --workdir",
    )
    p.add_argument(
        "dst",
        help="a .pt/.pth/.bin/.safetensors file, or a Flax checkpoint directory (no suffix)",
    )
    p.add_argument(
        "--naming", default="auto", choices=("auto", *NAMINGS),
        help="naming of a PyTorch SRC (default: detected)",
    )
    p.add_argument(
        "--to-naming", "--to", dest="to_naming", choices=NAMINGS,
        help="naming of a PyTorch DST (default: SRC's naming; torch_ref from a Flax SRC)",
    )
    p.add_argument("--step", type=int,
                   help="the checkpoint step of a train.py --workdir SRC (default: the latest)")
    p.add_argument("--depth", type=int, help="ResNet depth (inferred from the blocks per stage)")
    p.add_argument("--norm", help="bn, ln, gn, in or rms (bn and rms are inferred)")
    p.add_argument("--norm-groups", type=int, help="groups of norm gn (default 32)")
    p.add_argument("--stem", choices=("imagenet", "cifar"), help="(inferred from conv1's kernel)")
    p.add_argument("--shortcut", choices=("A", "B"), help="(inferred: B if projections exist)")
    p.add_argument("--num-classes", type=int, help="(inferred from fc.weight)")
    p.add_argument("--width", type=float, help="stage width multiplier (inferred from conv1)")
    return p


_ARCH_OPTIONS = ("depth", "norm", "norm_groups", "stem", "shortcut", "num_classes", "width")


def _is_flax_dst(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(os.sep) or not _suffix(path)


def convert(src: str, dst: str, *, naming: str = "auto", to_naming: str | None = None,
            step: int | None = None, **arch: Any) -> tuple[nnx.Module, dict[str, Any], str]:
    """The command line's work: read ``src``, write ``dst``; returns (model, config, naming
    written or "flax")."""
    if not _is_flax_dst(dst) and _suffix(dst) not in PYTORCH_SUFFIXES:
        raise ConversionError(
            f"unknown weight file type {_suffix(dst)!r} for {dst}; a PyTorch DST is one of "
            f"{', '.join(PYTORCH_SUFFIXES)}, a Flax DST a directory (a path without suffix)"
        )
    if os.path.isdir(src):
        given = sorted(k for k, v in arch.items() if v is not None)
        if given:
            raise ConversionError(
                f"{src} is a saved model; its config.json fixes the architecture, so "
                f"{', '.join('--' + k.replace('_', '-') for k in given)} cannot apply"
            )
        model, config = load(src, step)
        src_naming = "torch_ref"
    else:
        if step is not None:
            raise ConversionError(f"--step chooses a checkpoint of a train.py run; {src} is a file")
        if _suffix(src) not in PYTORCH_SUFFIXES:
            raise ConversionError(
                f"unknown weight file type {_suffix(src)!r} for {src}; a PyTorch SRC is one of "
                f"{', '.join(PYTORCH_SUFFIXES)}, a Flax SRC a checkpoint directory"
            )
        state_dict, src_naming = _read_any(src, naming)
        config = infer_config(state_dict, src_naming, **arch)
        model = _abstract_model(config)
        _load(model, state_dict, src_naming)
    if _is_flax_dst(dst):
        save_flax(model, config, dst)
        return model, config, "flax"
    out_naming = to_naming or src_naming
    save_pytorch(model, dst, out_naming)
    return model, config, out_naming


def main(argv: list[str] | None = None) -> int:
    """``python -m flax_resnet.convert SRC DST [options]``; 0 on success, 2 on bad input."""
    args = _parser().parse_args(argv)
    arch = {k: getattr(args, k) for k in _ARCH_OPTIONS}
    try:
        if not os.path.exists(args.src):
            raise ConversionError(f"no such file or directory: {args.src}")
        _, config, written = convert(
            args.src, args.dst, naming=args.naming, to_naming=args.to_naming, step=args.step,
            **arch,
        )
    except (ValueError, OSError) as err:  # ConversionError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = "Flax checkpoint" if written == "flax" else f"{written} state_dict"
    summary = ", ".join(f"{k}={v}" for k, v in sorted(config.items()))
    print(f"wrote {args.dst} ({kind}; {summary})")
    return 0


if __name__ == "__main__":
    from flax_resnet.convert import main as _main  # the package's copy, not this __main__ one

    sys.exit(_main())
