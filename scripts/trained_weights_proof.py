#!/usr/bin/env python
"""Trained PyTorch weights, converted through the CLI, compared on every real test image.

Takes the ``torch.save(model.state_dict())`` file of ``scripts/train_torch_cifar.py``,
converts it with ``flax-resnet-convert`` as a user would, and compares PyTorch's model with
the converted one on the image folder's whole test split (criteria:
``parity_tests/real_images.py``): both accuracies, every float32 argmax that differs (each
must be a near-tie), the worst float32 error against PyTorch's own, and float64. Then runs
``flax-resnet-eval`` on the folder and checks its top-1 equals PyTorch's.

    python scripts/trained_weights_proof.py data/cifar10-jpeg --weights data/cifar_r18w0125.pt \
        --json bench/results/trained-weights.json
    # the CI sample: 30 test images per class and the checkpoint, into the test fixtures
    python scripts/trained_weights_proof.py data/cifar10-jpeg --weights data/cifar_r18w0125.pt \
        --sample-out parity_tests/fixtures/cifar10_trained

The exit status is 1 if a criterion fails.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from parity_report import device  # the sibling scripts (this directory is on sys.path)
from train_torch_cifar import ARCHITECTURE, MEAN, STD, read_split

import flax_resnet as fr
import torch_ref
from parity_tests import real_images

SAMPLE_PER_CLASS = 30
CONVERT_OPTIONS = ("--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
                   "--image-size", "32", "--resize-size", "32")


def convert_with_cli(weights: Path, out: Path) -> None:
    """As a user would: the file and the preprocessing it was trained with."""
    subprocess.run([sys.executable, "-m", "flax_resnet.convert", str(weights), str(out),
                    *CONVERT_OPTIONS], check=True)


def eval_with_cli(converted: Path, root: Path, json_out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "flax_resnet.eval_cli", str(converted), "--dataset",
                    f"folder:{root}", "--json", str(json_out), "--no-progress", "--per-image"],
                   check=True)
    return json.loads(json_out.read_text())


def write_sample(out: Path, weights: Path, images: np.ndarray, labels: np.ndarray,
                 classes: list[str]) -> None:
    """The first ``SAMPLE_PER_CLASS`` test images of each class (uint8) and the weights."""
    keep = np.concatenate([np.flatnonzero(labels == c)[:SAMPLE_PER_CLASS]
                           for c in range(len(classes))])
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "test_sample.npz", images=images[keep], labels=labels[keep],
                        classes=np.asarray(classes))
    shutil.copyfile(weights, out / weights.name)
    (out / "about.json").write_text(json.dumps(
        {"architecture": ARCHITECTURE, "weights": weights.name,
         "convert_options": CONVERT_OPTIONS, "images": "the first "
         f"{SAMPLE_PER_CLASS} test images of each class, decoded (uint8 HWC)"}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="the image folder: ROOT/test/CLASS/*")
    p.add_argument("--weights", type=Path, required=True, help="the torch.save'd state_dict")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--sample-out", type=Path, default=None,
                   help="also write the CI sample and the weights into this folder")
    args = p.parse_args(argv)

    t0 = time.time()
    images, labels, classes = read_split(args.root, "test")
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "flax"
        convert_with_cli(args.weights, converted)
        flax32, config = fr.load(converted)
        with jax.enable_x64(True):
            flax64, _ = fr.load(converted, dtype=jnp.float64)
        assert {k: config[k] for k in ARCHITECTURE} == ARCHITECTURE, config
        torch_model = torch_ref.create_resnet(**ARCHITECTURE)
        torch_model.load_state_dict(torch.load(args.weights, weights_only=True))
        logits = real_images.all_logits(torch_model, flax32, flax64, images, MEAN, STD)
        report = real_images.compare(logits, labels)
        cli = eval_with_cli(converted, args.root, Path(tmp) / "eval.json")
    files = sorted(str(f.relative_to(args.root)) for f in (args.root / "test").glob("*/*"))
    by_file = {Path(os.path.relpath(r["image"], args.root)).as_posix(): r["top5"][0]
               for r in cli["predictions"]}
    cli_pred = np.asarray([by_file[f] for f in files])
    report["eval_cli_top1"] = cli["top1"]
    # flax-resnet-eval normalises on the device in float32, not in float64 first: it may
    # differ from the model's argmax only at a near-tie
    differ = cli_pred != logits.flax32.argmax(1)
    report["eval_cli_argmax_equal_flax32"] = int((~differ).sum())
    failed = real_images.failures(report)
    if (differ & ~real_images.near_ties(logits)).any():
        failed.append(f"flax-resnet-eval's argmax differs from the model's, no near-tie, on "
                      f"images {np.flatnonzero(differ & ~real_images.near_ties(logits))}")
    report["command"] = "python scripts/trained_weights_proof.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    report["date"] = datetime.date.today().isoformat()
    report["versions"] = {p: md.version(p) for p in ("jax", "flax", "torch", "pillow")}
    report["device"] = f"{device()} · python {platform.python_version()}"
    report["seconds"] = round(time.time() - t0)
    t = report["top1"]
    print(f"{report['images']} images: top-1 torch32 {100 * t['torch32']:.2f}%, flax32 "
          f"{100 * t['flax32']:.2f}%, torch64 {100 * t['torch64']:.2f}%, flax64 "
          f"{100 * t['flax64']:.2f}%, flax-resnet-eval {100 * cli['top1']:.2f}%")
    print(f"float64: worst {report['float64_worst']:.2e} (bar {report['float64_bar']:g})")
    print(f"float32: flax worst {report['float32_flax_worst']:.2e}, torch worst "
          f"{report['float32_torch_worst']:.2e}, median flax/torch "
          f"{report['float32_median_ratio']:.2f}, worst image at "
          f"{100 * report['float32_worst_bound_used']:.0f}% of its bound "
          f"({report['float32_bar']})")
    print(f"argmax differs on {len(report['argmax_differ'])} images: "
          f"{report['argmax_differ']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.sample_out:
        write_sample(args.sample_out, args.weights, images, labels, classes)
    for f in failed:
        print("FAILED:", f)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
