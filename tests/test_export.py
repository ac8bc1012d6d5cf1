"""flax-resnet-export: the StableHLO artifact runs in a process without flax_resnet and the
ONNX file in onnxruntime, both within the parity suite's float32 criterion of the float64
model; a wrong artifact fails the same comparison; bad input exits 2.

The measured errors are printed (``python -m pytest -q -s tests/test_export.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flax_resnet import export as ex
from parity_tests.harness import F32_FLOOR, F32_K

ARCH = {"depth": 18, "width": 0.125, "stem": "cifar", "num_classes": 3}
SIZE = 32
# Not ImageNet's, so that a baked-in normalisation with the wrong constants shows.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_the_criterion_is_the_parity_suites():
    assert (ex.F32_K, ex.F32_FLOOR) == (F32_K, F32_FLOOR)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A small ResNet-18 (CIFAR stem) with random norm statistics, as a Flax checkpoint that
    carries its own mean/std and input size."""
    import torch

    import torch_ref
    from flax_resnet.config import ModelConfig
    from flax_resnet.convert import load_torch_state_dict, save_flax
    from flax_resnet.preprocessing import Preprocessing
    from flax_resnet.state_dict import create_model
    from parity_tests.harness import randomize_norms_

    torch.manual_seed(0)  # the conv and classifier weights: the same model every run
    twin = torch_ref.from_config(ModelConfig(**ARCH))
    randomize_norms_(twin, seed=1)  # running statistics far from 0/1: eval mode matters
    model = create_model(ARCH)
    load_torch_state_dict(model, twin.state_dict())
    path = tmp_path_factory.mktemp("export") / "r18"
    save_flax(model, ARCH, path, preprocessing=Preprocessing(
        MEAN, STD, (3, SIZE, SIZE), "bilinear", 1.0, "the test"))
    return path


@pytest.fixture(scope="module")
def weights(weights_dir):
    from flax_resnet.weights import resolve

    return resolve(weights_dir)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "PYTHONPATH"))}
    env["JAX_PLATFORMS"] = "cpu"
    return env


# A serving process: jax and numpy only.
SERVE = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from jax import export

    out = {}
    inputs = np.load(sys.argv[1])
    for name in ("float", "uint8"):
        with open(f"{name}/model.jax", "rb") as f:
            exported = export.deserialize(bytearray(f.read()))
        for i in range(2):
            out[f"{name}{i}"] = np.asarray(exported.call(inputs[f"{name}{i}"]))
        out[f"{name}_in"] = np.array(str(exported.in_avals[0]))
    assert "flax_resnet" not in sys.modules, sorted(m for m in sys.modules if "flax" in m)
    np.savez(sys.argv[2], **out)
""")


def test_stablehlo_artifact_serves_without_flax_resnet(weights_dir, weights, tmp_path, capsys):
    from flax_resnet.export_cli import main

    # --no-check: the check here is the stronger one, in a process of its own.
    for name, flags in (("float", []), ("uint8", ["--with-preprocessing"])):
        code = main([str(weights_dir), str(tmp_path / name), "--no-check", *flags])
        assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "float" / "export.json").read_text())
    meta8 = json.loads((tmp_path / "uint8" / "export.json").read_text())
    # Two batch sizes; for the float artifact also two image sizes (its H and W are symbolic).
    batches = {"0": (2, SIZE, SIZE), "1": (5, SIZE + 7, SIZE - 5)}
    rng = np.random.default_rng(7)
    images = {k: rng.integers(0, 256, (*s, 3), dtype=np.uint8) for k, s in batches.items()}
    square = {"0": images["0"], "1": rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)}
    inputs = {**{f"float{k}": ex._normalized(v, MEAN, STD) for k, v in images.items()},
              **{f"uint8{k}": v for k, v in square.items()}}
    np.savez(tmp_path / "in.npz", **inputs)
    r = subprocess.run([sys.executable, "-c", SERVE, "in.npz", "out.npz"], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")
    assert str(served["float_in"]) == "float32[b,h,w,3]"
    assert str(served["uint8_in"]) == f"uint8[b,{SIZE},{SIZE},3]"

    for name, batch in (("float", images), ("uint8", square)):
        ordered = [batch["0"], batch["1"]]
        ours = [served[f"{name}0"], served[f"{name}1"]]
        flax32 = ex.flax_logits(weights, ordered)
        check = ex.float32_check(ours, ex.reference64(weights, ordered),
                                 ex.twin_logits(weights, ordered), "PyTorch float32")
        same = max(ex.rel_err(a, b) for a, b in zip(ours, flax32, strict=True))
        print(f"\nexport errors: StableHLO {name} input, served in a process without "
              f"flax_resnet: {check.summary()}; relative to the library's jitted Flax float32 "
              f"forward {same:.2e}")
        assert check.passed, check.summary()
        assert [o.shape for o in ours] == [(2, 3), (5, 3)]

    # The metadata says what the artifact is and what the host still does.
    blob = (tmp_path / "float" / "model.jax").read_bytes()
    import hashlib

    assert meta["sha256"] == hashlib.sha256(blob).hexdigest()
    assert meta["input"] == {"shape": ["b", "h", "w", 3], "dtype": "float32", "layout": "NHWC",
                             "symbolic": ["b", "h", "w"]}
    assert meta8["input"]["shape"] == ["b", SIZE, SIZE, 3] and meta8["input"]["dtype"] == "uint8"
    assert (meta["preprocessing_baked_in"], meta8["preprocessing_baked_in"]) == (False, True)
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["host_transform"]["center_crop"] == SIZE
    assert meta["class_names"] == ["class 0", "class 1", "class 2"]
    assert meta["platforms"] == ["cpu"] and meta["calling_convention_version"] >= 9
    assert meta["output"]["shape"] == ["b", 3] and meta["architecture"]["depth"] == 18
    assert meta["origin"] == weights.provenance() and len(meta["origin"]["sha256"]) == 64
    assert meta["check"] is None and meta8["check"] is None  # --no-check


def test_a_wrong_artifact_fails_the_same_check(weights):
    """Planted: BatchNorm left in training mode (batch statistics), and a baked-in
    normalisation with ImageNet's mean/std instead of the weights'."""
    import dataclasses

    import jax
    from flax import nnx

    from flax_resnet.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    spec = ex.InputSpec("float32", SIZE, SIZE)
    batches = ex.check_images(spec, SIZE)
    reference = ex.reference64(weights, batches)
    yardstick = ex.flax_logits(weights, batches)

    train_mode = weights.build()  # as built: training mode
    graphdef, state = nnx.split(train_mode)
    # A copy of the state inside the trace: training mode updates the running statistics.
    planted = jax.export.export(jax.jit(lambda x: nnx.merge(graphdef, state, copy=True)(x)))(
        jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {SIZE}, {SIZE}, 3"), np.float32))
    ours = [np.asarray(planted.call(ex._normalized(b, MEAN, STD))) for b in batches]
    bad = ex.float32_check(ours, reference, yardstick, "Flax float32")
    print(f"\nexport errors: planted train-mode BatchNorm: {bad.summary()}")
    assert not bad.passed

    imagenet = dataclasses.replace(weights, preprocessing=dataclasses.replace(
        weights.preprocessing, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    exported, spec8, _ = ex.export_stablehlo(imagenet, with_preprocessing=True)
    batches8 = ex.check_images(spec8, SIZE)
    ours = [np.asarray(exported.call(b)) for b in batches8]
    bad = ex.float32_check(ours, ex.reference64(weights, batches8),
                           ex.flax_logits(weights, batches8), "Flax float32")
    print(f"export errors: planted ImageNet mean/std baked in: {bad.summary()}")
    assert not bad.passed


def test_onnx_runs_in_onnxruntime_within_the_float32_criterion(weights_dir, weights, tmp_path,
                                                                 capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    from flax_resnet.export_cli import main

    code = main([str(weights_dir), str(tmp_path), "--format", "onnx"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "passed" in captured.err  # the CLI's own check, against the float64 Flax model
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["check"]["passed"] and meta["input"]["shape"] == ["b", "h", "w", 3]
    # Independently: onnxruntime against PyTorch's float64, two batch and image sizes.
    rng = np.random.default_rng(11)
    batches = [rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8),
               rng.integers(0, 256, (4, SIZE - 3, SIZE + 6, 3), dtype=np.uint8)]
    spec = ex.InputSpec("float32", None, None)
    ours = ex.onnx_logits(tmp_path / "model.onnx", batches, spec, weights)
    check = ex.float32_check(ours, ex.twin_logits(weights, batches, torch.float64),
                             ex.twin_logits(weights, batches), "PyTorch float32")
    print(f"\nexport errors: ONNX in onnxruntime vs PyTorch float64: {check.summary()}")
    assert check.passed and [o.shape for o in ours] == [(2, 3), (4, 3)]


def test_onnx_with_preprocessing_takes_uint8(weights_dir, weights, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from flax_resnet.export_cli import main

    code = main([str(weights_dir), str(tmp_path), "--format", "onnx", "--with-preprocessing"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["shape"] == ["b", SIZE, SIZE, 3]
    c = meta["check"]
    print(f"\nexport errors: ONNX uint8 input (the CLI's check): {c['artifact_rel_err']:.2e}, "
          f"{c['yardstick']} {c['yardstick_rel_err']:.2e}, bound {c['bound']:.2e}")
    assert meta["check"]["passed"]


def test_symbolic_height_width_falls_back_to_fixed_for_shortcut_a(tmp_path):
    """He et al.'s CIFAR nets zero-pad a strided identity; its shape is worked out in Python,
    so height and width are fixed at the weights' size and the batch stays symbolic."""
    from flax import nnx

    import flax_resnet as fr
    from flax_resnet.convert import save_safetensors
    from flax_resnet.weights import resolve

    model = fr.create_resnet(20, width=0.25, stem="cifar", num_classes=3, rngs=nnx.Rngs(0))
    save_safetensors(model, tmp_path / "r20.safetensors")
    meta = ex.export(resolve(tmp_path / "r20.safetensors"), tmp_path / "out", say=lambda s: None)
    assert meta["input"]["shape"] == ["b", SIZE, SIZE, 3] and meta["input"]["symbolic"] == ["b"]
    assert "symbolic height/width" in meta["input"]["fixed_size_reason"]
    assert meta["check"]["passed"]


def test_help_lists_every_option(capsys):
    from flax_resnet.export_cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--step", "--format", "--platforms", "--with-preprocessing", "--image-size",
                   "--dtype", "--no-check", "stablehlo", "onnx"):
        assert option in out


@pytest.mark.parametrize("flags, named", [
    (["--platforms", "cpu,gpu"], ["'gpu'", "cpu, cuda, rocm, tpu"]),
    (["--format", "onnx", "--platforms", "cpu"], ["--platforms", "stablehlo"]),
    (["--format", "onnx", "--dtype", "bfloat16"], ["bfloat16", "float32"]),
    (["--image-size", "0"], ["--image-size 0"]),
])
def test_bad_flags_exit_2_naming_the_value(weights_dir, tmp_path, capsys, flags, named):
    from flax_resnet.export_cli import main

    assert main([str(weights_dir), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flax-resnet-export: error: ") and "Traceback" not in err
    for word in named:
        assert word in err


def test_unknown_format_exits_2_naming_the_choices(weights_dir, tmp_path, capsys):
    from flax_resnet.export_cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(weights_dir), str(tmp_path), "--format", "tflite"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'tflite'" in err and "stablehlo" in err and "onnx" in err


def test_missing_weights_and_a_file_as_out_dir_exit_2(weights_dir, tmp_path, capsys):
    from flax_resnet.export_cli import main

    missing = tmp_path / "nope.safetensors"
    assert main([str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert main([str(weights_dir), str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"{a_file} is a file" in err and "Traceback" not in err


def test_onnx_without_its_extra_names_the_install(weights_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    from flax_resnet.export_cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert main([str(weights_dir), str(tmp_path / "out"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "onnxscript" in err and "pip install 'flax_resnet[onnx]'" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_failed_check_exits_2_and_keeps_the_files(weights_dir, tmp_path, capsys, monkeypatch):
    from flax_resnet.export_cli import main

    failing = ex.Float32Check(1e-3, 1e-7, "Flax float32 eval forward")
    monkeypatch.setattr(ex, "check_stablehlo", lambda *a, **k: failing)
    assert main([str(weights_dir), str(tmp_path), "--image-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "fails its check" in err and "FAILED" in err and "Traceback" not in err
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["check"]["passed"] is False and (tmp_path / "model.jax").is_file()
