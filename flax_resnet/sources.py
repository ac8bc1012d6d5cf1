"""The data-source interface of the training loop and its implementations; free of JAX, so
that the loader's worker processes import it quickly.

A split is read by index, as grain's ``RandomAccessDataSource``. Two kinds exist:

* ``ArraySource``: decoded images of one size in memory (CIFAR, small folders, synthetic);
  the batch is cut from the array and augmented on the device.
* ``ImageSource`` (``ImageFileSource``, the ImageNet source): encoded images of any sizes,
  decoded on demand by ``flax_resnet.pipeline``'s workers and transformed on the host;
  beyond the index, memory does not grow with the data set.

Where and how the records are stored never changes which record an index names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


class DataError(Exception):
    """The data set spec or the data on disk is wrong (bad spec, malformed folder...)."""


class DataUnavailableError(DataError):
    """The data set is not on this machine and cannot be fetched; the message says how."""


class DataSource(Protocol):
    """A split of decoded records: ``len(source)`` records, ``source[i]`` the ``(image uint8
    HWC, label)`` of record ``i``. A source may also offer ``read_batch(indices)`` (see
    ``read_batch``) for reading many at once."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


@runtime_checkable
class ImageSource(Protocol):
    """A split of encoded images of any sizes: ``image(i)`` decodes record ``i`` to an RGB
    PIL image (raising ``transforms.BadImageError`` naming it when it cannot), ``label(i)``
    and ``labels()`` without decoding, ``name(i)`` for messages."""

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...

    def label(self, index: int) -> int: ...

    def labels(self) -> np.ndarray: ...

    def name(self, index: int) -> str: ...


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training examples in ``epoch``: a pure function of (seed, epoch).

    Every host computes the same permutation, and a resumed run replays it exactly.
    """
    return np.random.default_rng([int(seed), int(epoch), 0x0DA7A]).permutation(n)


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


def array_source(images: np.ndarray, labels: np.ndarray) -> ArraySource:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise DataError(f"bad split shapes: images {images.shape}, labels {labels.shape}")
    return ArraySource(images, labels)


class ImageFileSource:
    """Image files read by index: ``paths[i]`` with class ``labels[i]``; decoded as
    torchvision's ``ImageFolder`` loader does (any mode converted to RGB)."""

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int]):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        # One array of fixed-width bytes rather than a list of str: compact (an ImageNet
        # index is ~100 MB, not ~250 MB) and cheap to pickle into the loader's workers.
        self._paths = np.array([os.fsencode(p) for p in paths])
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def name(self, index: int) -> str:
        return self.path(index)

    def image(self, index: int) -> Image.Image:
        from flax_resnet.transforms import load_rgb

        return load_rgb(self.path(index))

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def labels(self) -> np.ndarray:
        return self._labels


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set's training and evaluation splits, in memory (``ArraySource``) or streamed
    (``ImageSource``), with its classes and input statistics."""

    name: str
    train: ArraySource | ImageSource
    test: ArraySource | ImageSource
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    stats_source: str = ""

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, ArraySource)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """The images' (H, W, C) when in memory; None for streamed images of any sizes."""
        return self.train.image_shape if isinstance(self.train, ArraySource) else None
