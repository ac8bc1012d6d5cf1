"""torchvision ResNet-18/34/50/101/152 weights in flax_resnet, and the conversion CLI.

The torchvision models are built with ``weights=None`` (nothing is downloaded); their
BatchNorm affine parameters and running statistics are then randomised with a fixed seed, so
that eval-mode BatchNorm is not the identity and a swapped mean/var or scale/bias would show.
Logits must agree within 1e-4 · max|y| in eval mode, at 224×224 and at 32×32, for all five
depths (on 2 CPU cores the whole parametrised set takes well under a minute: the JAX side runs
op by op, without compiling the whole network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

import torch_ref
from flax_resnet import convert as C
from flax_resnet import create_resnet

DEPTHS = (18, 34, 50, 101, 152)
REL_TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def torchvision_resnet(depth: int, seed: int = 0, num_classes: int = 1000) -> torch.nn.Module:
    """``torchvision.models.resnet{depth}(weights=None)`` with random BatchNorm state, eval.

    Scales and shifts are random. Running statistics drawn without regard to the
    activations let the residual stream blow up (logits ~6e11 at depth 152, where the
    relative tolerance would hide whole layers' worth of error), so they are measured on one
    batch of 64×64 noise images in train mode and then perturbed at random: eval-mode
    BatchNorm is far from the identity and from exact normalisation, and max|logit| stays
    between ~3 and ~1e5 (ResNet-152 at 224×224).
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            m.reset_running_stats()
            m.momentum = None  # one batch: running stats = that batch's (unbiased) stats
        model.train()(torch.randn(4, 3, 64, 64, generator=gen))
        for m in norms:
            n = m.num_features
            std = m.running_var.sqrt()
            m.running_mean.add_(torch.randn(n, generator=gen) * 0.2 * std)
            m.running_var.mul_(torch.rand(n, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))
            m.momentum = 0.1
    return model.eval()


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def torch_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def flax_logits(model: nnx.Module, x: torch.Tensor) -> np.ndarray:
    return np.asarray(model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))


def assert_close(y_flax: np.ndarray, y_torch: np.ndarray) -> None:
    err = float(np.max(np.abs(y_flax - y_torch)))
    scale = float(np.max(np.abs(y_torch)))
    assert err <= REL_TOL * scale, f"max |Δ| {err:.3g} > {REL_TOL} · max|y| = {REL_TOL * scale:.3g}"


def flax_resnet(depth: int, num_classes: int = 1000, **kw) -> nnx.Module:
    return create_resnet(depth, num_classes=num_classes, rngs=nnx.Rngs(0), **kw)


def abstract_resnet(depth: int, **kw) -> nnx.Module:
    return nnx.eval_shape(lambda: create_resnet(depth, rngs=nnx.Rngs(0), **kw))


@pytest.fixture(scope="module", params=DEPTHS, ids=[f"resnet{d}" for d in DEPTHS])
def pair(request):
    """(depth, randomised torchvision model, Flax model loaded from it, in eval mode)."""
    depth = request.param
    tv = torchvision_resnet(depth, seed=depth)
    # An abstract model (shapes only) skips the random init, which every load overwrites; on a
    # concrete model the load is the same code (test_load_pretrained_keeps_fresh_classifier).
    model = abstract_resnet(depth, num_classes=1000)
    C.load_torch_state_dict(model, tv.state_dict(), naming="torchvision")
    model.eval()
    return depth, tv, model


# --- key maps -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", DEPTHS)
def test_key_map_is_exact_both_ways(depth):
    with torch.device("meta"):  # shapes only: no init, no memory
        tv_keys = list(getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict())
        ref_keys = list(torch_ref.models.create_resnet(depth, num_classes=1000).state_dict())
    assert [C.torch_ref_key(k) for k in tv_keys] == ref_keys
    assert [C.torchvision_key(k) for k in ref_keys] == tv_keys
    flax_keys = [k for k, _, _ in C.model_variables(abstract_resnet(depth), "torchvision")]
    assert sorted(flax_keys) == sorted(tv_keys)
    assert C.detect_naming(tv_keys) == "torchvision"
    assert C.detect_naming(ref_keys) == "torch_ref"


def test_key_map_examples_and_rejects():
    pairs = {
        "conv1.weight": "conv1.0.weight",
        "bn1.running_var": "conv1.1.running_var",
        "layer1.0.conv2.weight": "conv2_x.0.residual_function.3.weight",
        "layer1.0.bn2.bias": "conv2_x.0.residual_function.4.bias",
        "layer3.5.conv3.weight": "conv4_x.5.residual_function.6.weight",
        "layer3.5.bn3.num_batches_tracked": "conv4_x.5.residual_function.7.num_batches_tracked",
        "layer2.0.downsample.1.running_mean": "conv3_x.0.shortcut.1.running_mean",
        "layer4.1.bn1.norm.weight": "conv5_x.1.residual_function.1.norm.weight",  # RMSNorm2d
        "fc.bias": "fc.bias",
    }
    for tv, ref in pairs.items():
        assert C.torch_ref_key(tv) == ref
        assert C.torchvision_key(ref) == tv
    for bad in ("layer1.0.conv0.weight", "layer1.0.relu.weight", "avgpool.weight", "bn2.weight"):
        with pytest.raises(C.ConversionError, match="no torch_ref name"):
            C.torch_ref_key(bad)
    for bad in ("conv2_x.0.residual_function.2.weight", "conv1.3.weight", "head.weight"):
        with pytest.raises(C.ConversionError, match="no torchvision name"):
            C.torchvision_key(bad)


@pytest.mark.parametrize("depth", DEPTHS)
def test_infer_config_from_torchvision(depth):
    with torch.device("meta"):
        sd = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=7)
    sd = sd.state_dict()
    assert C.infer_config(sd) == dict(
        depth=depth, stem="imagenet", norm="bn", shortcut="B", num_classes=7, width=1.0,
        in_channels=3,
    )


def test_infer_config_from_torch_ref_variants():
    cases = [
        dict(depth=20, norm="bn", stem="cifar", shortcut="A", num_classes=10, width=1.0),
        dict(depth=56, norm="bn", stem="cifar", shortcut="B", num_classes=100, width=2.0),
        dict(depth=18, norm="rms", stem="cifar", shortcut="B", num_classes=10, width=0.5),
        dict(depth=50, norm="bn", stem="imagenet", shortcut="B", num_classes=5, width=0.25),
        dict(depth=34, norm="bn", stem="imagenet", shortcut="B", num_classes=5, width=0.3),
    ]
    with torch.device("meta"):
        for cfg in cases:
            sd = torch_ref.models.create_resnet(**cfg).state_dict()
            assert C.infer_config(sd) == {**cfg, "in_channels": 3}, cfg
        sd = torch_ref.models.create_resnet(18, norm="gn", num_classes=10).state_dict()
    with pytest.raises(C.ConversionError, match=r"set norm \(--norm\)"):
        C.infer_config(sd)
    assert C.infer_config(sd, norm="groupnorm")["norm"] == "gn"
    assert C.infer_config(sd, norm="gn", depth=34, num_classes=3)["depth"] == 34  # overrides win


# --- parity -------------------------------------------------------------------------------


def test_logits_224(pair):
    _, tv, model = pair
    x = images(224)
    assert_close(flax_logits(model, x), torch_logits(tv, x))


def test_logits_32(pair):
    _, tv, model = pair
    x = images(32)
    assert_close(flax_logits(model, x), torch_logits(tv, x))


def test_export_to_torchvision_is_exact(pair):
    depth, tv, model = pair
    sd = C.to_torch_state_dict(model, naming="torchvision")
    original = tv.state_dict()
    assert sorted(sd) == sorted(original)
    for key, value in original.items():
        assert sd[key].dtype == value.dtype and sd[key].shape == value.shape, key
        assert torch.equal(sd[key], value), key
    fresh = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    fresh.load_state_dict(sd, strict=True)
    x = images(32)
    np.testing.assert_array_equal(torch_logits(fresh.eval(), x), torch_logits(tv, x))


# --- Flax checkpoints ----------------------------------------------------------------------


def test_flax_checkpoint_round_trip(tmp_path):
    tv = torchvision_resnet(18)
    model = abstract_resnet(18, num_classes=1000)
    C.load_torch_state_dict(model, tv.state_dict(), naming="torchvision")
    config = dict(depth=18, num_classes=1000, stem="imagenet", norm="bn")
    C.save_flax(model, config, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == config
    loaded, loaded_config = C.load(tmp_path / "ckpt")
    assert loaded_config == config
    a, b = C.to_numpy_state_dict(model), C.to_numpy_state_dict(loaded)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    C.save_flax(loaded, config, tmp_path / "ckpt")  # replacing a checkpoint is allowed
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_flax_refuses_wrong_config_and_foreign_directory(tmp_path):
    model = abstract_resnet(18, num_classes=10)  # both checks come before any value is read
    with pytest.raises(C.ConversionError, match="does not describe the model"):
        C.save_flax(model, dict(depth=18, num_classes=1000), tmp_path / "a")
    with pytest.raises(C.ConversionError, match="does not take"):
        C.save_flax(model, dict(depth=18, num_classes=10, colour="red"), tmp_path / "a")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(C.ConversionError, match="not a Flax checkpoint"):
        C.save_flax(model, dict(depth=18, num_classes=10), tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


# --- load_pretrained ----------------------------------------------------------------------


def test_load_pretrained_keeps_fresh_classifier(tmp_path):
    tv = torchvision_resnet(18)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    model = flax_resnet(18, num_classes=10)
    fresh_fc = (np.asarray(model.fc.kernel[...]), np.asarray(model.fc.bias[...]))
    before = np.asarray(model.conv3_x.layers[0].shortcut.layers[0].kernel[...])
    out = C.load_pretrained(model, tmp_path / "resnet18.pth", num_classes=10)
    assert out is model
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), fresh_fc[0])
    np.testing.assert_array_equal(np.asarray(model.fc.bias[...]), fresh_fc[1])
    kernel = np.asarray(model.conv3_x.layers[0].shortcut.layers[0].kernel[...])
    expected = tv.layer2[0].downsample[0].weight.detach().numpy().transpose(2, 3, 1, 0)
    assert not np.array_equal(kernel, before)
    np.testing.assert_array_equal(kernel, expected)
    norm = model.conv5_x.layers[1].residual_function.layers[4]
    np.testing.assert_array_equal(np.asarray(norm.var[...]), tv.layer4[1].bn2.running_var)
    # Same classifier size: fc is loaded too; and a Flax checkpoint directory works as well.
    full = C.load_pretrained(flax_resnet(18), tmp_path / "resnet18.pth")
    np.testing.assert_array_equal(np.asarray(full.fc.bias[...]), tv.fc.bias.detach().numpy())
    C.save_flax(full, dict(depth=18, num_classes=1000), tmp_path / "flax")
    again = C.load_pretrained(flax_resnet(18, num_classes=10), tmp_path / "flax")
    np.testing.assert_array_equal(np.asarray(again.conv1.layers[0].kernel[...]),
                                  np.asarray(full.conv1.layers[0].kernel[...]))


def test_load_pretrained_rejects_other_mismatches(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    model = flax_resnet(18, num_classes=10)
    before = np.asarray(model.conv1.layers[0].kernel[...])
    with pytest.raises(C.ConversionError, match=r"unexpected keys \['layer1\.2\.bn1\.bias'"):
        C.load_pretrained(model, tmp_path / "r34.pth")
    np.testing.assert_array_equal(np.asarray(model.conv1.layers[0].kernel[...]), before)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    half = abstract_resnet(18, num_classes=10, width=0.5)
    with pytest.raises(C.ConversionError, match=r"shape mismatch for 'conv1\.weight'"):
        C.load_pretrained(half, tmp_path / "r18.pth", naming="torchvision")
    with pytest.raises(C.ConversionError, match="num_classes=100"):
        C.load_pretrained(model, tmp_path / "r34.pth", num_classes=100)


# --- command line -------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "flax_resnet.convert", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def test_cli_torchvision_to_flax_to_safetensors(tmp_path):
    tv = torchvision_resnet(18)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    r = run_cli(tmp_path / "resnet18.pth", tmp_path / "resnet18_flax")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # no warnings, no traceback
    config = json.loads((tmp_path / "resnet18_flax" / "config.json").read_text())
    assert config == dict(depth=18, norm="bn", stem="imagenet", shortcut="B", num_classes=1000,
                          width=1.0, in_channels=3)
    model, _ = C.load(tmp_path / "resnet18_flax")
    model.eval()
    x = images(32)
    assert_close(flax_logits(model, x), torch_logits(tv, x))

    out = tmp_path / "resnet18.safetensors"
    r = run_cli(tmp_path / "resnet18_flax", out, "--to-naming", "torchvision")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(load_file(out), strict=True)
    np.testing.assert_array_equal(torch_logits(fresh.eval(), x), torch_logits(tv, x))


def test_cli_renames_between_namings_in_process(tmp_path, capsys):
    tv = torchvision_resnet(18, num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    assert C.main([str(tmp_path / "tv.pt"), str(tmp_path / "ref.safetensors"),
                   "--to-naming", "torch_ref"]) == 0
    assert "wrote" in capsys.readouterr().out
    ref = torch_ref.models.create_resnet(18, num_classes=10)
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(tmp_path / "ref.safetensors"), strict=True)
    x = images(32)
    np.testing.assert_array_equal(torch_logits(ref.eval(), x), torch_logits(tv, x))
    # A Flax checkpoint's config.json fixes the architecture: options that would change it fail.
    assert C.main([str(tmp_path / "tv.pt"), str(tmp_path / "flax") + os.sep]) == 0
    assert C.main([str(tmp_path / "flax"), str(tmp_path / "x.pt"), "--depth", "34"]) == 2
    assert "--depth cannot apply" in capsys.readouterr().err


def _cli_error(capsys, *args) -> str:
    assert C.main([str(a) for a in args]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_cli_errors(tmp_path, capsys):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, tmp_path / "ok.pth")
    err = _cli_error(capsys, tmp_path / "missing.pth", tmp_path / "out")
    assert "no such file" in err and "missing.pth" in err

    torch.save({**sd, "layer1.0.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    err = _cli_error(capsys, tmp_path / "extra.pth", tmp_path / "out")
    assert "unknown torchvision keys ['layer1.0.extra.weight']" in err

    ref_sd = {C.torch_ref_key(k): v for k, v in sd.items()}
    torch.save({**ref_sd, "head.weight": torch.zeros(1)}, tmp_path / "head.pth")
    err = _cli_error(capsys, tmp_path / "head.pth", tmp_path / "out")
    assert "unexpected keys ['head.weight']" in err

    torch.save({k: v for k, v in sd.items() if k != "layer4.1.bn2.running_var"},
               tmp_path / "short.pth")
    err = _cli_error(capsys, tmp_path / "short.pth", tmp_path / "out")
    assert "missing keys ['layer4.1.bn2.running_var']" in err

    (tmp_path / "weights.npz").write_bytes(b"")
    err = _cli_error(capsys, tmp_path / "weights.npz", tmp_path / "out")
    assert "unknown weight file type '.npz'" in err
    err = _cli_error(capsys, tmp_path / "ok.pth", tmp_path / "out.onnx")
    assert "unknown weight file type '.onnx'" in err

    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    err = _cli_error(capsys, tmp_path / "broken.pth", tmp_path / "out")
    assert "cannot read" in err and "broken.pth" in err
    assert not (tmp_path / "out").exists()


def test_cli_error_exit_code_in_subprocess(tmp_path):
    r = run_cli(tmp_path / "nope.pth", tmp_path / "out")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "nope.pth" in r.stderr


def test_bf16_param_dtype_load_and_checkpoint(tmp_path):
    """Values are cast to the model's dtype, and the Flax checkpoint records it."""
    tv = torchvision_resnet(18)
    model = abstract_resnet(18, num_classes=1000, param_dtype=jnp.bfloat16)
    C.load_torch_state_dict(model, tv.state_dict(), naming="auto")
    assert model.conv1.layers[0].kernel[...].dtype == jnp.bfloat16
    C.save_flax(model, dict(depth=18, num_classes=1000, param_dtype=jnp.bfloat16),
                tmp_path / "bf16")
    loaded, config = C.load(tmp_path / "bf16")
    assert config["param_dtype"] == "bfloat16"
    assert isinstance(loaded.fc.kernel[...], jax.Array)
    assert loaded.fc.kernel[...].dtype == jnp.bfloat16
