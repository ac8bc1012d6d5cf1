"""A model's variables as a PyTorch state_dict, and a state_dict into a model, strictly.

The Flax module tree mirrors ``torch_ref``'s, so a Flax variable path maps to a ``torch_ref``
state_dict key by dropping the ``layers`` level of ``nnx.Sequential`` and renaming the leaf;
only conv kernels (HWIO ↔ OIHW) and dense kernels ((in, out) ↔ (out, in)) change layout.
Every other naming (torchvision, timm, Hugging Face) is a map from torch_ref keys:
``flax_resnet.namings``. Files and directories: ``flax_resnet.weights`` (reading) and
``flax_resnet.writers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet import namings
from flax_resnet.namings import NAMINGS, ConversionError

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
CLASSIFIER_PREFIX = "fc."


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


def check_naming(naming: str, allow_auto: bool = False) -> None:
    allowed = ("auto", *NAMINGS) if allow_auto else NAMINGS
    if naming not in allowed:
        raise ConversionError(f"unknown naming {naming!r}; allowed: {', '.join(allowed)}")


def detect_naming(keys: Iterable[str]) -> str:
    """The naming of a state_dict (see ``flax_resnet.namings.detect_naming``)."""
    return namings.detect_naming(keys)


def refuse_unsupported(keys: Iterable[str]) -> None:
    if message := namings.unsupported_keys(keys):
        raise ConversionError(message)


def key_list(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    if len(keys) <= limit:
        return str(keys)
    return f"{keys[:limit]} and {len(keys) - limit} more"


def torch_ref_names(keys: Iterable[str], naming: str = "auto") -> tuple[str, dict[str, str]]:
    """(the naming, {key: its torch_ref key}) of a state_dict's keys; ``naming`` is theirs or
    ``auto``. Keys of an unsupported variant, or with no torch_ref name, raise
    ``ConversionError`` naming them."""
    check_naming(naming, allow_auto=True)
    keys = list(keys)
    refuse_unsupported(keys)
    if naming == "auto":
        naming = detect_naming(keys)
    renamed, unknown = namings.to_torch_ref(keys, naming)
    if unknown:
        raise ConversionError(f"unknown {naming} keys {key_list(unknown)}")
    return naming, renamed


def to_torch_ref_names(state_dict: Mapping[str, Any], naming: str = "auto") -> dict[str, Any]:
    """``state_dict`` with ``torch_ref`` keys; ``naming`` is its current naming or ``auto``.

    Keys that have no torch_ref name raise ``ConversionError`` naming them.
    """
    _, renamed = torch_ref_names(state_dict, naming)
    return {renamed[k]: v for k, v in state_dict.items()}


# --- layouts and variables ------------------------------------------------------------------


# Kernel axis orders by rank: conv HWIO -> OIHW and dense (in, out) -> (out, in), and back.
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}
_TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}


def _relayout(leaf: str, value: np.ndarray, axes: dict[int, tuple[int, ...]]) -> np.ndarray:
    if leaf == "kernel" and value.ndim in axes:
        return value.transpose(axes[value.ndim])
    return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """A Flax variable's value (its path ends in ``leaf``) in PyTorch's layout."""
    return _relayout(leaf, value, _TO_TORCH_AXES)


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """A PyTorch tensor's value in the layout of the Flax variable whose path ends in ``leaf``."""
    return _relayout(leaf, value, _TO_FLAX_AXES)


def model_variables(
    model: nnx.Module, naming: str = "torch_ref"
) -> Iterator[tuple[str, tuple[Any, ...], nnx.Variable]]:
    """(PyTorch key in ``naming``, Flax path, variable) for every Param and BatchStat."""
    check_naming(naming)
    found = [(torch_key(path), path, node) for path, node in nnx.iter_graph(model)
             if isinstance(node, (nnx.Param, nnx.BatchStat))]
    names = namings.from_torch_ref([k for k, _, _ in found], naming)
    for key, path, node in found:
        yield names[key], path, node


def flax_tree_to_state_dict(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The torch_ref state_dict of a nested dict of Flax variables (``nnx.to_pure_dict`` of
    a model's state; a raw checkpoint's ``{..., "value": array}`` leaves too)."""
    out = {}
    for path, value in _flatten(tree).items():
        if path[-1] == "value":
            path = path[:-1]
        out[torch_key(path)] = _to_torch_value(path[-1], np.asarray(value))
    return out


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def as_numpy(value: Any) -> np.ndarray:
    """A torch tensor or an array as a numpy array of its own (bfloat16 tensors as float32)."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    # Copy: JAX on CPU may alias a numpy buffer, and torch would keep mutating it in place.
    return np.array(value, copy=True)


# --- the strict load ------------------------------------------------------------------------


def create_model(config: Mapping[str, Any], rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The model ``config`` (``create_resnet``'s keyword arguments) builds: initialised from
    ``rngs``, or without them shapes for values (no random init), which loading every
    variable (:func:`load_state_dict`) makes concrete."""
    from flax_resnet.models import create_resnet

    kwargs = dict(config)
    for key in ("dtype", "param_dtype"):
        if kwargs.get(key) is not None:
            kwargs[key] = jnp.dtype(kwargs[key])
    try:
        if rngs is not None:
            return create_resnet(**kwargs, rngs=rngs)
        return nnx.eval_shape(lambda: create_resnet(**kwargs, rngs=nnx.Rngs(0)))
    except (TypeError, ValueError) as err:
        raise ConversionError(f"config {dict(config)} does not build a ResNet: {err}") from err


def load_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    naming: str,
    keep_classifier: bool = False,
) -> list[str]:
    """Check every key and shape, then copy; returns the model keys left as they were.

    ``naming``: the naming of ``state_dict``'s keys, which the errors use. With
    ``keep_classifier``, a classifier (``fc.*``) that is absent from ``state_dict`` or shaped
    differently from the model's is skipped instead of raising.
    """
    check_naming(naming)
    refuse_unsupported(state_dict)
    original = {k: k for k in state_dict}  # torch_ref key -> the key as the caller named it
    foreign: list[str] = []  # keys with no torch_ref name
    if naming != "torch_ref":
        renamed, foreign = namings.to_torch_ref(state_dict, naming)
        original = {ref: key for key, ref in renamed.items()}
        state_dict = {ref: state_dict[key] for key, ref in renamed.items()}
    targets = {key: (path, var) for key, path, var in model_variables(model)}
    kept: list[str] = []
    if keep_classifier:
        fc = [k for k in targets if k.startswith(CLASSIFIER_PREFIX)]
        fits = all(
            k in state_dict
            and to_flax_layout(targets[k][0][-1], as_numpy(state_dict[k])).shape
            == tuple(targets[k][1].shape)
            for k in fc
        )
        if not fits:
            kept = fc
            state_dict = {k: v for k, v in state_dict.items()
                          if not k.startswith(CLASSIFIER_PREFIX)}
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
            f"state_dict does not match the model: missing keys {key_list(missing)}, "
            f"unexpected keys {key_list(unexpected)}{hint}"
        )
    staged, bad = {}, []
    for key, (path, var) in targets.items():
        source = as_numpy(state_dict[key])
        value = to_flax_layout(path[-1], source)
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
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):  # from create_model without rngs
            var.set_value(staged[key])
        else:  # in place, keeping the variable's sharding
            var[...] = staged[key]
    return kept


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, Any], naming: str = "auto"
) -> nnx.Module:
    """Copy a PyTorch state_dict (tensors or arrays) into ``model`` in place.

    ``naming``: ``auto`` (default: detected from the keys, see :func:`detect_naming`),
    ``torch_ref``, ``torchvision``, ``timm`` or ``hf``.
    Every key must match: missing, unexpected and mis-shaped keys raise ``ConversionError``
    naming them (no partial load). Values are cast to each Flax variable's dtype.
    """
    check_naming(naming, allow_auto=True)
    if naming == "auto":
        naming = detect_naming(state_dict)
    load_state_dict(model, state_dict, naming)
    return model


# --- export ---------------------------------------------------------------------------------


def to_numpy_state_dict(model: nnx.Module, naming: str = "torch_ref") -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch-layout state_dict of numpy arrays, keys in ``naming``."""
    return {key: _to_torch_value(path[-1], np.asarray(var[...]))
            for key, path, var in model_variables(model, naming)}


def _to_torch_value(leaf: str, value: np.ndarray) -> np.ndarray:
    """A Flax variable's value as PyTorch holds it: its layout, and torch's int64 counter."""
    if leaf == "num_batches_tracked":
        value = value.astype(np.int64)
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d).
    return np.require(to_torch_layout(leaf, value), requirements="C")


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
