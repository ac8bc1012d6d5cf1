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

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet.folder import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGE_EXTENSIONS,
    channel_stats,
    load_image_folder,
)
from flax_resnet.sources import (
    ArraySource,
    DataError,
    Dataset,
    DataSource,
    DataUnavailableError,
    ImageSource,
    array_source,
    epoch_permutation,
    read_batch,
)

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "DATASET_SPECS", "IMAGE_EXTENSIONS",
    "ArraySource", "DataError", "DataSource", "DataUnavailableError", "Dataset",
    "ImageSource", "apply_augment", "augment", "augment_params", "channel_stats",
    "epoch_permutation", "load_dataset", "load_image_folder", "normalize", "read_batch",
    "synthetic_dataset",
]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
DATASET_SPECS = ("cifar10", "cifar100", "imagenet2012", "folder:PATH",
                 "synthetic[:N_TRAIN[:N_TEST]]")

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


def load_dataset(spec: str, data_dir: str | os.PathLike | None = "data", stream: bool = False,
                 say: Callable[[str], None] | None = None, eval_only: bool = False) -> Dataset:
    """The data set ``spec`` (one of ``DATASET_SPECS``): in memory as uint8 NHWC images and
    int32 labels, or streamed from encoded images (image folders of several sizes or large
    ones, ImageNet; ``stream`` asks for that for any folder). ``say`` hears what was chosen.
    ``eval_only``: an image folder may lack ``train/`` (its classes are then the eval split's).

    Raises ``DataUnavailableError`` (with a how-to message) when the data is missing and
    cannot be fetched, ``DataError`` for a bad spec or malformed data.
    """
    data_dir = "data" if data_dir is None else data_dir
    if spec in ("cifar10", "cifar100"):
        return _load_tfds(spec, Path(data_dir))
    if spec == "imagenet2012":
        return _load_imagenet(Path(data_dir))
    if spec.startswith("folder:"):
        path = spec[len("folder:") :]
        if not path:
            raise DataError("--dataset folder:PATH needs a PATH, e.g. folder:data/cifar10-jpeg")
        return load_image_folder(path, data_dir, stream=stream, say=say, eval_only=eval_only)
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
        return array_source(images, labels)

    train = make(n_train, np.random.default_rng([seed, 1]))
    test = make(n_test, np.random.default_rng([seed, 2]))
    return Dataset(
        f"synthetic:{n_train}:{n_test}", train, test, num_classes, CIFAR10_MEAN, CIFAR10_STD
    )


# --------------------------------------------------------------------------- tfds


def _load_imagenet(data_dir: Path) -> Dataset:
    from flax_resnet.imagenet import imagenet2012
    from flax_resnet.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    train, val, classes = imagenet2012(data_dir)
    return Dataset("imagenet2012", train, val, len(classes), IMAGENET_MEAN, IMAGENET_STD,
                   classes, "ImageNet's constants")


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


# --------------------------------------------------------------------------- order


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
