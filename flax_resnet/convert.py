"""Weights between ``torch_ref`` (PyTorch, NCHW) and ``flax_resnet`` (Flax NNX, NHWC).

The Flax module tree mirrors the PyTorch one, so a Flax variable path maps to a PyTorch
state_dict key by dropping the ``layers`` level of ``nnx.Sequential`` and renaming the leaf;
only conv kernels (HWIO ↔ OIHW) and dense kernels ((in, out) ↔ (out, in)) change layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def torch_key(path: tuple[Any, ...]) -> str:
    """The PyTorch state_dict key of a Flax variable path."""
    *parents, leaf = path
    if leaf not in _LEAF_TO_TORCH:
        raise ConversionError(f"no PyTorch name for Flax variable {'/'.join(map(str, path))}")
    names = [str(p) for p in parents if p != "layers"]
    return ".".join([*names, _LEAF_TO_TORCH[leaf]])


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def model_variables(model: nnx.Module) -> Iterator[tuple[str, tuple[Any, ...], nnx.Variable]]:
    """(torch key, Flax path, variable) for every Param and BatchStat of ``model``."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Param, nnx.BatchStat)):
            yield torch_key(path), path, node


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    # Copy: JAX on CPU may alias a numpy buffer, and torch would keep mutating it in place.
    return np.array(value, copy=True)


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Copy a ``torch_ref`` state_dict (tensors or arrays) into ``model`` in place.

    Every key must match: missing, unexpected and mis-shaped keys raise ``ConversionError``
    naming them (no partial load). Values are cast to each Flax variable's dtype.
    """
    targets = {key: (path, var) for key, path, var in model_variables(model)}
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    if missing or unexpected:
        raise ConversionError(
            f"state_dict does not match the model: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    staged = {}
    for key, (path, var) in targets.items():
        value = _to_flax_layout(path[-1], _as_numpy(state_dict[key]))
        if value.shape != var.shape:
            raise ConversionError(
                f"shape mismatch for {key!r}: PyTorch {tuple(_as_numpy(state_dict[key]).shape)} "
                f"-> Flax {value.shape}, model expects Flax {tuple(var.shape)}"
            )
        staged[key] = jnp.asarray(value, dtype=var.dtype)
    for key, (_, var) in targets.items():
        var[...] = staged[key]
    return model


def to_numpy_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch-layout state_dict of numpy arrays."""
    out = {}
    for key, path, var in model_variables(model):
        value = np.asarray(var[...])
        if path[-1] == "num_batches_tracked":
            value = value.astype(np.int64)
        out[key] = np.ascontiguousarray(_to_torch_layout(path[-1], value))
    return out


def to_torch_state_dict(model: nnx.Module) -> dict[str, Any]:
    """The model's weights as a ``torch_ref`` state_dict of torch tensors."""
    import torch

    return {k: torch.from_numpy(v.copy()) for k, v in to_numpy_state_dict(model).items()}


def load_torch_checkpoint(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Load a ``.pt``/``.pth`` (a state_dict, or a dict holding one under ``state_dict`` or
    ``model``) or a ``.safetensors`` file into ``model``."""
    return load_torch_state_dict(model, read_state_dict(path))


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state_dict from ``.pt``/``.pth``/``.safetensors`` without building a model."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    if suffix in (".pt", ".pth", ".bin"):
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


def save_safetensors(model: nnx.Module, path: str | os.PathLike) -> None:
    """Write the model as a PyTorch-layout ``.safetensors`` file, atomically."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(to_numpy_state_dict(model), tmp)
    os.replace(tmp, path)
