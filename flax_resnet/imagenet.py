"""ImageNet (ILSVRC2012) through tensorflow-datasets, read back without TensorFlow.

``imagenet2012(data_dir)`` gives the training and validation splits as streamed image
sources and the 1000 class names (synsets, in tfds's label order: the sorted synsets, the
order of torchvision, timm and an ``ImageFolder`` of synset folders). The first call
prepares the data once from the user's archives in ``DATA_DIR/downloads/manual/`` into
ArrayRecord files (TensorFlow is needed for that step only); every later run reads them
through ``tfds.data_source`` with the images left encoded, decoded by the loader's workers
exactly as the JPEG files would be. tfds itself converts the 22 CMYK training images and
the one PNG to RGB JPEGs while preparing, so those 23 of 1,281,167 differ from
``ImageFolder``'s decoding of the original files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from flax_resnet.sources import DataError, DataUnavailableError

NAME = "imagenet2012"
ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
HOWTO = """\
ImageNet (ILSVRC2012) is not prepared in {data_dir} ({reason}).

It cannot be downloaded automatically: register at https://image-net.org/download-images,
download these two archives and put them, unextracted, into
    {manual_dir}/
      ILSVRC2012_img_train.tar   (about 138 GiB = 147.9 GB, 1,281,167 training images)
      ILSVRC2012_img_val.tar     (about 6.3 GiB = 6.7 GB, 50,000 validation images)
(sizes from tensorflow-datasets' checksums.tsv; leave ILSVRC2012_img_test.tar out: tfds would
also prepare its 100,000 unlabelled images) and rerun the same command. It needs TensorFlow
(`pip install 'flax_resnet[train]'` brings the CPU build) to prepare them once: tfds copies
the JPEG bytes into ArrayRecord files of about the archives' size (~145 GiB = ~155 GB more
disk in {data_dir}; its shuffling writes temporary files of the same size there first,
deleted as the final files are written; the archives can be deleted afterwards). Expect
hours: one process reads ~155 GB and writes ~300 GB. (Approximate, not measured on ImageNet
itself: on synthetic archives on 2 cores with the files in memory it copied ~70 MB/s, which
would be ~40 min; slower disks make it longer.) Every later run reads the prepared files
without TensorFlow.
Or train from an image folder instead: --dataset folder:PATH with PATH/train/SYNSET/*.JPEG
and PATH/val/SYNSET/*.JPEG."""


class ImageNetSource:
    """One prepared split, read by index; images stay encoded until ``image(i)``. Pickles
    as its location only, so each loader worker opens the files itself."""

    def __init__(self, data_dir: Path, split: str):
        self.data_dir, self.split = Path(data_dir), split
        self._records: Any = None
        self._last: tuple[int, dict] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_dir"], state["split"])  # type: ignore[misc]

    @property
    def records(self) -> Any:
        if self._records is None:
            self._records = _open(self.data_dir, self.split)
        return self._records

    def _record(self, index: int) -> dict:
        if self._last is None or self._last[0] != index:
            self._last = (index, self.records[int(index)])
        return self._last[1]

    def __len__(self) -> int:
        return len(self.records)

    def encoded(self, index: int) -> bytes:
        return bytes(self._record(index)["image"])

    def image(self, index: int) -> Any:
        from flax_resnet.transforms import decode_rgb

        return decode_rgb(self.encoded(index), self.name(index))

    def label(self, index: int) -> int:
        return int(self._record(index)["label"])

    def name(self, index: int) -> str:
        name = self._record(index)["file_name"]
        return f"{NAME}/{self.split}/{name.decode() if isinstance(name, bytes) else name}"

    def labels(self) -> np.ndarray:
        """Every label (reads every record: for small splits and tests)."""
        return np.array([self.label(i) for i in range(len(self))], np.int32)


def _open(data_dir: Path, split: str) -> Any:
    import tensorflow_datasets as tfds

    return tfds.data_source(NAME, split=split, data_dir=os.fspath(data_dir), download=False,
                            builder_kwargs={"file_format": "array_record"},
                            decoders={"image": tfds.decode.SkipDecoding()})


def class_names() -> tuple[str, ...]:
    """The 1000 synsets in tfds's label order (its bundled ``labels.txt``)."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    return tuple(Path(imagenet_common.label_names_file()).read_text().split())


def imagenet2012(data_dir: str | os.PathLike
                 ) -> tuple[ImageNetSource, ImageNetSource, tuple[str, ...]]:
    """The training and validation splits and the class names; prepares them first when
    needed (see the module). Raises ``DataUnavailableError`` saying what to do when the
    data is neither prepared nor preparable here."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataUnavailableError(
            f"--dataset {NAME} reads through tensorflow-datasets, which is not installed "
            f"({e}).\n    pip install 'flax_resnet[train]'") from None
    data_dir = Path(data_dir).expanduser().absolute()
    manual_dir = data_dir / "downloads" / "manual"

    def howto(reason: str) -> DataUnavailableError:
        return DataUnavailableError(HOWTO.format(data_dir=data_dir, manual_dir=manual_dir,
                                                 reason=reason))

    try:
        _open(data_dir, "train"), _open(data_dir, "validation")
    except Exception as e:  # noqa: BLE001 - not prepared (or unreadable): prepare it
        version_dir = data_dir / NAME / str(tfds.builder_cls(NAME).VERSION)
        if (version_dir / "dataset_info.json").is_file():
            # tfds never prepares over a prepared copy: the archives would not help
            raise _unreadable(version_dir, manual_dir, e) from None
        missing = [a for a in ARCHIVES.values() if not (manual_dir / a).is_file()]
        if missing:
            raise howto(f"{' and '.join(missing)} not in {manual_dir}") from None
        if importlib.util.find_spec("tensorflow") is None:
            raise howto("preparing needs tensorflow, which is not installed") from None
        try:
            builder = tfds.builder(NAME, data_dir=os.fspath(data_dir),
                                   file_format="array_record")
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir)))
            _open(data_dir, "train"), _open(data_dir, "validation")
        except Exception as e:  # noqa: BLE001 - every failure here means "no data"
            raise howto(f"preparing failed: {_first_line(e)}") from None
    return (ImageNetSource(data_dir, "train"), ImageNetSource(data_dir, "validation"),
            class_names())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _unreadable(version_dir: Path, manual_dir: Path, e: BaseException) -> DataError:
    """A prepared copy that this reader cannot use: what it is and how to replace it."""
    redo = (f"move {version_dir} away (or use another --data-dir) and rerun with both "
            f"archives in {manual_dir} to prepare it again (hours; see --dataset "
            "imagenet2012's how-to)")
    if any(version_dir.glob(f"{NAME}-*.tfrecord-*")):
        return DataError(
            f"{NAME} in {version_dir} was prepared as TFRecord (tfds.load's default), "
            "which cannot be read without TensorFlow; reading needs tfds's ArrayRecord "
            f"copy: {redo}")
    return DataError(f"{NAME} in {version_dir} is prepared but cannot be read "
                     f"({_first_line(e)}); if a split is missing: {redo}")
