"""Fine-tuning from each library's weights through ``train.py --init-from``, and back.

The run takes the architecture and the input mean/std from the weights (nothing but
``--init-from`` and the data on the command line), trains on a tiny image folder, and its
workdir exports to the library's own format, which the library loads strictly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flax_resnet import convert, train_cli
from parity_tests import libraries as L

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SOURCES = {
    "timm-dir": L.Case("timm", "resnet18d", dict(L.TIMM_SMALL), "dir"),
    "hf-dir": next(c for c in L.CASES if c.name == "resnet-18"),
    "timm-file": L.Case("timm", "resnet26t", dict(L.TIMM_SMALL), "file"),
    "torchvision-file": L.Case("torchvision", "resnet18"),  # a narrow one: see _save
}


def _save(case: L.Case, tmp_path: Path) -> str:
    """The case saved as its library does; torchvision's own ResNets are full size, so its
    naming is written from a narrow torch_ref ResNet-18 instead."""
    if case.source != "torchvision":
        return L.save(case, L.build(case), str(tmp_path))
    import torch_ref
    from flax_resnet.namings import from_torch_ref

    state_dict = torch_ref.create_resnet(18, width=0.125, num_classes=7).state_dict()
    names = from_torch_ref(state_dict, "torchvision")
    path = str(tmp_path / "resnet18_tv.pth")
    torch.save({names[k]: v for k, v in state_dict.items()}, path)
    return path


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
                    root / split / c / f"{i}.png")


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_finetune_from_library_weights_and_export_back(source, jax_cache, tmp_path, capsys):
    case = SOURCES[source]
    weights = _save(case, tmp_path)
    _image_folder(tmp_path / "imgs")
    workdir = tmp_path / "run"
    code = train_cli.main(["--dataset", f"folder:{tmp_path / 'imgs'}", "--init-from", weights,
                           "--batch-size", "8", "--epochs", "1", "--no-progress",
                           "--workdir", str(workdir), "--compilation-cache", str(jax_cache)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"architecture from init_from {weights}" in out and "initialised from" in out, out
    stats = json.loads((workdir / "preprocessing.json").read_text())
    assert stats["mean"] == [0.485, 0.456, 0.406], stats  # the weights', not the data set's
    origin = json.loads((workdir / "init_from.json").read_text())["origin"]
    assert origin["path"] == os.path.abspath(weights), origin
    if os.path.isfile(weights):
        assert origin["sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    # back to the library: a 2-class model of the same architecture, loaded strictly
    if case.source == "hf":
        assert convert.main([str(workdir), str(tmp_path / "out"), "--to", "hf"]) == 0
        from transformers import ResNetForImageClassification

        back = ResNetForImageClassification.from_pretrained(tmp_path / "out")
        assert back.config.num_labels == 2
    elif case.saved_as == "dir":
        import timm

        assert convert.main([str(workdir), str(tmp_path / "out"), "--to", "timm"]) == 0
        back = timm.create_model("local-dir:" + str(tmp_path / "out"), pretrained=True)
        assert back.fc.out_features == 2
    elif case.source == "timm":
        import timm

        assert convert.main([str(workdir), str(tmp_path / "out.pth"), "--to", "timm"]) == 0
        back = timm.create_model(case.name, num_classes=2, **case.kwargs)
        back.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=True)
    else:
        assert convert.main([str(workdir), str(tmp_path / "out.pth"), "--to", "torchvision"]) == 0
        out = torch.load(tmp_path / "out.pth", weights_only=True)
        assert out["fc.weight"].shape == (2, 64) and "layer4.1.bn2.running_var" in out
