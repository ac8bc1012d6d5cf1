"""Streamed image folders: images of any sizes and modes, decoded on demand by the grain
pipeline, torchvision's pixels, resumable bit-exact with any worker count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_resnet import trainer
from flax_resnet.config import make_config

REPO = Path(__file__).resolve().parents[1]
SYNSETS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(autouse=True, scope="module")
def _compile_once(jax_cache):
    import jax

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(jax_cache))
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def write_tree(root: Path, per_class: tuple[int, int] = (8, 3), seed: int = 0) -> list[Path]:
    """An ImageNet-layout tree: synset folders, JPEGs and PNGs of random sizes, and one
    grayscale, one palette and one CMYK image. Returns the files written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, synset in enumerate(SYNSETS):
            (root / split / synset).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(24, 90, 2))
                base = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
                pixels = np.clip(base * (c + 1) / 3 + rng.normal(0, 30, (h, w, 3)), 0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
                k = (c * n + i) % 6
                image = (image.convert("L") if k == 3 else
                         image.convert("P") if k == 4 else
                         image.convert("CMYK") if k == 5 else image)
                ext = "PNG" if k in (1, 4) else "JPEG"
                path = root / split / synset / f"{synset}_{i:05d}.{ext}"
                image.save(path, format="PNG" if ext == "PNG" else "JPEG")
                files.append(path)
    return files


def _config(root: Path, **overrides):
    fields = dict(dataset=f"folder:{root}", depth=18, width=0.125, batch_size=8, epochs=2,
                  image_size=32, resize_size=36, seed=3)
    return make_config("study", **{**fields, **overrides})


def _options(**overrides):
    return trainer.RunOptions(**{"progress": False, "data_workers": 0, "log_every": 1,
                                 **overrides})


def _final_state(workdir):
    from flax_resnet.checkpoint import Checkpointer

    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        return ckpt.restore_raw()[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs") / "tiny-imagenet"
    write_tree(root)
    return root


@pytest.fixture(scope="module")
def whole_run(tree, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("runs") / "whole"
    trainer.train_and_evaluate(_config(tree), workdir, _options())
    return workdir


def test_streamed_run_records_its_settled_config_and_events(tree, whole_run):
    config = json.loads((whole_run / "config.json").read_text())
    assert config["augment"] == "random-resized-crop"  # auto, for files of several sizes
    assert (config["image_size"], config["resize_size"]) == (32, 36)
    assert config["interpolation"] == "bilinear" and config["model"]["num_classes"] == 3
    rows = [json.loads(line) for line in (whole_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["test_acc"] >= 0 for r in rows)
    assert list((whole_run / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_mid_epoch_is_bit_exact_with_another_worker_count(tree, whole_run, tmp_path):
    from flax_resnet.checkpoint import state_checksums

    cut = tmp_path / "cut"
    trainer.train_and_evaluate(_config(tree), cut, _options(checkpoint_every_steps=1,
                                                            stop_after_steps=4))
    meta = json.loads((cut / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["data"] == {"epoch": 1, "index": 8, "seed": 3}  # 3 steps an epoch
    trainer.train_and_evaluate(_config(tree), cut, _options(data_workers=2))
    assert state_checksums(_final_state(cut)) == state_checksums(_final_state(whole_run))


def test_process_shares_of_a_batch_make_the_global_batch(tree):
    """What N processes read of global batch b (their rows) is, joined, what one reads."""
    from flax_resnet.folder import load_image_folder
    from flax_resnet.pipeline import _Reader
    from flax_resnet.transforms import RandomResizedCropFlip

    ds = load_image_folder(tree, stream=True, say=lambda line: None)
    transform = RandomResizedCropFlip(32)
    one = _Reader(ds.train, transform, 8, slice(0, 8), 3, 3, False)(4)
    halves = [_Reader(ds.train, transform, 8, rows, 3, 3, False)(4)
              for rows in (slice(0, 4), slice(4, 8))]
    for key in ("images", "labels"):
        assert np.array_equal(one[key], np.concatenate([h[key] for h in halves]))
    other_seed = _Reader(ds.train, transform, 8, slice(0, 8), 4, 3, False)(4)
    assert not np.array_equal(one["images"], other_seed["images"])


def test_eval_pixels_equal_torchvision_imagefolder(tree):
    """The evaluation batches hold exactly torchvision's ImageFolder + Resize + CenterCrop
    pixels, in ImageFolder's order and classes."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from flax_resnet.folder import load_image_folder
    from flax_resnet.pipeline import _Reader
    from flax_resnet.transforms import EvalTransform

    ds = load_image_folder(tree, stream=True, say=lambda line: None)
    reference = ImageFolder(os.fspath(tree / "val"), transform=T.Compose(
        [T.Resize(36), T.CenterCrop(32), T.PILToTensor()]))
    assert ds.class_names == tuple(reference.classes)
    n = len(reference)
    batch = _Reader(ds.test, EvalTransform(32, 36, "bilinear"), n + 3, slice(0, n + 3), 0, 0,
                    False)(0)
    assert batch["mask"].tolist() == [1.0] * n + [0.0] * 3
    for i in range(n):
        image, label = reference[i]
        assert np.array_equal(batch["images"][i], image.permute(1, 2, 0).numpy()), i
        assert batch["labels"][i] == label


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_bad_image_stops_with_a_checkpoint_or_is_skipped(tmp_path):
    root = tmp_path / "bad"
    files = write_tree(root, per_class=(4, 1), seed=1)
    bad = next(p for p in files if "train" in p.parts and p.suffix == ".JPEG")
    _truncate(bad)
    cfg = _config(root, batch_size=4, epochs=1)
    with pytest.raises(trainer.RunError, match=bad.name) as info:
        trainer.train_and_evaluate(cfg, tmp_path / "run", _options())
    assert "with a checkpoint" in str(info.value)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps, "no checkpoint before the bad batch"
    summary = trainer.train_and_evaluate(cfg, tmp_path / "run",
                                         _options(skip_bad_images=True))
    assert summary["global_step"] == 3
    assert str(bad) in (tmp_path / "run" / "bad_images.txt").read_text()


@pytest.mark.parametrize("layout, needle", [
    ("empty_class", "holds no"),
    ("val_only_class", "is not among"),
    ("no_images", "holds no"),
    ("no_train", "has no train subfolder"),  # only evaluation may go without
])
def test_folder_mistakes_are_named_before_training(tmp_path, layout, needle):
    from flax_resnet.data import DataError, load_dataset

    root = tmp_path / layout
    write_tree(root, per_class=(1, 2))
    if layout == "empty_class":
        (root / "train" / "n09999999").mkdir()
    elif layout == "no_train":
        shutil.rmtree(root / "train")
    elif layout == "val_only_class":
        (root / "val" / "n09999999").mkdir()
        (root / "val" / SYNSETS[0] / f"{SYNSETS[0]}_00000.JPEG").rename(
            root / "val" / "n09999999" / "x.JPEG")
    else:
        for p in (root / "val").rglob("*.*"):
            p.unlink()
    with pytest.raises(DataError, match=needle):
        load_dataset(f"folder:{root}", tmp_path, stream=True, say=lambda line: None)


def test_cli_streams_a_folder_and_exits_2_naming_a_bad_image(jax_cache, tmp_path):
    root = tmp_path / "cli"
    files = write_tree(root, per_class=(4, 1), seed=2)
    bad = next(p for p in files if "val" in p.parts and p.suffix == ".JPEG")
    _truncate(bad)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(jax_cache)}
    argv = [sys.executable, "train.py", "--dataset", f"folder:{root}", "--depth", "18",
            "--width", "0.125", "--batch-size", "4", "--epochs", "1", "--image-size", "32",
            "--data-workers", "1", "--workdir", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert bad.name in done.stderr + done.stdout and "Traceback" not in done.stderr
    assert "random-resized-crop" in done.stdout


def test_init_from_torchvision_weights_sets_the_eval_transform(tree, tmp_path):
    """A torchvision-named state_dict carries torchvision's ImageNet preprocessing: the run
    takes its interpolation, crop ratio and mean/std; explicit flags still win."""
    import torch
    import torchvision

    from flax_resnet.run_data import open_run_data
    from flax_resnet.weights import resolve

    path = tmp_path / "resnet18_tv.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    weights = resolve(str(path))
    data = open_run_data(_config(tree, image_size=None, resize_size=None,
                                 init_from=str(path)),
                         None, 0, False, weights, tmp_path, lambda line: None)
    assert (data.cfg.image_size, data.cfg.resize_size) == (224, 256)
    assert data.cfg.interpolation == "bilinear" and data.image_shape == (224, 224, 3)
    assert data.stats.mean == pytest.approx((0.485, 0.456, 0.406))
    small = open_run_data(_config(tree, image_size=64, resize_size=None, init_from=str(path),
                                  interpolation="bicubic"),
                          None, 0, False, weights, tmp_path, lambda line: None)
    assert (small.cfg.image_size, small.cfg.resize_size) == (64, 73)  # floor(64 / 0.875)
    assert small.cfg.interpolation == "bicubic"


def test_input_stats_data_of_a_streamed_set_come_from_a_seeded_sample(tree, tmp_path):
    from flax_resnet.run_data import open_run_data

    def stats(seed):
        return open_run_data(_config(tree, input_stats="data", seed=seed), None, 0, False,
                             None, tmp_path, lambda line: None).stats

    first, again, other = stats(0), stats(0), stats(1)
    assert first.mean == again.mean and first.std == again.std
    assert "a sample of 24 images" in first.source  # the whole (tiny) train split
    assert all(0.0 < m < 1.0 for m in first.mean) and first.mean != (0.485, 0.456, 0.406)
    assert other.mean == pytest.approx(first.mean)  # all 24 either way: same pixels


def test_eval_shares_of_hosts_make_the_global_eval_batch(tree):
    from flax_resnet.folder import load_image_folder
    from flax_resnet.pipeline import _Reader
    from flax_resnet.transforms import EvalTransform

    ds = load_image_folder(tree, stream=True, say=lambda line: None)
    transform = EvalTransform(32, 36)
    one = _Reader(ds.test, transform, 8, slice(0, 8), 0, 0, False)(1)  # rows 8..15: 1 real
    halves = [_Reader(ds.test, transform, 8, rows, 0, 0, False)(1)
              for rows in (slice(0, 4), slice(4, 8))]
    for key in ("images", "labels", "mask"):
        assert np.array_equal(one[key], np.concatenate([h[key] for h in halves]))
    assert one["mask"].tolist() == [1.0] + [0.0] * 7


def test_finetune_recipe_from_torchvision_weights_on_a_photo_folder(tree, tmp_path, capsys):
    """The finetune recipe through train.py's flags: the init_from weights' architecture
    (the recipe's depth 50 gives way), their preprocessing, and a fresh classifier even
    where theirs would fit."""
    from flax import nnx

    import flax_resnet as fr
    from flax_resnet.convert import save_pytorch
    from flax_resnet.train_cli import main

    # A small ResNet-18 (an eighth of the channels) under torchvision's names.
    path = tmp_path / "resnet18_tv.pth"
    save_pytorch(fr.create_resnet(18, width=0.125, num_classes=3, rngs=nnx.Rngs(0)), path,
                 naming="torchvision")
    workdir = tmp_path / "run"
    argv = ["--recipe", "finetune", "--dataset", f"folder:{tree}", "--init-from", str(path),
            "--width", "0.25", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
            "--data-workers", "0", "--no-progress", "--workdir", str(workdir),
            "--stop-after-steps", "1"]
    # width 0.25 does not fit the weights: the architecture holds unless a flag says so
    assert main(argv) == 2
    assert "shape mismatch" in capsys.readouterr().err
    argv.remove("--width"), argv.remove("0.25")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "with a fresh classifier (reset_classifier)" in out
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["depth"] == 18 and config["model"]["width"] == 0.125
    assert config["reset_classifier"]
    assert config["interpolation"] == "bilinear" and config["resize_size"] == 36  # 32/0.875
