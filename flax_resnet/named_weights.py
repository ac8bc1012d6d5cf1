"""Weights by published name, fetched once into the libraries' own caches.

* ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION`` (a branch, tag or commit): a Hugging
  Face transformers ResNet (``microsoft/resnet-50``) or a timm one (``timm/resnet50.a1_in1k``)
  on the Hugging Face Hub. ``config.json`` comes first (a repository that is no ResNet is
  refused before any weights are fetched), then one weight file (``model.safetensors``, else
  ``pytorch_model.bin``) and ``preprocessor_config.json`` where there is one, all of the
  same commit, through ``huggingface_hub.hf_hub_download`` into its standard cache
  (``HF_HUB_CACHE``, else ``HF_HOME/hub``; ``HF_HUB_OFFLINE=1``: the cache only;
  ``HF_ENDPOINT``: another Hub). A file in the cache is never fetched again.
* ``torchvision:MODEL.ENTRY`` (``torchvision:resnet50.IMAGENET1K_V2``; ``torchvision:MODEL``:
  its ``DEFAULT``): an entry of torchvision's weights enums for its ResNets, ResNeXts and Wide
  ResNets. URL, file name and preprocessing come from torchvision (needed for these names);
  the file goes to torch.hub's ``checkpoints/`` directory (``torch.hub.get_dir()``,
  ``TORCH_HOME``) and is checked against the SHA-256 prefix in its name (``-<hash8>.pth``, as
  ``torch.hub.check_hash`` does), after a download and whenever it is found there.
* Without a prefix, an existing path is a path, and an ``ORG/NAME`` that is none is a Hub name.

:func:`locate` turns a name into the local file or directory it stands for, which
``flax_resnet.weights.resolve`` then reads as it reads any path; the :class:`Named` it returns
adds to the ``Weights`` what the name says: ``origin`` (Hub repository and commit, or URL and
SHA-256), a description that starts with the pinned name, and torchvision's preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flax_resnet import library_configs as libs
from flax_resnet.namings import ConversionError
from flax_resnet.preprocessing import Preprocessing

if TYPE_CHECKING:
    from flax_resnet.weights import Weights

HF_PREFIX = "hf-hub:"
TORCHVISION_PREFIX = "torchvision:"
# The torchvision models flax_resnet builds (docs/interop.md).
TORCHVISION_MODELS: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
# torch.hub's HASH_REGEX: the SHA-256 prefix in a published file name, "resnet50-11ad3fa6.pth"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
# A bare Hub name: one slash, no leading "." or "/", optionally @REVISION.
_BARE_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")  # a missing file, not a Hub name


class NamedWeightsError(ConversionError):
    """A published name that cannot be turned into weights on this machine."""


class NotCachedError(NamedWeightsError):
    """The weights are not in the cache and cannot be fetched (offline, or no network)."""


class NotFoundError(NamedWeightsError):
    """No such repository, revision or file where the name points."""


class ChecksumError(NamedWeightsError):
    """A file whose SHA-256 does not match the prefix its name carries."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


@dataclasses.dataclass(frozen=True)
class Named:
    """What a published name stands for on this machine."""

    name: str  # pinned: hf-hub:ORG/NAME@<commit>, torchvision:resnet50.IMAGENET1K_V2
    path: str  # the cached file or directory the resolver reads
    origin: Mapping[str, Any]  # recorded with the weights (``Weights.origin``)
    preprocessing: Preprocessing | None = None  # overrides what the files say (torchvision)

    def apply(self, weights: Weights) -> Weights:
        """``weights`` (read from ``path``) as weights of this name."""
        pre = self.preprocessing or weights.preprocessing
        if self.preprocessing is None and pre is not None:
            # "timm pretrained_cfg of <cache path>" -> "... of hf-hub:ORG/NAME@<commit>"
            source = pre.source.replace(self.path, self.name)
            pre = dataclasses.replace(
                pre, source=source if source != pre.source else f"{source} ({self.name})")
        return dataclasses.replace(weights, description=f"{self.name} ({weights.description})",
                                   preprocessing=pre, origin=self.origin)


def is_name(source: str) -> bool:
    """Whether ``source`` is read as a published name rather than a path."""
    if source.startswith((HF_PREFIX, TORCHVISION_PREFIX)):
        return True
    return (not os.path.exists(source) and _BARE_HUB_NAME.fullmatch(source) is not None
            and not source.lower().endswith(_WEIGHT_SUFFIXES))


def locate(source: str) -> Named | None:
    """The local copy of the weights ``source`` names, fetched if it is not cached; None when
    ``source`` is a path (or nothing at all: the resolver says so)."""
    if source.startswith(HF_PREFIX):
        return fetch_hub(source[len(HF_PREFIX):])
    if source.startswith(TORCHVISION_PREFIX):
        return fetch_torchvision(source[len(TORCHVISION_PREFIX):])
    if not is_name(source):
        return None
    try:
        return fetch_hub(source)
    except (NotCachedError, NotFoundError) as err:
        raise type(err)(f"no such file or directory: {source}; as a Hugging Face Hub name, "
                        f"{err}") from None


# --- the Hugging Face Hub ---------------------------------------------------------------------


def hub_cache_dir() -> str:
    """huggingface_hub's cache, by its rules (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
    ``HF_HOME/hub``, ``XDG_CACHE_HOME/huggingface/hub``), read now: huggingface_hub reads
    them once, at import."""
    home = os.getenv("HF_HOME", os.path.join(
        os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
        "huggingface"))
    cache = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE",
                                                os.path.join(home, "hub")))
    return os.path.expandvars(os.path.expanduser(cache))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it, now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_ABSENT = object()  # the Hub says the repository has no such file
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")  # huggingface_hub's cache layout


def _hub_file(repo_id: str, filename: str, revision: str, cache: str, offline: bool,
              label: str) -> Any:
    """The cached path of ``filename`` (fetched if needed); None when it is not cached and
    cannot be fetched; ``_ABSENT`` when the repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    no_exist = os.path.join(cache, _repo_folder(repo_id), ".no_exist", revision, filename)
    if _COMMIT.fullmatch(revision) and os.path.isfile(no_exist):
        return _ABSENT  # the Hub said so for this commit before: no need to ask again
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache,
                               local_files_only=offline,
                               endpoint=os.environ.get("HF_ENDPOINT") or None)
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
        return None
    except EntryNotFoundError:
        return _ABSENT
    except RevisionNotFoundError:
        raise NotFoundError(f"{label}: the Hub repository {repo_id} has no revision "
                            f"{revision!r}") from None
    except RepositoryNotFoundError:
        raise NotFoundError(f"{label}: no such model repository on the Hugging Face Hub "
                            f"(or it is private or gated: log in with `hf auth login`)"
                            ) from None
    except HFValidationError as err:
        raise NamedWeightsError(f"{label} is no Hub repository name: {err}") from None
    except Exception as err:  # noqa: BLE001 - network and HTTP errors of many kinds
        raise NamedWeightsError(f"{label}: cannot fetch {filename}: {type(err).__name__}: "
                                f"{err}") from err


def _not_cached(label: str, repo_id: str, revision: str | None, missing: list[str],
                cache: str, offline: bool) -> NotCachedError:
    folder = os.path.join(cache, _repo_folder(repo_id))
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
    pinned = f" --revision {revision}" if revision else ""
    return NotCachedError(
        f"{label}: {', '.join(missing)} not in the Hugging Face cache {folder} and {why}. "
        f"Fill it where the Hub can be reached: `hf download {repo_id} config.json "
        f"model.safetensors{pinned} --cache-dir {cache}` (pytorch_model.bin for a repository "
        f"without model.safetensors; `huggingface-cli download` before huggingface_hub 1.0), "
        f"or copy the {_repo_folder(repo_id)} folder of a filled cache into "
        f"{cache} (HF_HUB_CACHE or HF_HOME choose the cache)")


def fetch_hub(spec: str) -> Named:
    """``ORG/NAME[@REVISION]`` from the Hugging Face Hub (see the module docstring)."""
    repo_id, _, revision = spec.partition("@")
    label = f"{HF_PREFIX}{spec}"
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise NamedWeightsError(f"{label}: Hub names need huggingface_hub (pip install "
                                "huggingface_hub, or flax_resnet[hub])") from None
    cache, offline = hub_cache_dir(), hub_offline()
    config_path = _hub_file(repo_id, libs.CONFIG_FILE, revision or "main", cache, offline,
                            label)
    if config_path is None:
        raise _not_cached(label, repo_id, revision or None, [libs.CONFIG_FILE], cache, offline)
    if config_path is _ABSENT:
        raise NotFoundError(f"{label} has no {libs.CONFIG_FILE}: it is no Hugging Face "
                            "transformers or timm model repository")
    snapshot = os.path.dirname(config_path)  # .../snapshots/<commit>/config.json
    commit = os.path.basename(snapshot)
    pinned = f"{HF_PREFIX}{repo_id}@{commit}"
    library = _check_config(config_path, pinned)
    files = [libs.CONFIG_FILE]
    found = [_hub_file(repo_id, name, commit, cache, offline, label) for name in
             libs.WEIGHT_FILES[:1]]
    if found[0] is None or found[0] is _ABSENT:  # the second only where the first is not
        found += [_hub_file(repo_id, name, commit, cache, offline, label)
                  for name in libs.WEIGHT_FILES[1:]]
    weights = next((p for p in found if isinstance(p, str)), None)
    if weights is None:
        if all(p is _ABSENT for p in found):
            raise NotFoundError(f"{pinned} holds none of {', '.join(libs.WEIGHT_FILES)} "
                                "(a sharded checkpoint is not supported)")
        raise _not_cached(label, repo_id, commit, list(libs.WEIGHT_FILES), cache, offline)
    files.append(os.path.basename(weights))
    if library == "hf":  # optional: the resolver assumes ImageNet's constants without it
        pre = _hub_file(repo_id, libs.HF_PREPROCESSOR_FILE, commit, cache, offline, label)
        if isinstance(pre, str):
            files.append(libs.HF_PREPROCESSOR_FILE)
    origin = {"source": "hf-hub", "name": pinned, "repo_id": repo_id,
              "revision": revision or "main", "commit": commit, "files": tuple(files)}
    return Named(pinned, snapshot, origin)


def _check_config(path: str, label: str) -> str:
    """The library of a Hub repository's config.json, refused as the resolver refuses it
    when it is no ResNet flax_resnet builds: before any weights are fetched."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise NamedWeightsError(f"{label}: cannot read {path}: {err}") from None
    library = libs.library_of(config)
    if library is None:
        raise NamedWeightsError(f"{label}: its {libs.CONFIG_FILE} is neither a Hugging Face "
                                "transformers one (model_type) nor a timm one (architecture)")
    try:
        libs.hf_model_fields(config) if library == "hf" else libs.timm_model_fields(config)
    except ConversionError as err:
        raise ConversionError(f"{label}: {err}") from None
    return library


# --- torchvision ------------------------------------------------------------------------------


def _torchvision_entry(spec: str) -> tuple[str, Any]:
    """(model, weights enum member) of ``MODEL[.ENTRY]``."""
    label = f"{TORCHVISION_PREFIX}{spec}"
    try:
        import torchvision.models as tvm
    except ImportError:
        raise NamedWeightsError(
            f"{label}: torchvision names take their URL and preprocessing from torchvision's "
            "weights entries: install torchvision (pip install torchvision)") from None
    model, _, tag = spec.partition(".")
    model = model.lower()

    def allowed() -> str:
        return ", ".join(f"{m}.{e.name}" for m in TORCHVISION_MODELS
                         for e in tvm.get_model_weights(m))

    if model not in TORCHVISION_MODELS:
        raise NotFoundError(f"{label}: {model!r} is no torchvision ResNet flax_resnet "
                            f"builds; allowed: {allowed()} (MODEL alone: its DEFAULT)")
    enum = tvm.get_model_weights(model)
    try:
        return model, enum[(tag or "DEFAULT").upper()]
    except KeyError:
        raise NotFoundError(f"{label}: torchvision has no entry {tag!r} for {model}; allowed: "
                            f"{', '.join(f'{model}.{e.name}' for e in enum)} (or {model} "
                            f"alone: {model}.{enum['DEFAULT'].name})") from None


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torchvision_preprocessing(entry: Any, source: str) -> Preprocessing | None:
    """The entry's ``transforms`` (``ImageClassification``: crop_size, resize_size,
    interpolation, mean, std) as ``Preprocessing``."""
    try:
        t = entry.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interpolation = getattr(t.interpolation, "value", t.interpolation)
        return Preprocessing(tuple(t.mean), tuple(t.std), (3, crop, crop), str(interpolation),
                             crop / resize, source, resize_size=resize)
    except (AttributeError, TypeError, IndexError, ValueError):
        return None  # a transform of another kind: the resolver's ImageNet assumption holds


def fetch_torchvision(spec: str) -> Named:
    """``MODEL[.ENTRY]`` of torchvision's weights (see the module docstring)."""
    model, entry = _torchvision_entry(spec)
    import torch.hub

    enum_name = f"{type(entry).__name__}.{entry.name}"
    url = entry.url
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    match = _HASH_IN_NAME.search(filename)
    prefix = match.group(1) if match else None
    directory = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        try:
            os.makedirs(directory, exist_ok=True)
            # torch.hub keeps a download only when it matches the prefix (RuntimeError else)
            torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=True)
        except RuntimeError as err:
            raise ChecksumError(f"{TORCHVISION_PREFIX}{spec}: the download of {url} does not "
                                f"match the SHA-256 prefix {prefix} of its name ({err}); "
                                f"nothing was kept at {path}", path) from None
        except (OSError, ValueError) as err:  # URLError is an OSError
            raise NotCachedError(
                f"{TORCHVISION_PREFIX}{spec}: {path} is not there and {url} cannot be "
                f"downloaded ({type(err).__name__}: {err}). Download it where the network "
                f"can be reached (`curl -L -o {filename} {url}`) and copy it to {path} "
                "(TORCH_HOME chooses the directory)") from None
    digest = sha256_of(path)
    if prefix and not digest.startswith(prefix):
        raise ChecksumError(
            f"{TORCHVISION_PREFIX}{spec}: {path} is not the file its name promises: its "
            f"SHA-256 {digest} does not start with {prefix}; delete it to download {url} "
            "again", path)
    name = f"{TORCHVISION_PREFIX}{model}.{entry.name}"
    preprocessing = _torchvision_preprocessing(
        entry, f"torchvision {enum_name} transforms ({url}, sha256 {digest})")
    origin = {"source": "torchvision", "name": name, "weights": enum_name, "url": url,
              "file": filename, "sha256": digest}
    return Named(name, path, origin, preprocessing)
