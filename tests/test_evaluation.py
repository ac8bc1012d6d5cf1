"""flax-resnet-eval: accuracy of weights on an image folder, against PyTorch computing it
with torchvision's ImageFolder and transforms on the same files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.test_pipeline import write_tree


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synset tree and a small 3-class ResNet-18 saved under torchvision's names."""
    from flax import nnx

    import flax_resnet as fr
    from flax_resnet.convert import save_pytorch

    root = tmp_path_factory.mktemp("eval") / "photos"
    write_tree(root, per_class=(1, 6), seed=5)
    model = fr.create_resnet(18, width=0.125, num_classes=3, rngs=nnx.Rngs(3))
    path = root.parent / "r18_tv.pth"
    save_pytorch(model, path, naming="torchvision")
    return root, path, model


def _torch_logits(root, model):
    """torch_ref's logits on torchvision's ImageFolder + Resize(256) + CenterCrop(224)."""
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    import torch_ref
    from flax_resnet.convert import to_torch_state_dict

    twin = torch_ref.create_resnet(18, width=0.125, num_classes=3)
    twin.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in
                          to_torch_state_dict(model).items()})
    twin.eval()
    data = ImageFolder(str(root / "val"), transform=T.Compose([
        T.Resize(256), T.CenterCrop(224), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        logits = twin(images)  # NCHW, as torchvision gives it
    return logits.numpy(), np.array(data.targets)


def test_eval_cli_equals_pytorch_on_the_same_files(setup, tmp_path, capsys):
    from flax_resnet.eval_cli import main

    root, path, model = setup
    out = tmp_path / "eval.json"
    code = main([str(path), "--dataset", f"folder:{root}", "--batch-size", "4",
                 "--data-workers", "0", "--per-image", "--json", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    logits, labels = _torch_logits(root, model)
    assert result["images"] == len(labels) == 18
    ours = np.array([p["top5"][0] for p in result["predictions"]])
    assert [p["label"] for p in result["predictions"]] == labels.tolist()
    # Every differing argmax must be a near-tie of PyTorch's logits (float32 rounding).
    ordered = np.sort(logits, 1)
    margin = ordered[:, -1] - ordered[:, -2]
    differ = ours != logits.argmax(1)
    assert not differ[margin > 1e-4].any(), (ours, logits.argmax(1), margin)
    assert result["top1"] == pytest.approx(float((ours == labels).mean()))
    assert result["top5"] == 1.0  # three classes: the top five hold them all
    assert set(result["per_class_top1"]) == {"n01440764", "n01443537", "n01484850"}
    assert "top-1" in capsys.readouterr().out


def test_a_folder_of_evaluation_images_alone_is_enough(setup, tmp_path, capsys):
    """ImageNet users often hold val/ only: its class folders then name the classes, all of
    them needed; results equal those with train/ beside it."""
    import shutil

    from flax_resnet.eval_cli import main

    root, path, _ = setup
    only_val = tmp_path / "only_val"
    shutil.copytree(root / "val", only_val / "val")
    results = []
    for where in (root, only_val):
        out = tmp_path / f"{where.name}.json"
        assert main([str(path), "--dataset", f"folder:{where}", "--batch-size", "6",
                     "--data-workers", "0", "--per-image", "--json", str(out),
                     "--no-progress"]) == 0, capsys.readouterr().err
        result = json.loads(out.read_text())
        results.append([(os.path.relpath(p["image"], where), p["label"], p["top5"])
                        for p in result["predictions"]])
    assert results[0] == results[1]
    shutil.rmtree(only_val / "val" / "n01484850")
    assert main([str(path), "--dataset", f"folder:{only_val}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "3 outputs but" in err and "every class needs one" in err, err


def test_eval_cli_bad_input_exits_2(setup, tmp_path, capsys):
    from flax import nnx

    import flax_resnet as fr
    from flax_resnet.convert import save_pytorch
    from flax_resnet.eval_cli import main

    root, path, _ = setup
    assert main([str(tmp_path / "nothing.pth"), "--dataset", f"folder:{root}"]) == 2
    assert "nothing.pth" in capsys.readouterr().err
    assert main([str(path), "--dataset", f"folder:{tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    four = tmp_path / "four.pth"
    save_pytorch(fr.create_resnet(18, width=0.125, num_classes=4, rngs=nnx.Rngs(0)), four,
                 naming="torchvision")
    assert main([str(four), "--dataset", f"folder:{root}", "--no-progress"]) == 2
    assert "4 outputs but" in capsys.readouterr().err
    assert main([str(path), "--dataset", f"folder:{root}", "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err


def test_predict_names_classes_and_agrees_with_eval(setup, tmp_path, capsys):
    from flax import nnx

    import flax_resnet as fr
    from flax_resnet import trainer
    from flax_resnet.config import make_config
    from flax_resnet.convert import save_pytorch
    from flax_resnet.predict_cli import main
    from flax_resnet.prediction import imagenet_class_names

    root, path, _ = setup
    images = sorted(str(p) for p in (root / "val").rglob("*.*"))[:4]
    out = tmp_path / "pred.json"
    assert main([str(path), *images, "--top-k", "2", "--json", str(out)]) == 0
    preds = json.loads(out.read_text())
    assert [p["image"] for p in preds] == images
    assert all(len(p["top"]) == 2 and p["top"][0]["probability"] >= p["top"][1]["probability"]
               for p in preds)
    assert preds[0]["top"][0]["name"].startswith("class ")  # a bare file names nothing
    evaluated = tmp_path / "eval.json"
    from flax_resnet.eval_cli import main as evaluate

    assert evaluate([str(path), "--dataset", f"folder:{root}", "--data-workers", "0",
                     "--per-image", "--json", str(evaluated), "--no-progress"]) == 0
    by_image = {p["image"]: p["top5"][0] for p in json.loads(evaluated.read_text())
                ["predictions"]}
    assert [p["top"][0]["class"] for p in preds] == [by_image[i] for i in images]

    # A run directory names its classes with the folder names it trained on.
    cfg = make_config("study", dataset=f"folder:{root}", depth=18, width=0.125,
                      batch_size=3, epochs=1, image_size=32, resize_size=36)
    run = tmp_path / "run"
    trainer.train_and_evaluate(cfg, run, trainer.RunOptions(progress=False, data_workers=0))
    assert main([str(run), images[0]]) == 0
    assert "n014" in capsys.readouterr().out

    # 1000 outputs: ImageNet's names.
    thousand = tmp_path / "thousand.pth"
    save_pytorch(fr.create_resnet(18, width=0.125, num_classes=1000, rngs=nnx.Rngs(0)),
                 thousand, naming="torchvision")
    assert main([str(thousand), images[0], "--json", str(out)]) == 0
    top = json.loads(out.read_text())[0]["top"][0]
    assert top["name"] == imagenet_class_names()[top["class"]]
    assert len(imagenet_class_names()) == 1000 and imagenet_class_names()[0] == "tench"

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main([str(path), str(bad)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
