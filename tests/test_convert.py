"""Weight conversion (``flax_resnet.convert``) and the factories' argument checking."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file as load_safetensors_torch
from safetensors.torch import save_file as save_safetensors_torch

import flax_resnet
import torch_ref
from flax_resnet import convert, namings, weights
from flax_resnet.convert import ConversionError
from parity_tests import libraries as L
from parity_tests.harness import (
    LOGIT_RTOL,
    Config,
    build_flax,
    build_torch,
    make_inputs,
    nhwc,
    rel_err,
)

REPO = Path(__file__).resolve().parent.parent

# Small models covering: both blocks, both stems, both shortcuts, every norm's parameters.
ROUND_TRIP = [
    Config(depth=18, norm="bn", stem="imagenet"),
    Config(depth=50, norm="gn", stem="cifar"),
    Config(depth=20, norm="rms", shortcut="B"),
    Config(depth=20, norm="in"),
    Config(depth=18, norm="ln", stem="cifar", shortcut="A"),
]


def trained_flax(cfg: Config, seed: int = 0) -> nnx.Module:
    """A Flax model whose BatchNorm stats and counters moved away from their init values."""
    model = flax_resnet.from_config(cfg.model, rngs=nnx.Rngs(seed))
    model.train()
    x, _ = make_inputs(cfg)
    model(nhwc(x))
    model(nhwc(x[::-1].copy()))
    model.eval()
    return model


def flax_values(model: nnx.Module) -> dict[str, np.ndarray]:
    return {key: np.asarray(var[...]) for key, _, var in convert.model_variables(model)}


def assert_bit_exact(a: nnx.Module, b: nnx.Module) -> None:
    va, vb = flax_values(a), flax_values(b)
    assert va.keys() == vb.keys()
    for key in va:
        assert va[key].dtype == vb[key].dtype, key
        assert va[key].shape == vb[key].shape, key
        assert np.array_equal(va[key], vb[key]), key


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: c.label)
def test_round_trip_through_torch_state_dict_is_bit_exact(cfg):
    model = trained_flax(cfg, seed=1)
    state_dict = convert.to_torch_state_dict(model)
    assert all(isinstance(v, torch.Tensor) for v in state_dict.values())
    other = flax_resnet.from_config(cfg.model, rngs=nnx.Rngs(2))
    assert not all(np.array_equal(flax_values(model)[k], v) for k, v in flax_values(other).items())
    convert.load_torch_state_dict(other, state_dict)
    assert_bit_exact(model, other)
    # ... and the numpy flavour too
    third = flax_resnet.from_config(cfg.model, rngs=nnx.Rngs(3))
    convert.load_torch_state_dict(third, convert.to_numpy_state_dict(model))
    assert_bit_exact(model, third)


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: c.label)
def test_state_dict_keys_shapes_dtypes_match_torch_ref(cfg):
    ours = convert.to_torch_state_dict(trained_flax(cfg))
    theirs = build_torch(cfg).state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert tuple(ours[key].shape) == tuple(value.shape), key
        assert ours[key].dtype == value.dtype, key  # float32, and int64 num_batches_tracked


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: c.label)
def test_safetensors_file_loads_into_torch_ref_strictly_with_same_logits(cfg, tmp_path):
    model = trained_flax(cfg, seed=4)
    path = tmp_path / "model.safetensors"
    convert.save_safetensors(model, path)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # written atomically, no leftovers
    torch_model = torch_ref.from_config(cfg.model)
    result = torch_model.load_state_dict(load_safetensors_torch(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x, _ = make_inputs(cfg)
    torch_model.eval()
    with torch.no_grad():
        y_torch = torch_model(torch.from_numpy(x)).numpy()
    y_flax = np.asarray(model(nhwc(x)))
    # Same tolerance and reason as the forward parity tests (harness.LOGIT_RTOL).
    assert rel_err(y_flax, y_torch) <= LOGIT_RTOL
    # The file also loads back into Flax bit-exactly.
    back = flax_resnet.from_config(cfg.model, rngs=nnx.Rngs(5))
    convert.resolve(path).load_into(back)
    assert_bit_exact(model, back)


# ------------------------------------------------------------------------------------------
# .pt files


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_pt_checkpoint_loads_plain_or_wrapped(tmp_path, wrapper):
    cfg = Config(depth=20, norm="bn")
    torch_model = build_torch(cfg)
    state_dict = torch_model.state_dict()
    obj = state_dict if wrapper is None else {wrapper: state_dict, "epoch": 7, "optimizer": {}}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    model = build_flax(cfg, path)
    expected = {k: v.numpy() for k, v in state_dict.items()}
    got = convert.to_numpy_state_dict(model)
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key


def test_pth_suffix_is_accepted(tmp_path):
    cfg = Config(depth=20, norm="gn")
    torch_model = build_torch(cfg)
    path = tmp_path / "weights.pth"
    torch.save(torch_model.state_dict(), path)
    build_flax(cfg, path)


@pytest.mark.parametrize("name", ["weights.npz", "weights.ckpt", "weights"])
def test_unknown_file_suffix_raises(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not a checkpoint")
    model = flax_resnet.create_resnet(20, width=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError) as info:
        convert.load_pretrained(model, path)
    msg = str(info.value)
    assert repr(os.path.splitext(name)[1]) in msg and ".safetensors" in msg and ".pt" in msg


def test_pt_file_without_a_state_dict_raises(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    model = flax_resnet.create_resnet(20, width=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match="Tensor"):
        convert.load_pretrained(model, path)


# ------------------------------------------------------------------------------------------
# mismatching state_dicts


@pytest.fixture
def pair():
    cfg = Config(depth=18, norm="bn", num_classes=10)
    model = flax_resnet.from_config(cfg.model, rngs=nnx.Rngs(0))
    return model, build_torch(cfg).state_dict()


def _load_error(model: nnx.Module, state_dict) -> str:
    before = flax_values(model)
    with pytest.raises(ConversionError) as info:
        convert.load_torch_state_dict(model, state_dict)
    after = flax_values(model)
    # Nothing was loaded: the model is untouched.
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_key_raises_naming_it(pair):
    model, state_dict = pair
    del state_dict["conv2_x.1.residual_function.4.running_var"]
    msg = _load_error(model, state_dict)
    assert "conv2_x.1.residual_function.4.running_var" in msg and "missing" in msg


def test_unexpected_key_raises_naming_it(pair):
    model, state_dict = pair
    state_dict["fc.extra_bias"] = torch.zeros(10)
    msg = _load_error(model, state_dict)
    assert "fc.extra_bias" in msg and "unexpected" in msg


def test_missing_and_unexpected_keys_are_both_named(pair):
    model, state_dict = pair
    state_dict["layer1.0.conv1.weight"] = state_dict.pop("conv2_x.0.residual_function.0.weight")
    msg = _load_error(model, state_dict)
    assert "layer1.0.conv1.weight" in msg and "conv2_x.0.residual_function.0.weight" in msg


def test_every_loader_detects_the_naming(pair, tmp_path):
    """``load_torch_state_dict``, ``Weights.load_into`` and ``load_pretrained`` all take a
    torchvision-named state_dict without being told (``naming="auto"`` is the default)."""
    model, state_dict = pair
    torchvision_sd = {convert.torchvision_key(k): v for k, v in state_dict.items()}
    expected = {k: np.asarray(v) for k, v in state_dict.items()}
    path = tmp_path / "tv.pt"
    torch.save(torchvision_sd, path)
    for load in (lambda m: convert.load_torch_state_dict(m, torchvision_sd),
                 lambda m: convert.resolve(path).load_into(m),
                 lambda m: convert.load_pretrained(m, path)):
        fresh = nnx.clone(model)
        load(fresh)
        got = convert.to_numpy_state_dict(fresh)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_forced_naming_that_does_not_fit_says_which_naming_the_keys_look_like(pair):
    model, state_dict = pair
    torchvision_sd = {convert.torchvision_key(k): v for k, v in state_dict.items()}
    with pytest.raises(ConversionError, match="look like torchvision naming, not torch_ref"):
        convert.load_torch_state_dict(model, torchvision_sd, naming="torch_ref")


def test_pretrained_with_another_classifier_size_warns(tmp_path, caplog):
    cfg = Config(depth=18, norm="bn", num_classes=100)
    path = tmp_path / "hundred.pt"
    torch.save(build_torch(cfg).state_dict(), path)
    model = flax_resnet.create_resnet(18, width=cfg.resolved_width, num_classes=10,
                                      rngs=nnx.Rngs(0))
    with caplog.at_level("WARNING", logger="flax_resnet.weights"):
        convert.load_pretrained(model, path)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and "10 classes" in warnings[0].getMessage()
    assert "fc.weight" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "key,bad_shape",
    [
        ("fc.weight", (11, 64)),  # (out, in) -> Flax (in, out)
        ("conv1.0.weight", (8, 3, 3, 3)),  # OIHW -> HWIO
        ("conv1.1.running_mean", (9,)),
    ],
)
def test_wrong_shape_raises_naming_key_and_both_shapes(pair, key, bad_shape):
    model, state_dict = pair
    expected_torch = tuple(state_dict[key].shape)
    state_dict[key] = torch.zeros(bad_shape)
    msg = _load_error(model, state_dict)
    assert repr(key) in msg or key in msg
    assert str(bad_shape) in msg
    # The expected shape, in PyTorch's layout or in Flax's (OIHW -> HWIO, (out, in) -> (in, out)).
    perm = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}[len(expected_torch)]
    expected_flax = tuple(expected_torch[i] for i in perm)
    assert str(expected_torch) in msg or str(expected_flax) in msg, msg


def test_values_are_cast_to_the_model_dtype(pair):
    model, state_dict = pair
    state_dict = {k: (v.double() if v.is_floating_point() else v) for k, v in state_dict.items()}
    convert.load_torch_state_dict(model, state_dict)
    for _, _, var in convert.model_variables(model):
        assert var[...].dtype in (jnp.float32, jnp.int32)


def test_bfloat16_params_round_trip(tmp_path):
    model = flax_resnet.create_resnet(
        20, width=0.5, norm="gn", norm_groups=4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    sd = convert.to_torch_state_dict(model)
    other = flax_resnet.create_resnet(
        20, width=0.5, norm="gn", norm_groups=4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1)
    )
    convert.load_torch_state_dict(other, sd)
    assert_bit_exact(model, other)
    assert jax.tree.leaves(nnx.state(other, nnx.Param))[0].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# resolve: every source into one Weights, each file read once


def _counted(monkeypatch, owner, name: str) -> list:
    """Record every call of ``owner.name`` (still made) in the returned list."""
    calls, original = [], getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def _use_every_part(w: weights.Weights) -> None:
    """What the converter, load, load_pretrained and train.py --init-from ask of Weights."""
    w.model_config()
    w.build()
    w.build(num_classes=3, rngs=nnx.Rngs(1))
    w.load_into(w.build())
    assert w.preprocessing is None or w.preprocessing.mean


SMALL = dict(num_classes=7)
FILES = {  # naming -> (torch_ref architecture, file suffix)
    "torch_ref": (dict(depth=20, stem="cifar", width=0.5), ".safetensors"),
    "torchvision": (dict(depth=18, width=0.125), ".pth"),
    "timm": (dict(depth=26, stem="deep", avg_down=True, width=0.125), ".pt"),
    "hf": (dict(depth=18, width=0.125), ".bin"),
}


@pytest.mark.parametrize("naming", sorted(FILES))
def test_resolve_reads_a_state_dict_file_of_each_naming_once(naming, tmp_path, monkeypatch):
    fields, suffix = FILES[naming]
    reference = torch_ref.create_resnet(**fields, **SMALL).state_dict()
    names = namings.from_torch_ref(reference, naming)
    stored = {names[k]: v for k, v in reference.items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_safetensors_torch(stored, path)
    else:
        torch.save(stored, path)
    reads = _counted(monkeypatch, weights, "read_state_dict")
    w = weights.resolve(path)
    assert (w.kind, w.naming, w.source, w.step) == ("file", naming, str(path), None)
    assert w.description == f"{naming}-named state_dict {path}"
    assert w.model_config() == flax_resnet.ModelConfig(**fields, **SMALL)
    assert set(w.state_dict) == set(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(w.state_dict[key], value.numpy(), err_msg=key)
    if naming == "torch_ref":
        assert w.preprocessing is None
    else:
        assert w.preprocessing.mean == (0.485, 0.456, 0.406)
        assert "assumed" in w.preprocessing.source and str(path) in w.preprocessing.source
    _use_every_part(w)
    assert len(reads) == 1


def test_weights_are_immutable(tmp_path):
    torch.save(torch_ref.create_resnet(18, width=0.125, **SMALL).state_dict(), tmp_path / "w.pt")
    w = weights.resolve(tmp_path / "w.pt")
    with pytest.raises(TypeError):
        w.state_dict["fc.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError, match="read-only"):
        w.state_dict["fc.bias"][0] = 1.0
    with pytest.raises(TypeError):
        w.config["depth"] = 34
    with pytest.raises(AttributeError):
        w.source = "elsewhere"


LIBRARY_DIRS = {
    "hf": (next(c for c in L.CASES if c.name == "resnet-18"),
           dict(depth=18, width=0.125, stem="imagenet")),
    "timm": (L.Case("timm", "resnet18d", dict(L.TIMM_SMALL), "dir"),
             dict(depth=18, width=0.125, stem="deep", avg_down=True, stem_width=8)),
}


@pytest.mark.parametrize("kind", sorted(LIBRARY_DIRS))
def test_resolve_reads_a_library_directory_once(kind, tmp_path, monkeypatch):
    case, fields = LIBRARY_DIRS[kind]
    original = L.build(case)
    src = L.save(case, original, str(tmp_path))
    reads = _counted(monkeypatch, weights, "read_state_dict")
    json_reads = _counted(monkeypatch, weights, "read_json")
    w = weights.resolve(src)
    assert (w.kind, w.naming, w.source) == (kind, kind, src)
    assert w.description == f"{'Hugging Face' if kind == 'hf' else 'timm'} directory {src}"
    assert w.model_config() == flax_resnet.ModelConfig(**fields, num_classes=L.NUM_CLASSES)
    theirs = original.state_dict()
    assert {w.source_keys.get(k, k) for k in w.state_dict} == set(theirs)
    for key, value in w.state_dict.items():
        np.testing.assert_array_equal(value, theirs[w.source_keys.get(key, key)].numpy())
    if kind == "timm":
        assert w.preprocessing.interpolation == original.pretrained_cfg["interpolation"]
        assert "pretrained_cfg" in w.preprocessing.source
    else:  # save_pretrained writes no preprocessor_config.json
        assert "assumed" in w.preprocessing.source
    _use_every_part(w)
    assert len(reads) == 1 and len(json_reads) == 1


def test_resolve_reads_a_flax_checkpoint_once(tmp_path, monkeypatch):
    import flax.serialization

    from flax_resnet.preprocessing import imagenet

    config = dict(depth=18, width=0.125, num_classes=5, param_dtype="bfloat16")
    model = flax_resnet.create_resnet(18, width=0.125, num_classes=5,
                                      param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    pre = imagenet("the test's")
    convert.save_flax(model, config, tmp_path / "flax", pre)
    reads = _counted(monkeypatch, flax.serialization, "msgpack_restore")
    w = weights.resolve(tmp_path / "flax")
    assert (w.kind, w.naming, w.description) == ("flax", "torch_ref",
                                                 f"Flax checkpoint {tmp_path / 'flax'}")
    assert dict(w.config) == dict(depth=18, width=0.125, num_classes=5)
    assert dict(w.dtypes) == {"param_dtype": "bfloat16"}
    assert w.preprocessing == pre
    expected = convert.to_numpy_state_dict(model)
    assert set(w.state_dict) == set(expected)
    for key, value in expected.items():
        assert w.state_dict[key].dtype == value.dtype
        np.testing.assert_array_equal(w.state_dict[key], value, err_msg=key)
    assert w.build().fc.kernel[...].dtype == jnp.bfloat16  # the saved dtype
    _use_every_part(w)
    assert len(reads) == 1


def test_weights_whose_keys_do_not_show_the_norm_still_load_into_a_model(tmp_path):
    """A GroupNorm file has no running statistics: its config needs norm=, but a model built
    elsewhere takes its weights."""
    torch_model = torch_ref.create_resnet(20, width=0.5, norm="gn", norm_groups=4)
    torch.save(torch_model.state_dict(), tmp_path / "gn.pt")
    w = weights.resolve(tmp_path / "gn.pt")
    with pytest.raises(ConversionError, match=r"gn\.pt: cannot infer the norm"):
        w.config  # noqa: B018
    model = flax_resnet.create_resnet(20, width=0.5, norm="gn", norm_groups=4, rngs=nnx.Rngs(0))
    assert w.load_into(model) == []
    got = convert.to_numpy_state_dict(model)
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
    told = weights.resolve(tmp_path / "gn.pt", norm="gn", norm_groups=4)
    assert told.model_config() == flax_resnet.ModelConfig(20, "gn", width=0.5, norm_groups=4)


def test_a_headless_file_takes_num_classes_and_a_fresh_classifier(tmp_path):
    state_dict = torch_ref.create_resnet(18, width=0.125, **SMALL).state_dict()
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("fc.")},
               tmp_path / "bb.pt")
    w = weights.resolve(tmp_path / "bb.pt")
    assert w.config["num_classes"] is None and w.classifier_size is None
    with pytest.raises(ConversionError, match="backbone without a classifier"):
        w.build()
    assert w.build(num_classes=4).fc.kernel.shape == (64, 4)
    assert weights.resolve(tmp_path / "bb.pt", num_classes=4).build().fc.kernel.shape == (64, 4)
    torch.save(state_dict, tmp_path / "full.pt")
    with pytest.raises(ConversionError, match="num_classes=4, but the classifier of .* has 7"):
        weights.resolve(tmp_path / "full.pt", num_classes=4).config  # noqa: B018


def test_resolve_errors_name_the_source_and_what_is_wrong(tmp_path):
    torch.save(torch_ref.create_resnet(18, width=0.125, **SMALL).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConversionError, match=r"no such file or directory: .*nothing\.pt"):
        weights.resolve(tmp_path / "nothing.pt")
    with pytest.raises(ConversionError, match=r"step 3 chooses a checkpoint of a train\.py run; "
                                              r".*w\.pt is a state_dict file"):
        weights.resolve(tmp_path / "w.pt", step=3)
    convert.main([str(tmp_path / "w.pt"), str(tmp_path / "flax")])
    with pytest.raises(weights.FixedArchitectureError, match="model, depth cannot apply") as info:
        weights.resolve(tmp_path / "flax", model="resnet34", depth=34)
    assert info.value.fields == ["model", "depth"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="empty is neither a Flax checkpoint"):
        weights.resolve(tmp_path / "empty")


def test_the_converter_records_preprocessing_and_where_the_weights_came_from(tmp_path, capsys):
    """A torch_ref state_dict states no preprocessing: --mean/--std (and sizes) record one,
    which eval, predict and export then use; origin.json names the file by its SHA-256 and
    survives a second conversion; bad values exit 2 naming them, writing nothing."""
    import hashlib

    from flax_resnet.transforms import EvalTransform

    src = tmp_path / "w.pt"
    torch.save(torch_ref.create_resnet(18, width=0.125, **SMALL).state_dict(), src)
    first, second = tmp_path / "flax", tmp_path / "again"
    assert convert.main([str(src), str(first), "--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.2",
                         "--image-size", "40", "--resize-size", "48",
                         "--interpolation", "bicubic"]) == 0
    pre = weights.resolve(first).preprocessing
    assert (pre.mean, pre.std, pre.input_size) == ((0.5, 0.4, 0.3), (0.2,) * 3, (3, 40, 40))
    assert EvalTransform.from_preprocessing(pre) == EvalTransform(40, 48, "bicubic")
    origin = json.loads((first / "origin.json").read_text())
    assert origin == {"source": "file", "path": str(src),
                      "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert convert.main([str(first), str(second), "--crop-pct", "0.8"]) == 0
    again = weights.resolve(second)
    assert again.provenance() == origin
    assert (again.preprocessing.crop_pct, again.preprocessing.resize_size) == (0.8, None)
    assert again.preprocessing.mean == pre.mean
    capsys.readouterr()
    for args, says in (([], "states no preprocessing: give --mean and --std"),
                       (["--mean", "0.5,0.4", "--std", "1,1,1"], "--mean 0.5,0.4: the model "
                        "takes 3 channels"),
                       (["--mean", "0,0,0", "--std", "1,0,1"], "--std 1.0,0.0,1.0: every value"),
                       (["--mean", "0,0,0", "--std", "1,1,1", "--crop-pct", "1.5"],
                        "--crop-pct 1.5 must be in (0, 1]")):
        dst = tmp_path / "never"
        assert convert.main([str(src), str(dst), "--image-size", "32", *args]) == 2, args
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
        assert not dst.exists()
    assert convert.main([str(first), str(tmp_path / "w2.pt"), "--std", "1,1,1"]) == 2
    assert "need a directory DST" in capsys.readouterr().err
    (second / "origin.json").write_text("[1, 2]")
    assert convert.main([str(second), str(tmp_path / "never")]) == 2
    assert "origin.json is no JSON object" in capsys.readouterr().err


def test_a_run_directory_with_a_flat_config_is_refused(tmp_path):
    """Runs store ``{"model": {...}, ...}``; the flat form predates the first release."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text('{"depth": 18, "num_classes": 10}')
    with pytest.raises(ConversionError, match='config.json has no "model" section'):
        weights.resolve(tmp_path / "run")


def test_importing_the_converter_changes_no_global_state():
    """No warning filter and no logger level is set by importing any of its modules."""
    code = """if True:
        import json, logging, warnings
        import jax, numpy, flax.nnx, flax.serialization  # their own import-time setup first
        def snapshot():
            levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
                      if isinstance(lg, logging.Logger)}
            return [repr(f) for f in warnings.filters], {**levels, "": logging.root.level}
        before = snapshot()
        import flax_resnet
        for name in ("convert", "convert_cli", "weights", "state_dict", "architecture",
                     "writers", "library_configs", "preprocessing", "namings"):
            __import__("flax_resnet." + name)
        after = snapshot()
        print(json.dumps({"filters": before[0] == after[0],
                          "levels": {k: (before[1].get(k), v) for k, v in after[1].items()
                                     if before[1].get(k, logging.NOTSET) != v}}))
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    changed = json.loads(result.stdout.strip().splitlines()[-1])
    assert changed == {"filters": True, "levels": {}}, changed


# ------------------------------------------------------------------------------------------
# factory arguments: ValueError naming the bad value and the allowed ones, in both packages

BAD_ARGS = [
    ("depth", 19, [18, 34, 50, 101, 152, 20, 32, 44, 56, 110]),
    ("norm", "batchnrom", ["bn", "ln", "gn", "in", "rms"]),
    ("stem", "resnet", ["imagenet", "cifar"]),
    ("shortcut", "C", ["A", "B"]),
    ("init", "he_normal", list(torch_ref.INIT_SCHEMES)),
]


def _factories():
    return [
        ("flax", lambda depth=18, **kw: flax_resnet.create_resnet(depth, rngs=nnx.Rngs(0), **kw)),
        ("torch", lambda depth=18, **kw: torch_ref.create_resnet(depth, **kw)),
    ]


@pytest.mark.parametrize("package,factory", _factories(), ids=["flax", "torch"])
@pytest.mark.parametrize("arg,value,allowed", BAD_ARGS, ids=[a for a, _, _ in BAD_ARGS])
def test_bad_factory_argument_names_value_and_allowed(package, factory, arg, value, allowed):
    kwargs = {arg: value} if arg != "depth" else {"depth": value}
    kwargs.setdefault("width", 0.125)
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    msg = str(info.value)
    assert repr(value) in msg, msg
    for name in allowed:
        assert re.search(rf"(?<![\w.]){re.escape(str(name))}(?![\w.])", msg), (name, msg)


def test_flax_and_torch_allow_the_same_init_schemes():
    assert tuple(flax_resnet.init.INIT_SCHEMES) == tuple(torch_ref.INIT_SCHEMES)


@pytest.mark.parametrize("package,factory", _factories(), ids=["flax", "torch"])
@pytest.mark.parametrize("width", [0, -1.0])
def test_bad_width_raises(package, factory, width):
    with pytest.raises(ValueError, match=re.escape(repr(width))):
        factory(width=width)


@pytest.mark.parametrize("package,factory", _factories(), ids=["flax", "torch"])
def test_gn_groups_not_dividing_channels_raises(package, factory):
    with pytest.raises(ValueError, match="norm_groups 3 does not divide"):
        factory(norm="gn", norm_groups=3, width=0.125)


@pytest.mark.parametrize("package,factory", _factories(), ids=["flax", "torch"])
@pytest.mark.parametrize("groups", [0, -4, 2.5, True])
def test_bad_group_counts_raise_naming_the_value(package, factory, groups):
    """Checked before any channel arithmetic (no ZeroDivisionError), in both frameworks."""
    with pytest.raises(ValueError, match=rf"norm_groups {re.escape(repr(groups))} is not allowed"):
        factory(norm="gn", norm_groups=groups, width=0.125)


@pytest.mark.parametrize("package,factory", _factories(), ids=["flax", "torch"])
def test_groups_that_do_not_divide_list_the_valid_ones(package, factory):
    # width 1/8: stage widths 8, 16, 32, 64 -> common divisors 1, 2, 4, 8
    with pytest.raises(ValueError, match=r"choose a common divisor: 1, 2, 4, 8$"):
        factory(norm="gn", norm_groups=16, width=0.125)


@pytest.mark.parametrize("package,factory", _factories(), ids=["flax", "torch"])
def test_aliases_and_case_are_accepted(package, factory):
    factory(norm="BatchNorm", shortcut="a", width=0.125)
