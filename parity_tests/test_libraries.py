"""torchvision, timm and Hugging Face ResNets in, with proven parity, and back out.

Each case of ``libraries.SUITE_CASES`` (the interop report also runs ``REPORT_ONLY``) is
built with random weights and norms, saved as its library saves it, converted by the command
line (float32, written to a Flax checkpoint and loaded from there) and by the Python API
(``convert.load`` in float64), and required to give the library's eval logits and every
stage's features: float64 within ``harness.F64_RTOL`` (the proof), float32 within ``F32_K``
x PyTorch's own float32 error + ``F32_FLOOR`` (the claim). The conversion is then exported
back and loaded by the library itself (strict), tensor for tensor bit-identical to what it
saved.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from flax_resnet import convert
from parity_tests import libraries as L

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _cli(*args: str) -> None:
    assert convert.main([str(a) for a in args]) == 0


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _export_and_reload(case: L.Case, flax_dir: str, original: torch.nn.Module, tmp: str) -> None:
    """Flax -> the library's own format -> the library, strict, bit-identical."""
    want = {k: v.clone() for k, v in original.state_dict().items()}
    if case.source == "hf":
        out = os.path.join(tmp, "hf_out")
        _cli(flax_dir, out, "--to", "hf")
        from transformers import ResNetForImageClassification

        back = ResNetForImageClassification.from_pretrained(out)
        _same_tensors(back.state_dict(), want)
        assert back.config.downsample_in_bottleneck == original.config.downsample_in_bottleneck
        assert back.config.downsample_in_first_stage == original.config.downsample_in_first_stage
        return
    if case.source == "timm" and case.saved_as == "dir":
        import timm

        out = os.path.join(tmp, "timm_out")
        _cli(flax_dir, out, "--to", "timm")
        back = timm.create_model("local-dir:" + out, pretrained=True)
        _same_tensors(back.state_dict(), want)
        return
    out = os.path.join(tmp, "back.pth")
    _cli(flax_dir, out, "--to", case.source)
    state_dict = torch.load(out, weights_only=True)
    with torch.no_grad():  # scramble the library's model, then load the export into it
        for tensor in original.state_dict().values():
            tensor.zero_()
    original.load_state_dict(state_dict, strict=True)
    _same_tensors(original.state_dict(), want)


@pytest.mark.parametrize("case", L.SUITE_CASES, ids=lambda c: c.label)
def test_library_model_converts_with_parity_and_goes_back(case, tmp_path):
    model = L.build(case)
    src = L.save(case, model, str(tmp_path))
    flax_dir = str(tmp_path / "flax")
    _cli(src, flax_dir)  # the command line, float32
    result = L.compare(case, src, model, load32=lambda: convert.load(flax_dir))
    assert not result.failures(), f"{case.label}: {result.failures()}"
    names = set(result.f64)
    assert {"logits", "stem", "stage1", "stage4"} <= names, names
    assert convert.resolve(flax_dir).preprocessing is not None  # the metadata travelled
    _export_and_reload(case, flax_dir, model, str(tmp_path))


def test_a_planted_slip_fails_the_library_proof(tmp_path, monkeypatch):
    """avg-down pooling that counts the zero padding (count_include_pad=True) differs only
    at odd edges: the float64 check must see it."""
    from flax_resnet import models

    case = next(c for c in L.CASES if c.name == "resnet26d")
    model = L.build(case)
    src = L.save(case, model, str(tmp_path))

    def counting_pad(x):
        import jax.numpy as jnp

        h, w = x.shape[1:3]
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    monkeypatch.setattr(models, "avg_pool_2x2", counting_pad)
    result = L.compare(case, src, model)
    assert any(k.startswith("float64") for k in result.failures()), result.f64


def test_timm_metadata_and_hf_preprocessor_travel(tmp_path):
    import timm

    case = L.Case("timm", "resnet18d", dict(L.TIMM_SMALL), "dir")
    src = L.save(case, L.build(case), str(tmp_path))
    pre = convert.resolve(src).preprocessing
    expected = timm.create_model("resnet18d").pretrained_cfg
    assert pre.mean == tuple(expected["mean"]) and pre.interpolation == expected["interpolation"]
    _cli(src, tmp_path / "flax")
    _cli(tmp_path / "flax", tmp_path / "timm", "--to", "timm")
    written = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert written["interpolation"] == expected["interpolation"]
    assert written["mean"] == list(expected["mean"])
    # a Hugging Face directory without preprocessor_config.json: ImageNet, said to be assumed,
    # and written out with the export
    hf = next(c for c in L.CASES if c.name == "resnet-18")
    hf_src = L.save(hf, L.build(hf), str(tmp_path))
    assert "assumed" in convert.resolve(hf_src).preprocessing.source
    _cli(hf_src, tmp_path / "hf_out", "--to", "hf")
    written = json.loads((tmp_path / "hf_out" / "preprocessor_config.json").read_text())
    assert written["image_mean"] == [0.485, 0.456, 0.406]
    # a bare torchvision state_dict: torchvision's ImageNet constants, said to be assumed
    torch.save(L.build(L.CASES[0]).state_dict(), tmp_path / "tv.pth")
    pre = convert.resolve(tmp_path / "tv.pth").preprocessing
    assert pre.std == (0.229, 0.224, 0.225) and "assumed" in pre.source


def test_hf_backbone_features_and_a_fresh_classifier(tmp_path):
    from transformers import ResNetBackbone, ResNetConfig

    cfg = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[8, 16, 32, 64],
                       embedding_size=8, out_features=["stem", "stage1", "stage2", "stage3",
                                                       "stage4"])
    torch.manual_seed(0)
    backbone = ResNetBackbone(cfg).eval()
    L.H.randomize_norms_(backbone, 3)
    backbone.save_pretrained(tmp_path / "bb")
    with pytest.raises(convert.ConversionError, match="backbone without a classifier"):
        convert.load(tmp_path / "bb")
    assert convert.main([str(tmp_path / "bb"), str(tmp_path / "f")]) == 2
    _cli(tmp_path / "bb", tmp_path / "f", "--num-classes", "3")
    model, config = convert.load(tmp_path / "f")
    assert config["num_classes"] == 3 and config["depth"] == 18
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 35)).astype(np.float32)
    with torch.no_grad():
        maps32 = backbone(torch.from_numpy(x)).feature_maps
        maps64 = backbone.double()(torch.from_numpy(x).double()).feature_maps
    model.eval()
    feats = model.features(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    for name, t32, t64 in zip(cfg.out_features, maps32, maps64, strict=True):
        got = np.asarray(feats[name]).transpose(0, 3, 1, 2)
        flax_err, torch_err = L.H.rel_err(got, t64.numpy()), L.H.rel_err(t32.numpy(), t64.numpy())
        assert L.H.float32_ok(flax_err, torch_err), (name, flax_err, torch_err)


@pytest.mark.parametrize("name, what", [
    ("seresnet50", "squeeze-and-excitation"),
    ("ecaresnet50d", "ECA attention"),
    ("resnetv2_50", "pre-activation ResNetV2"),
])
def test_unsupported_timm_variants_are_refused_by_their_keys(name, what, tmp_path, capsys):
    import timm

    torch.save(timm.create_model(name).state_dict(), tmp_path / "w.pth")
    assert convert.main([str(tmp_path / "w.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert what in err and "keys" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("layer_type", "preact"),
                                          ("model_type", "regnet")])
def test_unsupported_hf_config_fields_are_refused_by_name(field, value, tmp_path, capsys):
    case = next(c for c in L.CASES if c.name == "resnet-18")
    src = L.save(case, L.build(case), str(tmp_path))
    path = os.path.join(src, "config.json")
    config = json.loads(open(path).read())
    config[field] = value
    with open(path, "w") as f:
        json.dump(config, f)
    assert convert.main([src, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{field} {value!r}" in err, err


def test_exports_a_library_cannot_express_are_refused(tmp_path, capsys):
    case = next(c for c in L.CASES if c.name == "resnet26d")
    src = L.save(case, L.build(case), str(tmp_path))
    assert convert.main([src, str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "cannot be a Hugging Face ResNet: stem 'deep'" in capsys.readouterr().err
    assert convert.main([src, str(tmp_path / "tv.pth"), "--to", "torchvision"]) == 2
    assert "torchvision's ResNets have no deep stem" in capsys.readouterr().err


def test_model_name_fills_what_the_keys_do_not_show(tmp_path):
    """A v1 bottleneck (stride on the 1x1) has the keys of a v1.5 one: the name or the flag
    decides, and the wrong choice gives other logits."""
    config = convert.infer_config(L.build(L.CASES[0]).state_dict(), model="resnext50_32x4d")
    assert (config["groups"], config["width_per_group"]) == (32, 4)
    with pytest.raises(convert.ConversionError, match="model 'resnet51' is not allowed"):
        convert.infer_config({}, model="resnet51")
