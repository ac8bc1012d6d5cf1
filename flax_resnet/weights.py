"""Any weights source, read once into one object: ``resolve(source) -> Weights``.

A ``Weights`` holds what a source says about its weights as one thing, like torchvision's
weights entries: the architecture (``ModelConfig`` fields), the tensors (a ``torch_ref``
state_dict in PyTorch's layouts), the input preprocessing they expect and where they came
from. Sources, by ``kind``:

* ``file``: a PyTorch state_dict (``.pt``/``.pth``/``.bin``: ``torch.save`` of a state_dict,
  or of a dict holding one under ``state_dict`` or ``model``; ``.safetensors``) in any naming
  (``torch_ref``, ``torchvision``, ``timm``, ``hf``); the architecture is inferred from its
  keys (``flax_resnet.architecture``).
* ``flax``: a Flax checkpoint directory (``flax_resnet.writers.save_flax``).
* ``run``: a ``train.py`` run directory (``config.json`` + ``checkpoints/<step>/``): its
  latest checkpoint, or ``step``; only the parameters and batch statistics are used.
* ``hf``: a Hugging Face ``save_pretrained`` directory; ``timm``: a timm ``save_for_hf``
  directory (``flax_resnet.library_configs``).

A published name (``hf-hub:ORG/NAME[@REVISION]``, ``torchvision:resnet50.IMAGENET1K_V2``, or
``ORG/NAME`` where no such path exists) is fetched once into its library's cache and read as
the directory or file it is there (``flax_resnet.named_weights``); ``Weights.origin`` records
what it resolved to. Each kind is one entry of ``_KINDS``: where a source is found
(:func:`_locate`) and how it is read. ``flax_resnet.load`` and :func:`load_pretrained` are
thin layers over :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from flax import nnx

from flax_resnet import library_configs as libs
from flax_resnet import named_weights
from flax_resnet.architecture import infer_config
from flax_resnet.config import MODEL_FIELDS, ModelConfig
from flax_resnet.namings import ConversionError
from flax_resnet.preprocessing import (
    Preprocessing,
    from_hf_preprocessor,
    from_timm_cfg,
    imagenet,
)
from flax_resnet.state_dict import (
    CLASSIFIER_PREFIX,
    as_numpy,
    create_model,
    flax_tree_to_state_dict,
    load_state_dict,
    torch_ref_names,
)
from flax_resnet.writers import (
    DTYPE_FIELDS,
    FLAX_CONFIG_FILE,
    FLAX_STATE_FILE,
    ORIGIN_FILE,
    PREPROCESSING_FILE,
    PYTORCH_SUFFIXES,
    TORCH_SUFFIXES,
    is_flax_dir,
    suffix,
)

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"  # a train.py run directory: config.json + checkpoints/<step>/
RUN_CHECKPOINT_DIR = "checkpoints"
KINDS: tuple[str, ...] = ("file", "flax", "run", "hf", "timm")


class FixedArchitectureError(ConversionError):
    """Architecture fields given for a source whose own config states the architecture."""

    def __init__(self, description: str, fields: list[str]):
        self.description, self.fields = description, fields
        super().__init__(f"{description} states its architecture (its config.json), so "
                         f"{', '.join(fields)} cannot apply")


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def _read_only(value: np.ndarray) -> np.ndarray:
    view = value.view()  # the caller's own array stays writable
    view.setflags(write=False)
    return view


@dataclasses.dataclass(frozen=True, eq=False)
class Weights:
    """Weights as read from ``source``; immutable (mappings are read-only views, arrays
    read-only). ``config``: the ``ModelConfig`` fields (``num_classes`` None for a headless
    backbone): the source's own, or inferred from the keys on first use, so that weights
    whose keys do not show the whole architecture (a GroupNorm file) still load into a model
    built elsewhere (:meth:`load_into`)."""

    source: str  # what the caller passed
    description: str  # "timm directory /x", "train.py run /w, step 16", ...
    state_dict: Mapping[str, np.ndarray] = dataclasses.field(repr=False)  # torch_ref names
    preprocessing: Preprocessing | None
    kind: str  # one of KINDS
    naming: str = "torch_ref"  # the naming of the source's own keys
    step: int | None = None  # the checkpoint step of a run
    dtypes: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # a Flax checkpoint's
    # torch_ref key -> the key as the source names it, where they differ (for errors)
    source_keys: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    # the source's own config; None: inferred from the keys
    stated_config: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False)
    hints: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # model=, fields=
    # a published name's resolution: Hub repo_id and commit, or torchvision's url and sha256
    origin: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # the local file or directory read: ``source`` itself, or a published name's cached copy
    path: str = ""

    def __post_init__(self) -> None:
        for name in ("dtypes", "source_keys", "hints", "origin"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        object.__setattr__(self, "state_dict", _frozen(
            {k: _read_only(np.asarray(v)) for k, v in self.state_dict.items()}))
        if self.stated_config is not None:
            object.__setattr__(self, "stated_config", _frozen(self.stated_config))

    @functools.cached_property
    def config(self) -> Mapping[str, Any]:
        """The ``ModelConfig`` fields of the weights (``ConversionError`` when the keys do not
        show them all and no hint said the rest)."""
        if self.stated_config is not None:
            return self.stated_config
        hints = dict(self.hints)
        wanted = hints.get("num_classes")
        if wanted is not None and self.classifier_size not in (None, wanted):
            raise ConversionError(
                f"num_classes={wanted}, but the classifier of {self.description} has "
                f"{self.classifier_size} outputs; build(num_classes={wanted}) gives a fresh one")
        try:
            return _frozen(infer_config(self.state_dict, "torch_ref", **hints))
        except ConversionError as err:
            raise ConversionError(f"{self.description}: {err}") from None

    @property
    def classifier_size(self) -> int | None:
        """The outputs of the weights' classifier; None for a headless backbone."""
        fc = self.state_dict.get(CLASSIFIER_PREFIX + "weight")
        return None if fc is None else int(fc.shape[0])

    def create_kwargs(self, num_classes: int | None = None, dtype: Any = None) -> dict[str, Any]:
        """``create_resnet``'s keyword arguments (less ``rngs``) for these weights: the config,
        ``num_classes`` when given, and ``dtype`` (else the dtypes a Flax checkpoint saved)."""
        wanted = self.config.get("num_classes") if num_classes is None else num_classes
        if wanted is None:
            raise self._headless()
        dtypes = {k: v for k, v in self.dtypes.items() if v is not None} if dtype is None \
            else {"dtype": dtype, "param_dtype": dtype}
        return {**self.config, "num_classes": wanted, **dtypes}

    def model_config(self, **overrides: Any) -> ModelConfig:
        """The ``ModelConfig`` of the weights, with ``overrides``."""
        fields = {**self.config, **overrides}
        if fields.get("num_classes") is None:
            raise self._headless()
        try:
            return ModelConfig(**fields)
        except (TypeError, ValueError) as err:
            raise ConversionError(f"the config of {self.description} {fields} is no "
                                  f"ModelConfig: {err}") from None

    def provenance(self) -> dict[str, Any]:
        """Where these weights came from, as converted weights (``origin.json``) and runs
        (``init_from.json``) record it: a published name's resolution (``origin``: Hub repo
        and commit, or torchvision's URL and SHA-256), else the local path with the SHA-256
        of its weight file (and a run's step)."""
        if self.origin:
            return json.loads(json.dumps(dict(self.origin)))
        path = os.path.abspath(self.path or self.source)
        out: dict[str, Any] = {"source": self.kind, "path": path}
        weight_file = {"file": path, "flax": os.path.join(path, FLAX_STATE_FILE)}.get(
            self.kind) or (_library_weights_file(path) if self.kind in libs.LIBRARY_DIRS
                           else None)
        if weight_file is not None:
            out["sha256"] = named_weights.sha256_of(weight_file)
        if self.step is not None:
            out["step"] = self.step
        return out

    def build(self, *, dtype: Any = None, num_classes: int | None = None,
              rngs: nnx.Rngs | None = None) -> nnx.Module:
        """The model of these weights, loaded, in training mode like a fresh
        ``create_resnet`` (``model.eval()`` for inference). With a ``num_classes`` that the
        weights' classifier does not have, or weights without one, the classifier is freshly
        initialised from ``rngs`` (default ``nnx.Rngs(0)``); ``dtype``: the parameter and
        compute dtype (default float32, or what a Flax checkpoint saved)."""
        kwargs = self.create_kwargs(num_classes, dtype)
        if kwargs["num_classes"] == self.classifier_size:
            model = create_model(kwargs)  # shapes only: every variable is loaded
            load_state_dict(model, self._as_stored(), self.naming)
        else:
            model = create_model(kwargs, rngs if rngs is not None else nnx.Rngs(0))
            load_state_dict(model, self._as_stored(), self.naming, keep_classifier=True)
        return model

    def load_into(self, model: nnx.Module, reset_classifier: bool = False) -> list[str]:
        """Load the weights into ``model`` in place: every backbone variable must match in
        name and shape (``ConversionError`` naming what does not, and nothing is loaded); the
        classifier is loaded when it fits, else (and always with ``reset_classifier``) the
        model's is kept. Returns the keys kept."""
        stored = self._as_stored(skip_classifier=reset_classifier)
        kept = load_state_dict(model, stored, self.naming, keep_classifier=True)
        if kept and not reset_classifier:
            log.warning(
                "%s: the classifier does not fit the model's %d classes (or the weights have "
                "none): kept the model's freshly initialised %s",
                self.source, int(model.fc.kernel.shape[-1]), ", ".join(kept),
            )
        return kept

    def _headless(self) -> ConversionError:
        return ConversionError(f"{self.description} holds a backbone without a classifier; "
                               "give num_classes for a freshly initialised one")

    def _as_stored(self, skip_classifier: bool = False) -> dict[str, np.ndarray]:
        """The state_dict under the source's own names, which errors then say."""
        return {self.source_keys.get(k, k): v for k, v in self.state_dict.items()
                if not (skip_classifier and k.startswith(CLASSIFIER_PREFIX))}


# --- finding a source -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Location:
    kind: str
    path: str
    config_json: Any = None  # a directory's config.json, parsed
    named: named_weights.Named | None = None  # the published name it was fetched for


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from None


def _locate(source: str) -> _Location:
    named = named_weights.locate(source)  # a published name: its cached copy, fetched once
    if named is not None:
        return dataclasses.replace(_locate(named.path), named=named)
    if os.path.isfile(source):
        return _Location("file", source)
    if not os.path.isdir(source):
        raise ConversionError(f"no such file or directory: {source}")
    config_path = os.path.join(source, libs.CONFIG_FILE)
    config_json = read_json(config_path) if os.path.isfile(config_path) else None
    library = libs.library_of(config_json)
    if library is None and is_flax_dir(source):
        return _Location("flax", source, config_json)
    if config_json is not None and os.path.isdir(os.path.join(source, RUN_CHECKPOINT_DIR)):
        return _Location("run", source, config_json)
    if library is not None:
        return _Location(library, source, config_json)
    raise ConversionError(
        f"{source} is neither a Flax checkpoint ({FLAX_STATE_FILE} + {FLAX_CONFIG_FILE}), a "
        f"train.py run directory ({RUN_CONFIG_FILE} + {RUN_CHECKPOINT_DIR}/), a Hugging Face "
        f"model directory nor a timm one ({libs.CONFIG_FILE} + one of "
        f"{', '.join(libs.WEIGHT_FILES)})"
    )


# --- state_dict files -----------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state_dict from ``.pt``/``.pth``/``.bin``/``.safetensors`` without building a
    model (torch tensors or numpy arrays, keys as stored)."""
    path = os.fspath(path)
    kind = suffix(path)
    if kind == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    if kind in TORCH_SUFFIXES:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{path}: expected a state_dict, found {type(obj).__name__}")
        return dict(obj)
    raise ConversionError(
        f"unknown weight file type {kind!r} for {path}; allowed: {', '.join(PYTORCH_SUFFIXES)} "
        "(a Flax checkpoint, a train.py run and a Hugging Face or timm model are directories)"
    )


def _read_pytorch_file(path: str, naming: str) -> tuple[str, dict[str, np.ndarray], dict]:
    """(its naming, torch_ref state_dict, {torch_ref key: stored key} where they differ) of
    a state_dict file; every failure is a ConversionError, and ``module.`` is stripped."""
    try:
        stored = read_state_dict(path)
    except ConversionError:
        raise
    except Exception as err:  # torch/safetensors raise many kinds on a corrupt file
        raise ConversionError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if stored and all(k.startswith("module.") for k in stored):  # DataParallel / DDP
        stored = {k[len("module."):]: v for k, v in stored.items()}
    found, renamed = torch_ref_names(stored, naming)
    state_dict = {renamed[k]: as_numpy(v) for k, v in stored.items()}
    return found, state_dict, {ref: key for key, ref in renamed.items() if ref != key}


def _read_file(at: _Location, step: int | None, naming: str, hints: dict[str, Any]) -> Weights:
    found, state_dict, source_keys = _read_pytorch_file(at.path, naming)
    # torchvision, timm and Hugging Face train their ImageNet weights on these constants
    preprocessing = None if found == "torch_ref" else imagenet(
        f"ImageNet constants assumed for a {found} state_dict ({at.path})")
    return Weights(at.path, f"{found}-named state_dict {at.path}", state_dict,
                   preprocessing, "file", naming=found, source_keys=source_keys, hints=hints)


# --- directories ------------------------------------------------------------------------------


def _own_preprocessing(path: str) -> Preprocessing | None:
    own = os.path.join(path, PREPROCESSING_FILE)
    return Preprocessing.from_dict(read_json(own)) if os.path.isfile(own) else None


def _read_flax(at: _Location, step: int | None, naming: str, hints: dict[str, Any]) -> Weights:
    import flax.serialization

    state_path = os.path.join(at.path, FLAX_STATE_FILE)
    try:
        with open(state_path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
    except Exception as err:
        raise ConversionError(f"cannot read {state_path}: {type(err).__name__}: {err}") from err
    if not isinstance(at.config_json, dict) or not isinstance(state, dict):
        raise ConversionError(f"cannot read {at.path}: malformed {FLAX_CONFIG_FILE} or state")
    config = {k: v for k, v in at.config_json.items() if k not in DTYPE_FIELDS}
    dtypes = {k: v for k, v in at.config_json.items() if k in DTYPE_FIELDS}
    return Weights(at.path, f"Flax checkpoint {at.path}",
                   flax_tree_to_state_dict(state), _own_preprocessing(at.path),
                   "flax", dtypes=dtypes, stated_config=config)


def _read_run(at: _Location, step: int | None, naming: str, hints: dict[str, Any]) -> Weights:
    from flax_resnet.checkpoint import Checkpointer

    model = at.config_json.get("model") if isinstance(at.config_json, dict) else None
    if not isinstance(model, dict):
        raise ConversionError(f"{at.path}/{RUN_CONFIG_FILE} has no \"model\" section: it is "
                              "not the config of a train.py run")
    config = {k: v for k, v in model.items() if k in MODEL_FIELDS}
    absl = logging.getLogger("absl")  # Orbax's read-only notes are not the user's business
    level = absl.level
    absl.setLevel(logging.ERROR)
    ckpt = Checkpointer(os.path.join(at.path, RUN_CHECKPOINT_DIR), read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConversionError(f"{at.path} is a run directory without any checkpoint yet")
        if step is not None and step not in steps:
            raise ConversionError(
                f"{at.path} has no checkpoint of step {step}; it has steps "
                f"{', '.join(map(str, sorted(steps)))}"
            )
        step = max(steps) if step is None else step
        try:
            state, _ = ckpt.restore_raw(step)
        except Exception as err:
            raise ConversionError(
                f"cannot read the checkpoint of step {step} in {at.path}: "
                f"{type(err).__name__}: {err}"
            ) from err
    finally:
        ckpt.close()
        absl.setLevel(level)
    state_dict = {**flax_tree_to_state_dict(state.get("params", {})),
                  **flax_tree_to_state_dict(state.get("batch_stats", {}))}
    if CLASSIFIER_PREFIX + "bias" not in state_dict:
        raise ConversionError(f"the checkpoint in {at.path} holds no classifier (fc.bias)")
    config["num_classes"] = int(state_dict[CLASSIFIER_PREFIX + "bias"].shape[0])
    return Weights(at.path, f"train.py run {at.path}, step {step}", state_dict,
                   _own_preprocessing(at.path), "run", step=step, stated_config=config)


def _library_weights_file(path: str) -> str:
    for name in libs.WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ConversionError(f"{path} holds no weights: none of {', '.join(libs.WEIGHT_FILES)} "
                          "(a sharded checkpoint is not supported)")


def _library_preprocessing(at: _Location) -> Preprocessing | None:
    if at.kind == "timm":
        cfg = at.config_json.get("pretrained_cfg")
        return from_timm_cfg(cfg, f"timm pretrained_cfg of {at.path}") if cfg else None
    pre = os.path.join(at.path, libs.HF_PREPROCESSOR_FILE)
    if os.path.isfile(pre):
        return from_hf_preprocessor(read_json(pre), pre)
    return imagenet(f"ImageNet constants assumed for {at.path} (no {libs.HF_PREPROCESSOR_FILE})")


def _read_library(at: _Location, step: int | None, naming: str,
                  hints: dict[str, Any]) -> Weights:
    """A Hugging Face or timm directory: the architecture from its config.json, completed
    and checked from its keys."""
    found, state_dict, source_keys = _read_pytorch_file(_library_weights_file(at.path), at.kind)
    fields = libs.hf_model_fields(at.config_json) if at.kind == "hf" else \
        libs.timm_model_fields(at.config_json)[1]
    if CLASSIFIER_PREFIX + "weight" not in state_dict:  # a ResNetModel / ResNetBackbone
        fields.pop("num_classes", None)
    config = infer_config(state_dict, "torch_ref", **fields)
    library = "Hugging Face" if at.kind == "hf" else "timm"
    return Weights(at.path, f"{library} directory {at.path}", state_dict,
                   _library_preprocessing(at), at.kind, naming=found, source_keys=source_keys,
                   stated_config=config)


# --- the resolver -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kind:
    what: str  # for messages: "a state_dict file"
    read: Callable[[_Location, int | None, str, dict[str, Any]], Weights]
    takes_step: bool = False  # a checkpoint step chooses among its weights
    takes_architecture: bool = False  # model= and fields fill in what it does not state


_KINDS: dict[str, _Kind] = {
    "file": _Kind("a state_dict file", _read_file, takes_architecture=True),
    "flax": _Kind("a Flax checkpoint", _read_flax),
    "run": _Kind("a train.py run directory", _read_run, takes_step=True),
    "hf": _Kind("a Hugging Face model directory", _read_library),
    "timm": _Kind("a timm model directory", _read_library),
}


def resolve(source: str | os.PathLike, *, step: int | None = None, naming: str = "auto",
            model: str | None = None, **fields: Any) -> Weights:
    """The weights at ``source`` (see the module docstring for every kind), each file read
    once. ``step``: a run's checkpoint (default: the latest). ``naming``: a state_dict
    file's naming (default: detected from its keys). ``model`` (a torchvision / timm name)
    and ``fields`` (``ModelConfig`` fields; None means not given): for a state_dict file,
    what its keys do not show; a directory states its own architecture."""
    source = os.fspath(source)
    at = _locate(source)
    kind = _KINDS[at.kind]
    given = {k: v for k, v in fields.items() if v is not None}
    if step is not None and not kind.takes_step:
        raise ConversionError(f"step {step} chooses a checkpoint of a train.py run; {source} "
                              f"is {kind.what}")
    if not kind.takes_architecture and (given or model is not None):
        names = [*(["model"] if model is not None else []), *sorted(given)]
        raise FixedArchitectureError(f"{source} ({kind.what})", names)
    hints = {**given, **({"model": model} if model is not None else {})}
    weights = kind.read(at, step, naming, hints)
    recorded = os.path.join(at.path, ORIGIN_FILE)
    if os.path.isdir(at.path) and os.path.isfile(recorded):  # converted before: the first source
        origin = read_json(recorded)
        if not isinstance(origin, dict):
            raise ConversionError(f"{recorded} is no JSON object of where the weights came "
                                  "from; remove it or write it again with the converter")
        weights = dataclasses.replace(weights, origin=origin)
    if at.named is not None:
        weights = at.named.apply(weights)
    return dataclasses.replace(weights, source=source, path=at.path)


# --- the thin layers --------------------------------------------------------------------------


def load(
    path: str | os.PathLike, step: int | None = None, *, dtype: Any = None,
    model: str | None = None, naming: str = "auto", **arch: Any,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Build and load the model saved in ``path``. Returns ``(model, config)`` with
    ``config`` the ``create_resnet`` keyword arguments; the model is in training mode like a
    fresh ``create_resnet`` (``model.eval()`` for inference).

    ``path``: any source :func:`resolve` reads; ``step``, ``naming``, ``model`` and ``arch``
    as there. ``dtype``: the parameter and compute dtype (default float32; float64 needs
    ``jax.enable_x64``).
    """
    weights = resolve(path, step=step, naming=naming, model=model, **arch)
    net = weights.build(dtype=dtype)
    return net, {**weights.config, **weights.dtypes}


def load_pretrained(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    naming: str = "auto",
) -> nnx.Module:
    """Initialise ``model`` in place from pretrained weights (any source :func:`resolve`
    reads) and return it: :meth:`Weights.load_into`. ``num_classes``, when given, must equal
    the model's classifier size (a guard for callers that build the model elsewhere)."""
    out_features = int(model.fc.kernel.shape[-1])
    if num_classes is not None and num_classes != out_features:
        raise ConversionError(
            f"num_classes={num_classes} but the model's classifier has {out_features} outputs"
        )
    resolve(path, naming=naming).load_into(model)
    return model
