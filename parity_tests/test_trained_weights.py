"""Really trained PyTorch weights on real images, converted through the CLI.

The fixture (``scripts/trained_weights_proof.py --sample-out``): a torch_ref ResNet-18 trained
in plain PyTorch on the CIFAR-10 JPEG copy (``scripts/train_torch_cifar.py``, saved with
``torch.save(model.state_dict())``) and the first 30 test images of each class, decoded. The
whole 10,000-image comparison is the script's (figures in docs/interop.md); here the same
criteria (``parity_tests/real_images.py``) on the sample, the same conversion command, and
``flax-resnet-eval`` on the images written as an image folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import flax_resnet as fr
import torch_ref
from flax_resnet import convert, eval_cli
from flax_resnet.norms import BatchNorm2d
from flax_resnet.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from parity_tests import real_images

FIXTURE = Path(__file__).parent / "fixtures" / "cifar10_trained"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    about = json.loads((FIXTURE / "about.json").read_text())
    sample = np.load(FIXTURE / "test_sample.npz")
    out = tmp_path_factory.mktemp("trained") / "flax"
    pt = FIXTURE / about["weights"]
    assert convert.main([str(pt), str(out), *about["convert_options"]]) == 0
    torch_model = torch_ref.create_resnet(**about["architecture"])
    torch_model.load_state_dict(torch.load(pt, weights_only=True))
    flax32, config = fr.load(out)
    assert {k: config[k] for k in about["architecture"]} == about["architecture"]
    with jax.enable_x64(True):
        flax64, _ = fr.load(out, dtype=jnp.float64)
    pre = fr.resolve(out).preprocessing
    return {"about": about, "images": sample["images"], "labels": sample["labels"],
            "classes": [str(c) for c in sample["classes"]], "dir": out, "torch": torch_model,
            "flax32": flax32, "flax64": flax64, "mean": pre.mean, "std": pre.std}


@pytest.fixture(scope="module")
def proof(trained):
    t = trained
    logits = real_images.all_logits(t["torch"], t["flax32"], t["flax64"], t["images"],
                                    t["mean"], t["std"])
    return logits, real_images.compare(logits, t["labels"])


def test_trained_weights_give_pytorchs_logits_on_real_images(proof):
    logits, report = proof
    assert real_images.failures(report) == [], report
    # trained weights, not random ones: far above chance (10%) on real images
    assert report["top1"]["torch32"] >= 0.5, report["top1"]
    # every float32 argmax either agrees or is a near-tie, so the accuracies differ by at
    # most the near-ties' count
    n_ties = len(report["argmax_differ"])
    assert abs(report["top1"]["flax32"] - report["top1"]["torch32"]) * report["images"] \
        <= n_ties + 1e-9
    assert report["top1"]["flax64"] == report["top1"]["torch64"]


def _planted(model, slip):
    model = copy.deepcopy(model)
    slip(model)
    return model


def test_planted_slips_fail_the_proof(trained, proof):
    """A BatchNorm that forgets a little of its running variance (eps 1e-3 instead of 1e-5),
    or the images normalised with ImageNet's statistics on one side only, fail."""
    t, (logits, _) = trained, proof

    def eps(model):
        for _, m in nnx.iter_modules(model):
            if isinstance(m, BatchNorm2d):
                m.eps = 1e-3

    with jax.enable_x64(True):
        slipped64 = _planted(t["flax64"], eps)
    bad = real_images.all_logits(t["torch"], _planted(t["flax32"], eps), slipped64,
                                 t["images"], t["mean"], t["std"])
    report = real_images.compare(bad, t["labels"])
    assert not report["ok_float64"] and not report["ok_float32"], report
    imagenet = real_images.all_logits(t["torch"], t["flax32"], t["flax64"], t["images"],
                                      IMAGENET_MEAN, IMAGENET_STD)
    mixed = real_images.Logits(logits.torch32, logits.torch64, imagenet.flax32,
                               imagenet.flax64)
    assert real_images.failures(real_images.compare(mixed, t["labels"]))


def test_flax_resnet_eval_on_the_images_as_a_folder(trained, proof, tmp_path, capsys):
    """The converted directory carries its preprocessing: flax-resnet-eval reads the PNG files
    (lossless: the same pixels) and predicts what the model predicts."""
    t, (logits, _) = trained, proof
    root = tmp_path / "cifar"
    names = []
    for i, (image, label) in enumerate(zip(t["images"], t["labels"], strict=True)):
        for split in ("train", "test"):  # an image folder names its classes by train/'s
            path = root / split / t["classes"][label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
        names.append(f"test/{t['classes'][label]}/{i:04d}.png")
    out = tmp_path / "eval.json"
    assert eval_cli.main([str(t["dir"]), "--dataset", f"folder:{root}", "--json", str(out),
                          "--per-image", "--no-progress", "--data-workers", "0"]) == 0
    result = json.loads(out.read_text())
    assert "resize 32 + center crop 32" in result["transform"], result["transform"]
    by_name = {Path(p["image"]).relative_to(root).as_posix(): p["top5"][0]
               for p in result["predictions"]}
    predicted = np.asarray([by_name[n] for n in names])
    # it normalises on the device in float32 (the proof in float64 first): only a near-tie
    # may come out otherwise, on some CPU
    differ = predicted != logits.flax32.argmax(1)
    assert not (differ & ~real_images.near_ties(logits)).any(), np.flatnonzero(differ)
    assert result["top1"] == pytest.approx(float((predicted == t["labels"]).mean()))
