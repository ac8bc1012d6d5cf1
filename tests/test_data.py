"""flax_resnet.data: augmentation properties, epoch order, image folders, tfds (mocked)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_resnet import data as D
from flax_resnet import folder as F

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- augmentation


def _reference_augment(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int):
    """torchvision's Pad(pad) + RandomCrop(H) at the given offsets + RandomHorizontalFlip."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.stack([padded[i, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


@pytest.mark.parametrize("pad", [4, 2])
def test_augment_params_ranges_and_determinism(pad):
    key = jax.random.PRNGKey(3)
    offsets, flips = D.augment_params(key, 4096, pad)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    assert offsets.shape == (4096, 2) and offsets.dtype == np.int32
    assert flips.shape == (4096,) and flips.dtype == np.bool_
    assert offsets.min() == 0 and offsets.max() == 2 * pad  # every offset reachable, none beyond
    assert set(np.unique(offsets)) == set(range(2 * pad + 1))
    assert 0.45 < flips.mean() < 0.55
    again = D.augment_params(key, 4096, pad)
    np.testing.assert_array_equal(offsets, again[0])
    np.testing.assert_array_equal(flips, again[1])
    other = D.augment_params(jax.random.PRNGKey(4), 4096, pad)
    assert not np.array_equal(offsets, other[0])


def test_apply_augment_matches_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    offsets = rng.integers(0, 9, size=(16, 2)).astype(np.int32)
    flips = rng.random(16) < 0.5
    out = np.asarray(jax.jit(D.apply_augment, static_argnums=3)(images, offsets, flips, 4))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, _reference_augment(images, offsets, flips, 4))


def test_padding_is_zero_and_centre_crop_is_identity():
    images = np.full((3, 8, 8, 3), 255, np.uint8)
    offsets = np.array([[0, 0], [8, 8], [4, 4]], np.int32)
    out = np.asarray(D.apply_augment(images, offsets, np.zeros(3, bool), 4))
    # top-left corner crop: 4 padded rows and columns of zeros, before any normalization
    assert (out[0, :4] == 0).all() and (out[0, :, :4] == 0).all()
    assert (out[0, 4:, 4:] == 255).all()
    assert (out[1, 4:] == 0).all() and (out[1, :, 4:] == 0).all()
    np.testing.assert_array_equal(out[2], images[2])
    flipped = np.asarray(D.apply_augment(images[:1] * 0 + np.arange(8, dtype=np.uint8)[:, None],
                                         offsets[2:], np.ones(1, bool), 4))
    np.testing.assert_array_equal(flipped[0], (np.arange(8, dtype=np.uint8)[:, None] *
                                               np.ones((8, 8, 3), np.uint8))[:, ::-1])


def test_augment_deterministic_given_key_and_shapes():
    images = np.random.default_rng(1).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    f = jax.jit(D.augment)
    a = np.asarray(f(jax.random.PRNGKey(0), images))
    b = np.asarray(f(jax.random.PRNGKey(0), images))
    c = np.asarray(f(jax.random.PRNGKey(1), images))
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    offsets, flips = D.augment_params(jax.random.PRNGKey(0), 32, 4)
    np.testing.assert_array_equal(a, _reference_augment(images, np.asarray(offsets),
                                                        np.asarray(flips), 4))


def test_normalize_is_totensor_then_normalize():
    images = np.random.default_rng(2).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    out = np.asarray(D.normalize(images, D.CIFAR10_MEAN, D.CIFAR10_STD))
    ref = (images.astype(np.float32) / np.float32(255) - np.float32(D.CIFAR10_MEAN)) / np.float32(
        D.CIFAR10_STD
    )
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert D.normalize(images, D.CIFAR10_MEAN, D.CIFAR10_STD, jnp.bfloat16).dtype == jnp.bfloat16


# --------------------------------------------------------------------------- order


def test_epoch_permutation():
    p = D.epoch_permutation(0, 3, 1000)
    assert sorted(p) == list(range(1000))
    np.testing.assert_array_equal(p, D.epoch_permutation(0, 3, 1000))
    assert not np.array_equal(p, D.epoch_permutation(0, 4, 1000))
    assert not np.array_equal(p, D.epoch_permutation(1, 3, 1000))


# --------------------------------------------------------------------------- specs


def test_synthetic_specs():
    ds = D.load_dataset("synthetic:100:20")
    assert ds.train.images.shape == (100, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int32 and len(ds.test) == 20
    assert ds.num_classes == 10 and ds.mean == D.CIFAR10_MEAN
    np.testing.assert_array_equal(ds.train.images, D.load_dataset("synthetic:100:20").train.images)


@pytest.mark.parametrize("spec", ["cifar11", "synthetic:x", "synthetic:1:2:3", "folder:"])
def test_bad_specs_name_the_value(spec):
    with pytest.raises(D.DataError) as e:
        D.load_dataset(spec)
    assert spec.split(":")[0] in str(e.value)


# --------------------------------------------------------------------------- image folders


def _write_folder(root: Path, classes=("b_cls", "a_cls", "c_cls"), per_class=(4, 2),
                  size=(8, 8), ext="png") -> dict[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                path = root / split / c / f"{i:04d}.{ext}"
                Image.fromarray(img).save(path)
                written[f"{split}/{c}/{i}"] = img
    return written


def test_image_folder_labels_cache_and_invalidation(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    written = _write_folder(root)
    ds = D.load_dataset(f"folder:{root}", tmp_path / "dd")
    assert ds.num_classes == 3 and ds.class_names == ("a_cls", "b_cls", "c_cls")
    assert ds.train.images.shape == (12, 8, 8, 3) and len(ds.test) == 6
    # classes sorted by name, files by name: b_cls is label 1, its first file is row 4
    np.testing.assert_array_equal(ds.train.labels, np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(ds.train.images[4], written["train/b_cls/0"])  # lossless PNG
    cache = tmp_path / "imgs-decoded.npz"
    assert cache.is_file()
    # Second load comes from the cache: decoding would fail now.
    monkeypatch.setattr(F, "_decode", lambda path: (_ for _ in ()).throw(AssertionError(path)))
    again = D.load_dataset(f"folder:{root}", tmp_path / "dd")
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    # A changed file (new mtime) invalidates the cache.
    monkeypatch.undo()
    f = root / "test" / "a_cls" / "0000.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f)
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    changed = D.load_dataset(f"folder:{root}", tmp_path / "dd")
    assert (changed.test.images[0] == 0).all()
    # Normalization constants: computed from the train split for non-CIFAR classes.
    mean, std = D.channel_stats(ds.train.images)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)


def test_image_folder_errors(tmp_path):
    with pytest.raises(D.DataUnavailableError, match="nowhere"):
        D.load_dataset(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(D.DataError, match="test"):
        D.load_dataset(f"folder:{tmp_path / 'only_train'}")
    root = tmp_path / "mixed"
    _write_folder(root, classes=("a",), per_class=(2, 1))
    from PIL import Image

    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "train" / "a" / "9999.png")
    mixed = D.load_dataset(f"folder:{root}", tmp_path)  # several sizes: streamed, not refused
    assert not mixed.in_memory and len(mixed.train) == 3 and mixed.image_shape is None


# --------------------------------------------------------------------------- tfds



def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_tfds_data_source_mocked_without_tensorflow(tmp_path):
    # Reading never imports TensorFlow (not installed in this project's test env at all).
    code = textwrap.dedent(f"""
        import sys
        import tensorflow_datasets as tfds
        from flax_resnet import data as D
        with tfds.testing.mock_data(num_examples=12):
            for name, k in (("cifar10", 10), ("cifar100", 100)):
                ds = D.load_dataset(name, {str(tmp_path)!r})
                assert ds.train.images.shape == (12, 32, 32, 3), ds.train.images.shape
                assert ds.train.images.dtype.name == "uint8"
                assert ds.train.labels.dtype.name == "int32"
                assert len(ds.test) == 12 and ds.num_classes == k
                assert 0 <= ds.train.labels.min() and ds.train.labels.max() < k
        assert "tensorflow" not in sys.modules, "reading imported tensorflow"
        print("OK", ds.mean)
    """)
    r = _run_python(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK (0.5071" in r.stdout


def _offline(monkeypatch) -> None:
    import socket

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tfds_unprepared_offline_gives_howto_at_once(tmp_path, monkeypatch):
    _offline(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(D.DataUnavailableError) as e:
        D.load_dataset("cifar10", tmp_path)
    assert time.perf_counter() - t0 < 60  # not tfds's minutes of download retries
    msg = str(e.value)
    assert "www.cs.toronto.edu cannot be reached: no network in this test" in msg
    assert str(tmp_path / "downloads" / "manual") in msg and "cifar-10-binary.tar.gz" in msg
    assert "pip install 'flax_resnet[train]'" in msg


def test_unreachable_names_the_host():
    assert D._unreachable("https://127.0.0.1:9/x.tar.gz", timeout=2).startswith(
        "127.0.0.1 cannot be reached")


def _cifar10_binary_archive(path: Path, per_batch: int = 8) -> tuple[np.ndarray, ...]:
    """A small archive in the official CIFAR-10 binary format (cifar-10-binary.tar.gz):
    ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`` of records ``label byte + 3072
    bytes`` (the R, G, B planes of a 32x32 image) and ``batches.meta.txt``."""
    import io
    import tarfile

    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_batch).astype(np.uint8)
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        records = np.concatenate(
            [labels[:, None], images.transpose(0, 3, 1, 2).reshape(per_batch, -1)], axis=1)
        batches[name] = (records.tobytes(), images, labels)
    with tarfile.open(path, "w:gz") as tar:
        files = {name: data for name, (data, _, _) in batches.items()}
        files["batches.meta.txt"] = "\n".join(D.CIFAR10_CLASSES).encode() + b"\n"
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    train = [batches[f"data_batch_{i}.bin"] for i in range(1, 6)]
    return (np.concatenate([b[1] for b in train]), np.concatenate([b[2] for b in train]),
            batches["test_batch.bin"][1], batches["test_batch.bin"][2])


def test_first_run_prepares_cifar10_from_the_official_archive(tmp_path, jax_cache):
    """The README's first run offline: the official archive in DATA_DIR/downloads/manual is
    prepared through tfds (TensorFlow from the train extra) and trained on; later runs read
    the prepared copy without TensorFlow. Only the archive's checksum check is relaxed here
    (this archive is a small stand-in for the real one)."""
    data_dir = tmp_path / "data"
    (data_dir / "downloads" / "manual").mkdir(parents=True)
    train_x, train_y, test_x, test_y = _cifar10_binary_archive(
        data_dir / "downloads" / "manual" / "cifar-10-binary.tar.gz")
    code = textwrap.dedent(f"""
        import socket, sys
        from tensorflow_datasets.core.download import download_manager
        def refuse(*args, **kwargs):
            raise OSError("no network in this test")
        socket.create_connection = refuse
        def record_only(self, url, url_info, path):  # the stand-in's checksum is not CIFAR's
            self._recorded_url_infos[url] = url_info
        download_manager.DownloadManager._register_or_validate_checksums = record_only
        from flax_resnet.train_cli import main
        sys.exit(main(["--dataset", "cifar10", "--data-dir", {str(data_dir)!r}, "--depth",
                       "20", "--width", "0.25", "--batch-size", "8", "--epochs", "1",
                       "--no-progress", "--workdir", {str(tmp_path / "run")!r},
                       "--compilation-cache", {str(jax_cache)!r}]))
    """)
    r = _run_python(code, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "40 train / 8 test, 10 classes" in r.stdout
    assert (tmp_path / "run" / "summary.json").is_file()
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from flax_resnet import data as D
        ds = D.load_dataset("cifar10", {str(data_dir)!r})
        assert "tensorflow" not in sys.modules, "reading the prepared copy imported tensorflow"
        np.savez({str(tmp_path / "read.npz")!r}, *ds.train.images, labels=ds.train.labels,
                 test=ds.test.images, test_labels=ds.test.labels)
    """)
    r = _run_python(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    read = np.load(tmp_path / "read.npz")
    images = np.stack([read[f"arr_{i}"] for i in range(len(read["labels"]))])
    # tfds shuffles the examples it writes: compare as sets of (label, image) records
    def records(x, y):
        return sorted(bytes([label]) + img.tobytes() for img, label in zip(x, y, strict=True))

    assert records(images, read["labels"]) == records(train_x, train_y)
    assert records(read["test"], read["test_labels"]) == records(test_x, test_y)
