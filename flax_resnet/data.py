"""Datasets held in memory as uint8, on-device augmentation, deterministic epoch order.

``load_dataset(spec, data_dir)`` understands:

* ``cifar10`` / ``cifar100``: tensorflow-datasets, prepared once into ``data_dir`` in the
  ``array_record`` format and read back through ``tfds.data_source`` (no TensorFlow needed
  to read). Preparing (the first download) needs TensorFlow (the ``train`` extra brings
  it); offline, from the official archive in ``DATA_DIR/downloads/manual``; see
  ``TFDS_HOWTO``.
* ``folder:PATH``: an image-folder tree ``PATH/{train,test}/CLASS/*.{png,jpg,jpeg}``
  (classes sorted by name, files by name). The decoded arrays are cached in a ``.npz`` next
  to the folder (or in ``data_dir`` when that is not writable), keyed by every file's path,
  size and mtime, so a second run skips the decoding.
* ``synthetic`` or ``synthetic:N`` or ``synthetic:N:M``: N train / M test random 32×32
  images (default 50000 / 10000) whose class shifts the colour, so a model can learn them.

Augmentation is the seed's ``Pad(4) + RandomHorizontalFlip + RandomCrop(32)`` and runs on
the device inside the jitted step. Its randomness is explicit (``augment_params``) so that
the same crops and flips can be replayed elsewhere (``apply_augment``), e.g. to feed
PyTorch the very same batches. A flip of the padded image followed by a crop at column
offset ``x`` equals the crop at ``2·pad − x`` followed by the flip, so the crop/flip order
does not change the distribution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DATASET_SPECS = ("cifar10", "cifar100", "folder:PATH", "synthetic[:N_TRAIN[:N_TEST]]")

TFDS_HOWTO = """\
{name} is not prepared in {data_dir} and cannot be prepared here ({reason}).

Preparing it once needs TensorFlow, which `pip install 'flax_resnet[train]'` brings (reading
it back afterwards does not), and then either
  * internet access: rerun the same command, tfds downloads and prepares it into
    {data_dir}, or
  * offline: place the official archive {archive} (from {url}) in
    {manual_dir}
    and rerun; tfds checks its checksum and prepares from it.
Or train from an image folder instead: --dataset folder:PATH with PATH/{{train,test}}/CLASS/*.png
(e.g. mkdir -p data && tar xzf cifar10-jpeg.tar.gz -C data; --dataset folder:data/cifar10-jpeg)."""


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url``'s host cannot be reached, or None: tfds would otherwise retry the
    download for minutes before giving up."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{parts.hostname} cannot be reached: {e}"
    return None


_TFDS_ARCHIVES = {
    "cifar10": ("cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
    "cifar100": (
        "cifar-100-binary.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    ),
}


class DataError(Exception):
    """The data set spec or the data on disk is wrong (bad spec, malformed folder...)."""


class DataUnavailableError(DataError):
    """The data set is not on this machine and cannot be fetched; the message says how."""


class DataSource(Protocol):
    """A split the training loop reads by index, as grain's ``RandomAccessDataSource``:
    ``len(source)`` records, ``source[i]`` the ``(image uint8 HWC, label)`` of record ``i``.
    A source may also offer ``read_batch(indices)`` (see ``read_batch``) for reading many at
    once. Where and how the records are stored never changes which record an index names."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


def read_batch(source: DataSource, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The records ``indices`` of ``source`` as a uint8 NHWC array and int32 labels."""
    batched = getattr(source, "read_batch", None)
    if batched is not None:
        return batched(indices)
    records = [source[int(i)] for i in indices]
    return (np.stack([np.asarray(image, np.uint8) for image, _ in records]),
            np.array([label for _, label in records], np.int32))


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A ``DataSource`` decoded in memory: every image of the split in one uint8 array."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: ArraySource
    test: ArraySource
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


def _split(images: np.ndarray, labels: np.ndarray) -> ArraySource:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise DataError(f"bad split shapes: images {images.shape}, labels {labels.shape}")
    return ArraySource(images, labels)


def load_dataset(spec: str, data_dir: str | os.PathLike = "data") -> Dataset:
    """Load a data set fully into memory as uint8 NHWC images and int32 labels.

    ``spec`` is one of ``DATASET_SPECS``. Raises ``DataUnavailableError`` (with a how-to
    message) when the data is missing and cannot be fetched, ``DataError`` for a bad spec
    or malformed data.
    """
    if spec in ("cifar10", "cifar100"):
        return _load_tfds(spec, Path(data_dir))
    if spec.startswith("folder:"):
        path = spec[len("folder:") :]
        if not path:
            raise DataError("--dataset folder:PATH needs a PATH, e.g. folder:data/cifar10-jpeg")
        return load_image_folder(path, data_dir)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        parts = spec.split(":")[1:]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise DataError(
                f"bad synthetic data set spec {spec!r}; expected synthetic[:N_TRAIN[:N_TEST]]"
            ) from None
        if len(sizes) > 2 or any(s < 1 for s in sizes):
            raise DataError(
                f"bad synthetic data set spec {spec!r}; expected synthetic[:N_TRAIN[:N_TEST]] "
                "with positive sizes"
            )
        n_train = sizes[0] if sizes else 50_000
        n_test = sizes[1] if len(sizes) > 1 else max(1, min(10_000, n_train // 5))
        return synthetic_dataset(n_train, n_test)
    raise DataError(f"unknown data set {spec!r}; allowed: {', '.join(DATASET_SPECS)}")


# --------------------------------------------------------------------------- synthetic


def synthetic_dataset(
    n_train: int, n_test: int, num_classes: int = 10, image_size: int = 32, seed: int = 0
) -> Dataset:
    """Random images whose class adds a fixed low-frequency colour pattern (learnable)."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(-60, 60, size=(num_classes, 4, 4, 3))
    patterns = np.repeat(np.repeat(patterns, image_size // 4, 1), image_size // 4, 2)

    def make(n: int, rng: np.random.Generator) -> ArraySource:
        labels = rng.integers(0, num_classes, size=n)
        noise = rng.normal(128, 40, size=(n, image_size, image_size, 3))
        images = np.clip(noise + patterns[labels], 0, 255).astype(np.uint8)
        return _split(images, labels)

    train = make(n_train, np.random.default_rng([seed, 1]))
    test = make(n_test, np.random.default_rng([seed, 2]))
    return Dataset(
        f"synthetic:{n_train}:{n_test}", train, test, num_classes, CIFAR10_MEAN, CIFAR10_STD
    )


# --------------------------------------------------------------------------- tfds


def _load_tfds(name: str, data_dir: Path) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataUnavailableError(
            f"--dataset {name} reads through tensorflow-datasets, which is not installed "
            f"({e}).\n    pip install tensorflow-datasets array_record\n"
            "(preparing it the first time also needs tensorflow and importlib_resources)"
        ) from None
    data_dir = data_dir.expanduser().absolute()
    manual_dir = data_dir / "downloads" / "manual"
    archive, url = _TFDS_ARCHIVES[name]
    def howto(reason: str) -> DataUnavailableError:
        return DataUnavailableError(
            TFDS_HOWTO.format(
                name=name, data_dir=data_dir, reason=reason, archive=archive, url=url,
                manual_dir=manual_dir,
            )
        )

    kwargs: dict = dict(
        split=["train", "test"],
        data_dir=os.fspath(data_dir),
        builder_kwargs={"file_format": "array_record"},
    )
    try:  # already prepared: read it, no TensorFlow or network involved
        sources = tfds.data_source(name, download=False, **kwargs)
    except Exception:  # noqa: BLE001 - not prepared (or unreadable): try to prepare it
        if importlib.util.find_spec("tensorflow") is None:
            raise howto("preparing needs tensorflow, which is not installed") from None
        if not (manual_dir / archive).is_file() and (why := _unreachable(url)):
            raise howto(f"no {archive} in {manual_dir}, and {why}") from None
        try:
            download_config = tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir), try_download_gcs=False)
            sources = tfds.data_source(
                name,
                download=True,
                download_and_prepare_kwargs={"download_config": download_config},
                **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - every failure here means "no data"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise howto(f"{type(e).__name__}: {first}") from None
    train, test = (_read_source(src) for src in sources)
    num_classes = 10 if name == "cifar10" else 100
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    names = CIFAR10_CLASSES if name == "cifar10" else None
    return Dataset(name, train, test, num_classes, mean, std, names)


def _read_source(source: Sequence[dict]) -> ArraySource:
    """Read a random-access tfds source fully into uint8 / int32 arrays."""
    n = len(source)
    first = source[0]
    images = np.empty((n, *np.asarray(first["image"]).shape), np.uint8)
    labels = np.empty((n,), np.int32)
    chunk = 1024
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        try:
            records = source.__getitems__(keys)  # batched read (array_record)
        except (AttributeError, TypeError):  # sources without batched reads
            records = [source[k] for k in keys]
        for k, rec in zip(keys, records, strict=True):
            images[k] = rec["image"]
            labels[k] = rec["label"]
    return ArraySource(images, labels)


# --------------------------------------------------------------------------- image folder


def _list_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]], str]:
    """Classes, files per split, and a cache key over every file's path, size and mtime."""
    if not root.is_dir():
        raise DataUnavailableError(
            f"image folder {str(root)!r} does not exist (expected "
            f"{root}/{{train,test}}/CLASS/*.png|jpg). For the CIFAR-10 JPEG copy:\n"
            "    mkdir -p data && tar xzf cifar10-jpeg.tar.gz -C data\n"
            "    --dataset folder:data/cifar10-jpeg"
        )
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"image folder {str(root)!r} has no {' or '.join(missing)} subfolder; expected "
            f"{root}/{{train,test}}/CLASS/*.png|jpg"
        )
    classes = sorted(d.name for d in os.scandir(root / "train") if d.is_dir())
    if not classes:
        raise DataError(f"image folder {str(root / 'train')!r} has no class subfolders")
    index = {c: i for i, c in enumerate(classes)}
    digest = hashlib.sha256(os.fspath(root.absolute()).encode())
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        entries: list[tuple[Path, int]] = []
        for cdir in sorted(os.scandir(root / split), key=lambda d: d.name):
            if not cdir.is_dir():
                continue
            if cdir.name not in index:
                raise DataError(
                    f"class {cdir.name!r} in {str(root / split)!r} is not among the train "
                    f"classes {classes}"
                )
            for f in sorted(os.scandir(cdir.path), key=lambda d: d.name):
                if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS):
                    st = f.stat()
                    entries.append((Path(f.path), index[cdir.name]))
                    digest.update(f"{split}/{cdir.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if not entries:
            raise DataError(
                f"image folder {str(root / split)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files"
            )
        empty = [c for c in classes if not any(label == index[c] for _, label in entries)]
        if empty:  # a class without images would still get a classifier output
            raise DataError(
                f"image folder {str(root / split)!r} has no {'/'.join(IMAGE_EXTENSIONS)} "
                f"images of class{'es' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} "
                "(every train class needs images in train/ and test/); add them or remove "
                "the class folder"
            )
        files[split] = entries
    return classes, files, digest.hexdigest()[:32]


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "not an image"
        raise DataError(
            f"image {str(path)!r} cannot be decoded ({type(e).__name__}: {e}); replace or "
            "remove it"
        ) from None


def _decode_split(entries: list[tuple[Path, int]]) -> ArraySource:
    workers = min(32, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(_decode, (p for p, _ in entries), chunksize=256))
    shape = arrays[0].shape
    for (path, _), a in zip(entries, arrays, strict=True):
        if a.shape != shape:
            raise DataError(
                f"image {str(path)!r} has shape {a.shape}, the first image has {shape}: "
                "all images of a folder data set must have the same size"
            )
    return _split(np.stack(arrays), np.array([label for _, label in entries]))


def _cache_candidates(root: Path, data_dir: str | os.PathLike) -> list[Path]:
    name = root.absolute().name or "folder"
    return [
        root.absolute().parent / f"{name}-decoded.npz",
        Path(data_dir).expanduser().absolute() / f"{name}-decoded.npz",
    ]


def load_image_folder(path: str | os.PathLike, data_dir: str | os.PathLike = "data") -> Dataset:
    """``PATH/{train,test}/CLASS/*.{png,jpg,jpeg}``, decoded once and cached as ``.npz``.

    Normalization constants: CIFAR-10's when the classes are CIFAR-10's, else the
    per-channel mean and std of the train split.
    """
    root = Path(path)
    classes, files, key = _list_folder(root)
    candidates = _cache_candidates(root, data_dir)
    arrays = None
    for cache in candidates:
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    if str(z["key"]) == key:
                        arrays = {k: z[k] for k in z.files}
                        break
            except (OSError, ValueError, KeyError):
                pass  # unreadable or stale cache: decode again
    if arrays is None:
        n = sum(len(v) for v in files.values())
        print(f"decoding {n} images under {root} (cached for the next run)...", file=sys.stderr)
        train, test = _decode_split(files["train"]), _decode_split(files["test"])
        arrays = {
            "key": np.array(key),
            "train_images": train.images, "train_labels": train.labels,
            "test_images": test.images, "test_labels": test.labels,
        }
        for cache in candidates:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
                np.savez(tmp, **arrays)
                os.replace(tmp, cache)  # atomic: readers never see a partial cache
                break
            except OSError:
                continue
    train = _split(arrays["train_images"], arrays["train_labels"])
    test = _split(arrays["test_images"], arrays["test_labels"])
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"train images are {train.images.shape[1:]} but test images are "
            f"{test.images.shape[1:]} in {str(root)!r}"
        )
    if tuple(classes) == CIFAR10_CLASSES:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = channel_stats(train.images)
    return Dataset(f"folder:{root}", train, test, len(classes), mean, std, tuple(classes))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    c = images.shape[-1]
    flat = images.reshape(-1, c)
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for start in range(0, flat.shape[0], 1 << 20):
        block = flat[start : start + (1 << 20)].astype(np.float64) / 255.0
        total += block.sum(0)
        total_sq += np.square(block).sum(0)
    n = flat.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------------- order


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training examples in ``epoch``: a pure function of (seed, epoch).

    Every host computes the same permutation, and a resumed run replays it exactly.
    """
    return np.random.default_rng([int(seed), int(epoch), 0x0DA7A]).permutation(n)


# --------------------------------------------------------------------------- augmentation


def augment_params(
    rng: jax.Array, batch_size: int, pad: int = 4
) -> tuple[jax.Array, jax.Array]:
    """Random crop offsets ``(B, 2)`` int32 (row, column) in ``[0, 2·pad]`` and flips ``(B,)``."""
    k_crop, k_flip = jax.random.split(rng)
    offsets = jax.random.randint(k_crop, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    # p in float32: the flips draw float32 uniforms whether or not JAX is 64-bit, so a
    # float64 run (jax.enable_x64) sees the very same batches as a float32 one.
    flips = jax.random.bernoulli(k_flip, np.float32(0.5), (batch_size,))
    return offsets, flips


def apply_augment(
    images: jax.Array, offsets: jax.Array, flips: jax.Array, pad: int = 4
) -> jax.Array:
    """Zero-pad by ``pad``, crop back to the input size at ``offsets``, mirror where ``flips``.

    ``images`` is NHWC of any dtype (uint8 here: padded pixels are 0 before normalization,
    like torchvision's ``Pad(4)`` on a PIL image). Deterministic given its arguments.
    """
    if pad == 0:
        cropped = images
    else:
        _, h, w, c = images.shape
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

        def crop(img: jax.Array, off: jax.Array) -> jax.Array:
            # a 0 of the offsets' dtype: a Python 0 would be int64 under 64-bit JAX
            return jax.lax.dynamic_slice(img, (off[0], off[1], off.dtype.type(0)), (h, w, c))

        cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def augment(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """The seed's training augmentation on a uint8 NHWC batch (pure, jittable)."""
    offsets, flips = augment_params(rng, images.shape[0], pad)
    return apply_augment(images, offsets, flips, pad)


def normalize(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """torchvision's ``ToTensor`` + ``Normalize``: ``(x / 255 - mean) / std`` in float32
    (float64 for a float64 ``dtype``), then cast to ``dtype``."""
    compute = jnp.promote_types(dtype, jnp.float32)
    x = images.astype(compute) / 255.0
    x = (x - jnp.asarray(mean, compute)) / jnp.asarray(std, compute)
    return x.astype(dtype)
