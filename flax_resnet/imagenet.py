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

from flax_resnet.sources import DataUnavailableError

NAME = "imagenet2012"
ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
HOWTO = """\
ImageNet (ILSVRC2012) is not prepared in {data_dir} ({reason}).

It cannot be downloaded automatically: register at https://image-net.org/download-images,
download these two archives and put them, unextracted, into
    {manual_dir}/
      ILSVRC2012_img_train.tar   (about 138 GB, 1,281,167 training images)
      ILSVRC2012_img_val.tar     (about 6.3 GB, 50,000 validation images)
then rerun the same command. Preparing reads them once and writes ArrayRecord files of
about the same size (~150 GB more disk in {data_dir}); it needs TensorFlow
(`pip install 'flax_resnet[train]'` brings the CPU build) and takes hours (it is bound by
reading and writing ~300 GB; tfds's own estimate for this builder is several hours on one
machine). Every later run reads the prepared files without TensorFlow.
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
    except Exception:  # noqa: BLE001 - not prepared (or unreadable): prepare it
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
        except Exception as e:  # noqa: BLE001 - every failure here means "no data"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise howto(f"preparing failed: {type(e).__name__}: {first}") from None
    return (ImageNetSource(data_dir, "train"), ImageNetSource(data_dir, "validation"),
            class_names())
