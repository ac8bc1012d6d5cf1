"""A train.py run directory is a model: the converter, ``load``, ``load_pretrained`` and
``train.py --init-from`` read it (latest or a named step) through ``weights.resolve``, as
every other source, and the exported file is the trained model in PyTorch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet
import torch_ref
from flax_resnet import convert, weights
from flax_resnet.checkpoint import Checkpointer
from flax_resnet.config import ModelConfig
from flax_resnet.data import synthetic_dataset
from flax_resnet.preprocessing import Preprocessing
from parity_tests.harness import LOGIT_RTOL, rel_err

REPO = Path(__file__).resolve().parent.parent
RUN = ["--dataset", "synthetic:64:32", "--depth", "18", "--width", "0.125", "--norm", "bn",
       "--batch-size", "32", "--epochs", "1", "--checkpoint-every-steps", "1", "--no-progress"]


def _python(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("saved") / "run"
    r = _python("train.py", *RUN, "--workdir", str(workdir))
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def _images() -> np.ndarray:
    ds = synthetic_dataset(64, 32)
    x = ds.test.images[:4].astype(np.float32) / 255.0
    return (x - np.asarray(ds.mean, np.float32)) / np.asarray(ds.std, np.float32)


def _flax_logits(model: nnx.Module) -> np.ndarray:
    model.eval()
    return np.asarray(model(jax.numpy.asarray(_images())))


def _torch_logits(model: torch.nn.Module) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(_images().transpose(0, 3, 1, 2))))\
            .numpy()


def test_load_builds_the_trained_model_from_the_run(run_dir):
    model, config = flax_resnet.load(run_dir)
    assert config["depth"] == 18 and config["num_classes"] == 10 and config["width"] == 0.125
    # The latest checkpoint's params, bit for bit.
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        state, _ = ckpt.restore_raw()
    kernel = np.asarray(state["params"]["fc"]["kernel"]["value"])
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), kernel)
    assert np.isfinite(_flax_logits(model)).all()


def test_a_named_step_is_that_checkpoint(run_dir):
    latest, _ = flax_resnet.load(run_dir)
    first, _ = flax_resnet.load(run_dir, step=1)
    assert not np.array_equal(np.asarray(first.fc.kernel[...]), np.asarray(latest.fc.kernel[...]))
    with pytest.raises(convert.ConversionError, match="no checkpoint of step 99; it has steps 1"):
        flax_resnet.load(run_dir, step=99)


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_cli_exports_the_run_to_torch_ref_with_the_same_logits(run_dir, tmp_path, suffix):
    out = tmp_path / f"model.{suffix}"
    r = _python("-m", "flax_resnet.convert", str(run_dir), str(out))
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    model, config = flax_resnet.load(run_dir)
    tmodel = torch_ref.create_resnet(**config)
    tmodel.load_state_dict({k: torch.as_tensor(v) for k, v in convert.read_state_dict(out)
                            .items()}, strict=True)
    assert rel_err(_torch_logits(tmodel), _flax_logits(model)) <= LOGIT_RTOL


def test_cli_exports_torchvision_names(run_dir, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    out = tmp_path / "tv.pt"
    r = _python("-m", "flax_resnet.convert", str(run_dir), str(out), "--to", "torchvision")
    assert r.returncode == 0, r.stderr
    keys = set(torch.load(out, weights_only=True))
    assert keys == set(torchvision.models.resnet18(num_classes=10).state_dict())


def test_load_pretrained_and_init_from_take_the_run(run_dir, tmp_path):
    model, config = flax_resnet.load(run_dir)
    fresh = flax_resnet.create_resnet(**config, rngs=nnx.Rngs(5))
    convert.load_pretrained(fresh, run_dir)
    np.testing.assert_array_equal(_flax_logits(fresh), _flax_logits(model))
    second = tmp_path / "finetune"
    r = _python("train.py", *RUN, "--workdir", str(second), "--init-from", str(run_dir),
                "--stop-after-steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"initialised from .*{re.escape(str(run_dir))}\b", r.stdout), r.stdout


def _fc_weight(w: weights.Weights) -> np.ndarray:
    return np.asarray(w.state_dict["fc.weight"])


def test_resolve_reads_the_run_once_at_its_latest_or_named_step(run_dir, monkeypatch):
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        steps = ckpt.all_steps()
        state, _ = ckpt.restore_raw()
    reads = []
    restore_raw = Checkpointer.restore_raw
    monkeypatch.setattr(Checkpointer, "restore_raw",
                        lambda self, *a, **k: reads.append(a) or restore_raw(self, *a, **k))
    latest = weights.resolve(run_dir)
    assert (latest.kind, latest.naming, latest.step) == ("run", "torch_ref", max(steps))
    assert latest.description == f"train.py run {run_dir}, step {max(steps)}"
    run_config = json.loads((run_dir / "config.json").read_text())
    assert latest.model_config() == ModelConfig.from_dict(run_config["model"])
    assert latest.config["num_classes"] == 10
    recorded = json.loads((run_dir / "preprocessing.json").read_text())
    assert latest.preprocessing == Preprocessing.from_dict(recorded)
    kernel = np.asarray(state["params"]["fc"]["kernel"]["value"])
    np.testing.assert_array_equal(_fc_weight(latest), kernel.T)
    assert set(latest.state_dict) == set(convert.to_numpy_state_dict(latest.build()))
    first = weights.resolve(run_dir, step=1)
    assert first.step == 1 and first.description.endswith(", step 1")
    assert not np.array_equal(_fc_weight(first), _fc_weight(latest))
    latest.load_into(first.build())
    assert len(reads) == 2


def test_resolve_reads_a_run_whose_optimizer_state_has_another_structure(run_dir, tmp_path):
    """What an optax upgrade does to a run: only params and batch statistics are read."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with Checkpointer(run / "checkpoints") as ckpt:
        step = ckpt.latest_step()
        state, meta = ckpt.restore_raw(step)
        state["opt_state"] = {"before": state["opt_state"], "new_leaf": np.zeros(3, np.float32)}
        ckpt.save(step + 1, state, meta)
    w = weights.resolve(run)
    assert w.step == step + 1
    np.testing.assert_array_equal(_fc_weight(w), _fc_weight(weights.resolve(run_dir)))


def test_a_directory_that_is_neither_says_what_it_needs(tmp_path):
    r = _python("-m", "flax_resnet.convert", str(tmp_path), str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "neither a Flax checkpoint" in r.stderr and "train.py run directory" in r.stderr
