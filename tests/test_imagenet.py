"""--dataset imagenet2012: a tiny archive in the ILSVRC2012 layout, prepared through tfds's
manual path, read back without TensorFlow."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SYNSETS = ("n01440764", "n01443537")


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 60, 2))
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_archives(manual: Path) -> dict[str, bytes]:
    """ILSVRC2012_img_train.tar (one tar per synset) and ILSVRC2012_img_val.tar; returns
    every image's bytes by file name."""
    manual.mkdir(parents=True)
    files = {}
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        for s, synset in enumerate(SYNSETS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_class:
                for i in range(3):
                    name = f"{synset}_{1000 + i}.JPEG"
                    files[name] = _jpeg(10 * s + i)
                    _add(per_class, name, files[name])
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, 5):
            name = f"ILSVRC2012_val_{i:08d}.JPEG"
            files[name] = _jpeg(100 + i)
            _add(val, name, files[name])
    return files


READ_BACK = """
import importlib.machinery, sys

class HideTensorFlow(importlib.machinery.PathFinder):
    # As if TensorFlow were not installed (find_spec None, import fails). Not
    # sys.modules["tensorflow"] = None: tfds then takes TensorFlow for loaded and fails.
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [HideTensorFlow if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
try:
    import tensorflow
    raise SystemExit("tensorflow is still importable")
except ImportError:
    pass
import json, numpy as np
from flax_resnet.data import load_dataset
ds = load_dataset("imagenet2012", sys.argv[1])
out = {}
for split, src in (("train", ds.train), ("val", ds.test)):
    out[split] = [[src.name(i).rsplit("/", 1)[-1], src.label(i), src.encoded(i).hex(),
                   np.asarray(src.image(i)).tolist()] for i in range(len(src))]
out["classes"] = list(ds.class_names)
assert "tensorflow" not in sys.modules, "reading imported tensorflow"
print(json.dumps(out))
"""


def test_tiny_ilsvrc2012_prepares_and_reads_back_without_tensorflow(tmp_path):
    import json

    from PIL import Image
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    from flax_resnet.imagenet import imagenet2012

    files = build_archives(tmp_path / "downloads" / "manual")
    train, val, classes = imagenet2012(tmp_path)  # prepares (TensorFlow is installed here)
    assert len(classes) == 1000 and list(classes) == sorted(classes)
    # the order of the pretrained heads: timm's own synset list, read as a file (importing
    # timm would load torch next to TensorFlow, which crashes this process)
    import importlib.util

    timm_dir = Path(importlib.util.find_spec("timm").submodule_search_locations[0])
    timm_synsets = (timm_dir / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert list(classes) == timm_synsets
    assert (len(train), len(val)) == (6, 4)

    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", READ_BACK, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["classes"] == list(classes)
    labels_file = Path(imagenet_common.label_names_file()).with_name("validation_labels.txt")
    val_synsets = labels_file.read_text().split()
    for split in ("train", "val"):
        for name, label, encoded, pixels in out[split]:
            synset = name.split("_")[0] if split == "train" else \
                val_synsets[int(name.split("_")[-1].split(".")[0]) - 1]
            assert classes[label] == synset, (name, label)
            assert bytes.fromhex(encoded) == files[name]  # the file itself, not re-encoded
            original = np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB"))
            assert np.array_equal(np.asarray(pixels, np.uint8), original)
    assert sorted(n for n, *_ in out["val"]) == sorted(n for n in files if "val" in n)


def test_missing_archives_say_what_goes_where(tmp_path):
    from flax_resnet.data import DataUnavailableError, load_dataset

    with pytest.raises(DataUnavailableError) as info:
        load_dataset("imagenet2012", tmp_path)
    message = str(info.value)
    for needle in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                   str(tmp_path / "downloads" / "manual"), "138 GiB", "hours"):
        assert needle in message


def test_a_tfrecord_copy_is_named_not_mistaken_for_missing_archives(tmp_path):
    """ImageNet prepared earlier by tfds.load (TFRecord) cannot be read without TensorFlow:
    the error names that copy and the fix, even once the archives are gone."""
    import shutil

    import tensorflow_datasets as tfds

    from flax_resnet.imagenet import imagenet2012
    from flax_resnet.sources import DataError, DataUnavailableError

    manual = tmp_path / "downloads" / "manual"
    build_archives(manual)
    tfds.builder("imagenet2012", data_dir=os.fspath(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    for archives in ("present", "deleted"):
        if archives == "deleted":
            shutil.rmtree(manual)
        with pytest.raises(DataError) as info:
            imagenet2012(tmp_path)
        assert not isinstance(info.value, DataUnavailableError), archives
        message = str(info.value)
        assert "TFRecord" in message and str(tmp_path / "imagenet2012") in message, message
