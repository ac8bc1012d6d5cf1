"""Image-folder data sets: ``PATH/train/CLASS/*`` and ``PATH/val/CLASS/*`` (or ``test/``).

Classes are the sorted folder names of ``train/`` (ImageNet's synsets then give the 1000-class
order of torchvision, timm and tfds), files are sorted by name; images of any sizes and modes
(JPEG, PNG; converted to RGB as torchvision's ``ImageFolder`` does). A set whose images all
have one size and whose decoded size is at most ``IN_MEMORY_LIMIT`` is decoded once into
memory (cached as ``.npz`` beside the folder, keyed by every file's path, size and mtime);
any other set streams (``sources.ImageFileSource``), decoded on demand by the loader.
Free of JAX.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flax_resnet.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from flax_resnet.sources import (
    ArraySource,
    DataError,
    Dataset,
    DataUnavailableError,
    ImageFileSource,
    array_source,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
EVAL_SPLITS = ("val", "test")
IN_MEMORY_LIMIT = 1 << 30  # bytes of decoded uint8 pixels

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

Entries = list[tuple[Path, int]]


def _layout_hint(root: Path) -> str:
    return f"expected {root}/train/CLASS/*.jpg|png and {root}/val/CLASS/* (or test/)"


def list_folder(root: Path, eval_only: bool = False) -> tuple[list[str], Entries, Entries, str]:
    """The classes, the train and eval files, and a key over every file's path, size and
    mtime. Everything wrong with the layout is named here, before any training.

    ``eval_only`` (evaluating weights): without ``train/`` the classes are the eval split's
    sorted folder names (no train files); the caller checks they are all there."""
    if not root.is_dir():
        raise DataUnavailableError(
            f"image folder {str(root)!r} does not exist ({_layout_hint(root)}). For the "
            "CIFAR-10 JPEG copy:\n    mkdir -p data && tar xzf cifar10-jpeg.tar.gz -C data\n"
            "    --dataset folder:data/cifar10-jpeg")
    eval_split = next((s for s in EVAL_SPLITS if (root / s).is_dir()), None)
    has_train = (root / "train").is_dir()
    missing = [s for s, there in (("train", has_train or eval_only),
                                  ("val or test", eval_split)) if not there]
    if missing:
        raise DataError(f"image folder {str(root)!r} has no {' and no '.join(missing)} "
                        f"subfolder; {_layout_hint(root)}")
    assert eval_split is not None
    class_split = "train" if has_train else eval_split
    classes = sorted(d.name for d in os.scandir(root / class_split) if d.is_dir())
    if not classes:
        raise DataError(f"image folder {str(root / class_split)!r} has no class subfolders; "
                        f"{_layout_hint(root)}")
    index = {c: i for i, c in enumerate(classes)}
    digest = hashlib.sha256(os.fspath(root.absolute()).encode())
    splits: dict[str, Entries] = {}
    splits["train"] = []
    for split in ("train", eval_split) if has_train else (eval_split,):
        entries: Entries = []
        for cdir in sorted(os.scandir(root / split), key=lambda d: d.name):
            if not cdir.is_dir():
                continue
            if cdir.name not in index:
                raise DataError(f"class {cdir.name!r} in {str(root / split)!r} is not among "
                                f"the {len(classes)} classes of {str(root / class_split)!r} "
                                f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
            before = len(entries)
            for f in sorted(os.scandir(cdir.path), key=lambda d: d.name):
                if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS):
                    st = f.stat()
                    entries.append((Path(f.path), index[cdir.name]))
                    digest.update(f"{split}/{cdir.name}/{f.name}:{st.st_size}:"
                                  f"{st.st_mtime_ns}\n".encode())
            if len(entries) == before:
                raise DataError(f"class folder {cdir.path!r} holds no "
                                f"{'/'.join(IMAGE_EXTENSIONS)} images; add images or remove "
                                "the folder")
        if not entries:
            raise DataError(f"image folder {str(root / split)!r} holds no "
                            f"{'/'.join(IMAGE_EXTENSIONS)} files; {_layout_hint(root)}")
        splits[split] = entries
    return classes, splits["train"], splits[eval_split], digest.hexdigest()[:32]


def _decode(path: Path) -> np.ndarray:
    from flax_resnet.transforms import BadImageError, load_rgb

    try:
        return np.asarray(load_rgb(path), dtype=np.uint8)
    except BadImageError as e:
        raise DataError(f"{e}; replace or remove it") from None


def _size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image {str(path)!r} cannot be decoded ({type(e).__name__}: {e}); "
                        "replace or remove it") from None


def _parallel(fn: Callable, items: list) -> list:
    workers = min(32, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while reading
        return list(pool.map(fn, items, chunksize=256))


def _one_size(entries: Entries) -> tuple[int, int] | None:
    """The size every image has, or None; reads only the headers, and only while the
    decoded set could fit ``IN_MEMORY_LIMIT``."""
    h, w = _size(entries[0][0])
    if len(entries) * h * w * 3 > IN_MEMORY_LIMIT:
        return None
    sizes = set(_parallel(_size, [p for p, _ in entries]))
    return (h, w) if sizes == {(h, w)} else None


def _cache_candidates(root: Path, data_dir: str | os.PathLike) -> list[Path]:
    name = root.absolute().name or "folder"
    return [root.absolute().parent / f"{name}-decoded.npz",
            Path(data_dir).expanduser().absolute() / f"{name}-decoded.npz"]


def _read_cache(candidates: list[Path], key: str) -> dict[str, np.ndarray] | None:
    for cache in candidates:
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    if str(z["key"]) == key:
                        return {k: z[k] for k in z.files}
            except (OSError, ValueError, KeyError):
                pass  # unreadable or stale cache: decode again
    return None


def _write_cache(candidates: list[Path], arrays: dict[str, np.ndarray]) -> None:
    for cache in candidates:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cache)  # atomic: readers never see a partial cache
            return
        except OSError:
            continue


def _decoded(entries: Entries) -> ArraySource:
    arrays = _parallel(_decode, [p for p, _ in entries])
    return array_source(np.stack(arrays), np.array([label for _, label in entries]))


def load_image_folder(path: str | os.PathLike, data_dir: str | os.PathLike = "data",
                      stream: bool = False, say: Callable[[str], None] | None = None,
                      eval_only: bool = False) -> Dataset:
    """The image folder at ``path``: decoded in memory when its images all have one size
    and fit ``IN_MEMORY_LIMIT`` (and ``stream`` is not asked), streamed from the files
    otherwise. ``say`` receives one line telling which. ``eval_only``: streamed, and
    ``train/`` may be absent (``list_folder``).

    Input statistics: CIFAR-10's when the classes are CIFAR-10's; else, in memory, the
    per-channel mean and std of the train split; streamed, ImageNet's (a run may estimate
    them from a sample instead, ``--input-stats data``).
    """
    say = say or (lambda line: print(line, file=sys.stderr))
    root = Path(path)
    classes, train_files, eval_files, key = list_folder(root, eval_only)
    stream = stream or eval_only
    n = len(train_files) + len(eval_files)
    cifar = tuple(classes) == CIFAR10_CLASSES
    arrays = None if stream else _read_cache(candidates := _cache_candidates(root, data_dir),
                                             key)
    if arrays is None and not stream:
        size = _one_size(train_files)
        if size is not None and _one_size(eval_files) == size:
            say(f"decoding {n} images of {size[0]}x{size[1]} under {root} into memory "
                f"({n * size[0] * size[1] * 3 / 2**20:,.0f} MiB, cached for the next run)")
            train, test = _decoded(train_files), _decoded(eval_files)
            arrays = {"key": np.array(key), "train_images": train.images,
                      "train_labels": train.labels, "test_images": test.images,
                      "test_labels": test.labels}
            _write_cache(candidates, arrays)
    name = f"folder:{root}"
    if arrays is not None:
        train = array_source(arrays["train_images"], arrays["train_labels"])
        test = array_source(arrays["test_images"], arrays["test_labels"])
        say(f"data {name}: {n} images of {train.image_shape[0]}x{train.image_shape[1]} held "
            "decoded in memory")
        if cifar:
            mean, std, source = CIFAR10_MEAN, CIFAR10_STD, "CIFAR-10's constants"
        else:
            (mean, std), source = channel_stats(train.images), "the train split's pixels"
        return Dataset(name, train, test, len(classes), mean, std, tuple(classes), source)
    why = "as asked" if stream else "images of several sizes or over " \
        f"{IN_MEMORY_LIMIT / 2**30:.0f} GiB decoded"
    say(f"data {name}: {n} images streamed from the files ({why}), decoded on demand")
    train_src = ImageFileSource([p for p, _ in train_files], [c for _, c in train_files])
    eval_src = ImageFileSource([p for p, _ in eval_files], [c for _, c in eval_files])
    mean, std, source = (CIFAR10_MEAN, CIFAR10_STD, "CIFAR-10's constants") if cifar else \
        (IMAGENET_MEAN, IMAGENET_STD, "ImageNet's constants")
    return Dataset(name, train_src, eval_src, len(classes), mean, std, tuple(classes), source)


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
