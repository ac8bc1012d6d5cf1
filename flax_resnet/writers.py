"""A model written as PyTorch files, Flax checkpoint directories and library directories.

*Flax checkpoint*: a directory holding ``state.msgpack`` (``flax.serialization.to_bytes`` of
``nnx.to_pure_dict(nnx.state(model))``), ``config.json`` (the ``create_resnet`` keyword
arguments) and, when known, ``preprocessing.json``. Every writer replaces its target only
once the new content is complete. Reading all of them back: ``flax_resnet.weights``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_resnet import library_configs as libs
from flax_resnet.namings import ConversionError
from flax_resnet.preprocessing import Preprocessing, to_hf_preprocessor
from flax_resnet.state_dict import (
    create_model,
    model_variables,
    to_numpy_state_dict,
    to_torch_state_dict,
)

TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin")
PYTORCH_SUFFIXES: tuple[str, ...] = (*TORCH_SUFFIXES, ".safetensors")
FLAX_STATE_FILE = "state.msgpack"
FLAX_CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
# where converted weights came from (``Weights.provenance``), beside a written directory's
# weights, so that a chain of conversions still names the first source
ORIGIN_FILE = "origin.json"
DTYPE_FIELDS: tuple[str, ...] = ("dtype", "param_dtype")


def suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def is_flax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, FLAX_STATE_FILE)) and os.path.isfile(
        os.path.join(path, FLAX_CONFIG_FILE)
    )


def _write_atomic(path: str, write: Callable[[str], Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - OSError, or safetensors' and torch's own kinds
        raise ConversionError(f"cannot write {path}: {type(err).__name__}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _json_text(content: Any, sort_keys: bool = False) -> str:
    return json.dumps(content, indent=2, sort_keys=sort_keys) + "\n"


# --- PyTorch files --------------------------------------------------------------------------


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
    kind = suffix(path)
    if kind == ".safetensors":
        save_safetensors(model, path, naming)
    elif kind in TORCH_SUFFIXES:
        import torch

        state_dict = to_torch_state_dict(model, naming)
        _write_atomic(path, lambda tmp: torch.save(state_dict, tmp))
    else:
        raise ConversionError(
            f"unknown weight file type {kind!r} for {path}; "
            f"allowed: {', '.join(PYTORCH_SUFFIXES)}"
        )


# --- Flax checkpoints ------------------------------------------------------------------------


def _json_config(config: Mapping[str, Any]) -> dict[str, Any]:
    from flax_resnet.config import MODEL_FIELDS

    unknown = sorted(set(config) - {*MODEL_FIELDS, *DTYPE_FIELDS})
    if unknown:
        raise ConversionError(f"config has keys create_resnet does not take: {unknown}")
    out = dict(config)
    for key in DTYPE_FIELDS:
        if out.get(key) is not None:
            out[key] = jnp.dtype(out[key]).name
    return out


def save_flax(model: nnx.Module, config: Mapping[str, Any], path: str | os.PathLike,
              preprocessing: Preprocessing | None = None,
              origin: Mapping[str, Any] | None = None) -> None:
    """Write a Flax checkpoint directory: ``state.msgpack``, ``config.json`` and, when
    given, the weights' ``preprocessing.json`` and ``origin.json``.

    ``config`` holds the ``create_resnet`` keyword arguments (less ``rngs``) that build
    ``model``; it is checked against the model's variables. The directory is written next to
    ``path`` and renamed into place, so ``path`` never holds half a checkpoint; an existing
    ``path`` must be empty or a Flax checkpoint (it is replaced).
    """
    import flax.serialization

    path = os.fspath(path).rstrip(os.sep) or os.sep
    config = _json_config(config)
    expected = {p: tuple(v.shape) for _, p, v in model_variables(create_model(config))}
    actual = {p: tuple(v.shape) for _, p, v in model_variables(model)}
    if expected != actual:
        diff = sorted(
            "/".join(map(str, p)) for p in set(expected) ^ set(actual)
            | {p for p in set(expected) & set(actual) if expected[p] != actual[p]}
        )
        raise ConversionError(f"config {config} does not describe the model: differs at {diff}")
    if os.path.exists(path) and not (
        os.path.isdir(path) and (not os.listdir(path) or is_flax_dir(path))
    ):
        raise ConversionError(f"{path} exists and is not a Flax checkpoint directory")
    data = flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, FLAX_STATE_FILE), "wb") as f:
            f.write(data)
        _write_text(os.path.join(tmp, FLAX_CONFIG_FILE), _json_text(config, sort_keys=True))
        if preprocessing is not None:
            _write_text(os.path.join(tmp, PREPROCESSING_FILE),
                        _json_text(preprocessing.to_dict()))
        if origin:
            _write_text(os.path.join(tmp, ORIGIN_FILE), _json_text(dict(origin)))
        if os.path.isdir(path) and os.listdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# --- Hugging Face and timm directories ------------------------------------------------------


def save_library_dir(model: nnx.Module, config: Mapping[str, Any], path: str | os.PathLike,
                     library: str, preprocessing: Preprocessing | None = None,
                     origin: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` as a Hugging Face transformers directory (``library="hf"``:
    ``ResNetForImageClassification.from_pretrained(path)`` loads it) or a timm hub directory
    (``"timm"``: ``timm.create_model("local-dir:" + path, pretrained=True)``), with the
    weights' preprocessing when known and ``origin.json`` when given. What the library
    cannot express is refused."""
    from flax_resnet.config import ModelConfig

    path = os.fspath(path)
    cfg = ModelConfig(**{k: v for k, v in config.items() if k not in DTYPE_FIELDS})
    if library == "hf":
        files = {libs.CONFIG_FILE: libs.hf_config(cfg)}
        if preprocessing is not None:
            files[libs.HF_PREPROCESSOR_FILE] = to_hf_preprocessor(preprocessing)
    elif library == "timm":
        files = {libs.CONFIG_FILE: libs.timm_config(cfg, preprocessing)}
    else:
        raise ConversionError(f"unknown library {library!r}; allowed: "
                              f"{', '.join(libs.LIBRARY_DIRS)}")
    if origin:
        files[ORIGIN_FILE] = dict(origin)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"{path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    save_safetensors(model, os.path.join(path, libs.WEIGHT_FILES[0]), library)
    for name, content in files.items():
        text = _json_text(content)
        _write_atomic(os.path.join(path, name), lambda tmp, t=text: _write_text(tmp, t))
