"""Training: recipes, optimizer/schedule semantics, the CLI end to end, checkpoints and
resumption, multi-device and multi-process equivalence. CPU only, tiny models.

Subprocess runs share a persistent JAX compilation cache (one per test session), so the
same program compiled by several runs is compiled once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_resnet import training as T
from flax_resnet.checkpoint import Checkpointer
from flax_resnet.config import TrainConfig, make_config
from flax_resnet.optim import make_optimizer, make_schedule

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")

# 256 train / 64 test images, batch 32: 8 steps per epoch, 2 epochs.
TINY = [
    "--dataset", "synthetic:256:64", "--depth", "20", "--width", "0.25", "--batch-size", "32",
    "--epochs", "2", "--optimizer", "sgd", "--lr", "0.02", "--schedule", "constant",
    "--log-every", "4", "--no-progress",
]


def _env(jax_cache: Path, devices: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        JAX_COMPILATION_CACHE_DIR=str(jax_cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        **extra,
    )
    return env


def _train(args: list[str], jax_cache: Path, *, devices: int = 1, check: bool = True,
           timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, TRAIN, *args], cwd=REPO, env=_env(jax_cache, devices),
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _final_state(workdir: Path) -> dict:
    """The latest checkpointed state as numpy, whatever topology wrote it."""
    import orbax.checkpoint as ocp

    step = Checkpointer(workdir / "checkpoints", read_only=True).latest_step()
    path = workdir / "checkpoints" / str(step) / "state"
    ckptr = ocp.StandardCheckpointer()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          ckptr.metadata(path).item_metadata)
    return jax.tree.map(np.asarray, ckptr.restore(path, target))


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, jax_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """TINY in one process over 2 CPU devices (batch sharded; the 2-process run's twin)."""
    workdir = tmp_path_factory.mktemp("ref") / "run"
    r = _train([*TINY, "--workdir", str(workdir), "--keep-checkpoints", "2", "--eval-flip"],
               jax_cache, devices=2)
    return workdir, r


# --------------------------------------------------------------------------- config


def test_recipes_and_overrides():
    seed = make_config("study")
    assert (seed.model.depth, seed.model.norm, seed.optimizer, seed.lr, seed.weight_decay) == (
        34, "bn", "adamw", 1e-3, 1e-2)
    assert (seed.batch_size, seed.epochs, seed.schedule, seed.decay_norm_and_bias) == (
        100, 80, "study", True)
    he = make_config("he")
    assert (he.model.depth, he.optimizer, he.lr, he.momentum, he.weight_decay, he.batch_size) == (
        32, "sgd", 0.1, 0.9, 1e-4, 128)
    assert he.schedule == "multistep" and he.lr_milestones == (0.5, 0.75)
    assert make_config("he", depth=56).model.depth == 56
    fast = make_config("fast")
    assert fast.nesterov and fast.label_smoothing == 0.1 and not fast.decay_norm_and_bias
    assert (fast.model.depth, fast.model.stem, fast.batch_size, fast.epochs) == (
        18, "cifar", 512, 30)
    # explicit flags win; --epochs alone rescales the preset's warmup
    assert make_config("fast", epochs=15).warmup_epochs == pytest.approx(1.0)
    assert make_config("fast", epochs=15, warmup_epochs=3).warmup_epochs == 3
    assert make_config(norm="RMSNorm").model.norm == "rms"
    assert make_config(schedule="step").schedule == "multistep"
    cfg = make_config("fast", lr=0.05)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # fast's lr is its own: a batch override does not rescale it (nor he's, nor study's)
    assert make_config("fast", batch_size=128).lr == 0.4
    assert make_config("he", batch_size=256).lr == 0.1


def test_torchvision_recipes():
    """imagenet / imagenet-cosine / finetune: torchvision's classification reference."""
    net = make_config("imagenet", dtype="float32")
    assert (net.model.depth, net.model.stem, net.model.init, net.model.zero_init_residual) == (
        50, "imagenet", "torchvision", False)
    assert (net.optimizer, net.lr, net.momentum, net.nesterov, net.weight_decay) == (
        "sgd", 0.1, 0.9, False, 1e-4)
    assert net.decay_norm_and_bias and net.label_smoothing == 0.0
    assert (net.batch_size, net.epochs, net.schedule, net.lr_step_epochs, net.lr_gamma) == (
        256, 90, "steplr", 30, 0.1)
    assert (net.augment, net.image_size, net.resize_size, net.interpolation, net.dataset) == (
        "random-resized-crop", 224, 256, "bilinear", "imagenet2012")
    cos = make_config("imagenet-cosine", dtype="float32")
    assert cos.replace(schedule="steplr", warmup_epochs=0.0, warmup_start_factor=0.01,
                       label_smoothing=0.0) == net
    assert (cos.schedule, cos.warmup_epochs, cos.warmup_start_factor, cos.label_smoothing) == (
        "cosine-epoch", 5.0, 0.01, 0.1)
    assert make_config(schedule="cosineannealinglr").schedule == "cosine-epoch"
    ft = make_config("finetune", dtype="float32")
    assert (ft.optimizer, ft.momentum, ft.weight_decay, ft.label_smoothing, ft.epochs) == (
        "sgd", 0.9, 1e-4, 0.1, 10)
    assert ft.lr == pytest.approx(0.01 * ft.batch_size / 256) and ft.batch_size == 64
    assert (ft.schedule, ft.warmup_epochs, ft.augment, ft.reset_classifier) == (
        "cosine-epoch", 0.0, "random-resized-crop", True)
    assert ft.init_from is None and not make_config("imagenet").reset_classifier
    assert TrainConfig.from_dict(json.loads(json.dumps(ft.to_dict()))) == ft
    # linear lr scaling with the batch, unless the lr is given too
    assert make_config("imagenet", batch_size=1024).lr == pytest.approx(0.4)
    assert make_config("imagenet-cosine", batch_size=64).lr == pytest.approx(0.025)
    assert make_config("finetune", batch_size=256).lr == pytest.approx(0.01)
    assert make_config("imagenet", batch_size=1024, lr=0.1).lr == 0.1
    # torchvision's epochs are absolute: the warmup stays 5 and StepLR steps every 30
    assert make_config("imagenet-cosine", epochs=120).warmup_epochs == 5.0
    assert make_config("imagenet", epochs=120).lr_step_epochs == 30


@pytest.mark.parametrize("backend,expected", [("cpu", "float32"), ("gpu", "bfloat16"),
                                              ("tpu", "bfloat16")])
def test_recipe_bfloat16_is_for_accelerators(backend, expected, monkeypatch):
    from flax_resnet import config

    monkeypatch.setattr(config, "_backend", lambda: backend)
    for recipe in ("imagenet", "imagenet-cosine", "finetune"):
        assert make_config(recipe).dtype == expected
        assert make_config(recipe, dtype="float32").dtype == "float32"
    assert make_config("fast").dtype == "float32"
    assert make_config("fast", dtype="bfloat16").dtype == "bfloat16"


def test_recipe_dtype_on_this_backend():
    expected = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    assert make_config("imagenet").dtype == expected


@pytest.mark.parametrize("field,value,needle", [
    ("norm", "weird", "'weird'"), ("width", -1.0, "-1.0"), ("optimizer", "lamb", "adamw"),
    ("schedule", "poly", "onecycle"), ("lr_milestones", (1.5,), "1.5"),
    ("dtype", "fp8", "bfloat16"), ("lr_step_epochs", 0, "lr_step_epochs 0"),
    ("lr_step_epochs", 2.5, "integer"), ("warmup_start_factor", 0.0, "(0, 1]"),
    ("warmup_start_factor", 1.5, "1.5"), ("reset_classifier", "yes", "'yes'"),
    ("schedule", "cosine_epoch", "cosine-epoch"),
])
def test_bad_config_values_are_named(field, value, needle):
    with pytest.raises(ValueError) as e:
        make_config(**{field: value})
    assert needle in str(e.value)


# --------------------------------------------------------------------------- schedules


def test_epoch_based_schedules_step_at_epoch_boundaries():
    spe = 10
    seed = make_schedule(make_config(lr=0.3, epochs=80), spe)
    for epoch, expected in [(0, 0.3), (19, 0.3), (20, 0.1), (39, 0.1), (40, 0.1 / 3),
                            (79, 0.3 / 27)]:
        for i in (0, spe - 1):  # constant within the epoch
            assert float(seed(epoch * spe + i)) == pytest.approx(expected, rel=1e-6)
    multi = make_schedule(make_config("he", epochs=8), spe)
    got = [float(multi(e * spe + 5)) for e in range(8)]
    np.testing.assert_allclose(got, [0.1] * 4 + [0.01] * 2 + [0.001] * 2, rtol=1e-6)
    const = make_schedule(make_config(schedule="constant", lr=0.2), spe)
    assert float(const(0)) == float(const(10**6)) == pytest.approx(0.2)


def test_steplr_steps_every_n_epochs():
    """StepLR(step_size=lr_step_epochs): a boundary every N epochs however long the run,
    unlike multistep's milestones as fractions of it."""
    spe = 5
    long = make_schedule(make_config("imagenet", epochs=120), spe)
    for epoch, expected in [(0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 1e-3),
                            (90, 1e-4), (119, 1e-4)]:
        for i in (0, spe - 1):
            assert float(long(epoch * spe + i)) == pytest.approx(expected, rel=1e-5)
    fractions = make_schedule(make_config("imagenet", epochs=120, schedule="multistep",
                                          lr_milestones=(1 / 3, 2 / 3)), spe)
    assert float(fractions(30 * spe)) == pytest.approx(0.1)  # 40, 80: not torchvision's


def test_cosine_epoch_schedule():
    """torchvision's LinearLR(0.01, 5) + CosineAnnealingLR(epochs - 5), per epoch."""
    spe = 7
    cfg = make_config("imagenet-cosine", dtype="float32")
    s = make_schedule(cfg, spe)
    got = np.array([[float(s(e * spe + i)) for i in range(spe)] for e in range(cfg.epochs)])
    assert (got == got[:, :1]).all()  # constant within each epoch
    np.testing.assert_allclose(got[:6, 0], [0.001, 0.0208, 0.0406, 0.0604, 0.0802, 0.1],
                               rtol=1e-5)
    t = np.arange(5, 90) - 5
    np.testing.assert_allclose(got[5:, 0], 0.05 * (1 + np.cos(np.pi * t / 85)), rtol=1e-5,
                               atol=1e-8)
    assert got[-1, 0] > 0
    ft = make_schedule(make_config("finetune", dtype="float32"), 1)
    assert float(ft(0)) == pytest.approx(0.0025) and float(ft(5)) == pytest.approx(0.00125)
    with pytest.raises(ValueError, match="whole number"):
        make_config("imagenet-cosine", warmup_epochs=2.5)
    with pytest.raises(ValueError, match="below epochs"):
        make_config("imagenet-cosine", epochs=5)


def test_cosine_and_onecycle_schedules():
    cfg = make_config("fast", epochs=10, warmup_epochs=2, lr=0.4)
    s = make_schedule(cfg, 10)
    assert float(s(0)) == pytest.approx(0.4 / 20)  # linear warmup over 20 steps
    assert float(s(19)) == pytest.approx(0.4)
    assert float(s(20)) == pytest.approx(0.4)
    assert float(s(60)) == pytest.approx(0.2, rel=1e-5)  # halfway through the cosine
    assert float(s(99)) < 1e-3
    one = make_schedule(
        make_config("fast", schedule="onecycle", epochs=10, warmup_epochs=2, lr=0.4), 10)
    # torch OneCycleLR: peak at update pct·total - 1 = 19, lr/25/1e4 at the last update (99)
    assert float(one(0)) == pytest.approx(0.4 / 25, rel=1e-5)
    assert float(one(19)) == pytest.approx(0.4, rel=1e-6)
    assert float(one(18)) < 0.4 and float(one(20)) < 0.4
    assert float(one(99)) == pytest.approx(0.4 / 25 / 1e4, rel=1e-3)


# --------------------------------------------------------------------------- optimizers


def _params():
    return {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "bias": jnp.array([0.1, -0.2])}


def _grads(t):
    return {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]]) * (t + 1),
            "bias": jnp.array([0.05, -0.1]) * (t + 1)}


def _run_tx(tx, steps=3):
    params = _params()
    state = tx.init(params)
    for t in range(steps):
        updates, state = tx.update(_grads(t), state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_sgd_matches_torch_formula():
    """torch.optim.SGD: g += wd·p; buf = μ·buf + g (buf = g at step 1); p -= lr·(g + μ·buf)
    with nesterov, else lr·buf."""
    for nesterov in (False, True):
        cfg = make_config(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01,
                            nesterov=nesterov, schedule="constant")
        got = _run_tx(make_optimizer(cfg, make_schedule(cfg, 1)))
        p = jax.tree.map(np.asarray, _params())
        buf = None
        for t in range(3):
            g = jax.tree.map(lambda g, p: np.asarray(g) + 0.01 * p, _grads(t), p)
            buf = g if buf is None else jax.tree.map(lambda b, g: 0.9 * b + g, buf, g)
            step = jax.tree.map(lambda g, b: g + 0.9 * b, g, buf) if nesterov else buf
            p = jax.tree.map(lambda p, s: p - 0.1 * s, p, step)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, p)


def test_adamw_matches_torch_formula_and_decays_every_param():
    cfg = make_config(lr=0.01, weight_decay=0.1, schedule="constant")
    got = _run_tx(make_optimizer(cfg, make_schedule(cfg, 1)))
    p = jax.tree.map(np.asarray, _params())
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    for t in range(1, 4):
        g = jax.tree.map(np.asarray, _grads(t - 1))
        p = jax.tree.map(lambda p: p * (1 - 0.01 * 0.1), p)  # torch: decoupled, lr-scaled
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
        c1, c2 = 1 - 0.9**t, 1 - 0.999**t
        p = jax.tree.map(
            lambda p, m, v, c1=c1, c2=c2: p - 0.01 * (m / c1) / (np.sqrt(v / c2) + 1e-8), p, m, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, p)


def test_no_decay_mask_spares_norm_scales_and_biases():
    cfg = make_config(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.5,
                        schedule="constant", decay_norm_and_bias=False)
    tx = make_optimizer(cfg, make_schedule(cfg, 1))
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5 * params["kernel"])
    np.testing.assert_array_equal(updates["bias"], 0.0)


def test_cross_entropy_label_smoothing_matches_torch_definition():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    labels = jnp.array([0, 1])
    logp = np.asarray(jax.nn.log_softmax(logits))
    for eps in (0.0, 0.1):
        target = (1 - eps) * np.eye(3)[np.asarray(labels)] + eps / 3
        expected = -(target * logp).sum(-1)
        np.testing.assert_allclose(T.cross_entropy(logits, labels, eps), expected, rtol=1e-6)


# --------------------------------------------------------------------------- checkpoints


def test_checkpointer_keeps_last_n_and_ignores_unfinished(tmp_path):
    state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "step": np.int32(0)}
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        for step in range(1, 5):
            ck.save(step, {**state, "step": np.int32(step)}, {"epoch": step})
        assert ck.all_steps() == [3, 4]
        assert not ck.save(4, state, {})  # an existing step is not rewritten
    names = sorted(os.listdir(tmp_path / "ck"))
    assert not [n for n in names if "tmp" in n], names  # the temporary dirs were renamed
    # A save killed half-way leaves only a temporary directory: never picked up.
    (tmp_path / "ck" / "9.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        assert ck.latest_step() == 4
        restored, meta = ck.restore(state)
        assert int(restored["step"]) == 4 and meta["epoch"] == 4
        np.testing.assert_array_equal(restored["w"], state["w"])


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end_synthetic(reference_run):
    workdir, r = reference_run
    assert "devices: 2 x cpu" in r.stdout and "mesh {'data': 2}" in r.stdout
    assert "parameters" in r.stdout
    rows = _metrics(workdir)
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_flip", "lr",
                "epoch_time_s"):
        assert all(np.isfinite(row[key]) for row in rows), key
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # it learns the synthetic classes
    # compilation is timed apart and counted in the first epoch's time, once
    assert 0 < rows[0]["compile_s"] < rows[0]["epoch_time_s"] and "compile_s" not in rows[1]
    assert "compiled the train and eval steps" in r.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_test_acc"] == rows[-1]["test_acc"] and summary["epochs"] == 2
    assert summary["best_test_acc_flip"] == max(row["test_acc_flip"] for row in rows)
    assert "flip TTA" in r.stdout
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["depth"] == 20 and config["dataset"] == "synthetic:256:64"
    assert config["model"]["num_classes"] == 10  # the data set's, recorded with the model
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [8, 16]  # kept 2, one per epoch
    state = _final_state(workdir)
    assert int(state["step"]) == 16
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))


def test_eval_only_and_rerun_of_finished_run(reference_run, jax_cache):
    workdir, _ = reference_run
    summary = json.loads((workdir / "summary.json").read_text())
    # config from the workdir; 1 device now: eval does not depend on the device count
    r = _train(["--workdir", str(workdir), "--eval-only"], jax_cache)
    result = json.loads((workdir / "eval.json").read_text())
    assert result["step"] == 16 and result["test_count"] == 64
    assert result["test_acc"] == summary["final_test_acc"]
    assert result["test_acc_flip"] == summary["final_test_acc_flip"]
    assert "test acc" in r.stdout


def test_conflicting_config_is_refused(reference_run, jax_cache):
    workdir, _ = reference_run
    r = _train([*TINY, "--workdir", str(workdir), "--depth", "18"], jax_cache, check=False)
    assert r.returncode == 2
    assert "depth=20" in r.stderr and "18" in r.stderr and "Traceback" not in r.stderr


def test_resume_is_bit_exact(reference_run, jax_cache, tmp_path):
    ref_dir, _ = reference_run
    workdir = tmp_path / "resumed"
    args = [*TINY, "--workdir", str(workdir), "--checkpoint-every-steps", "3",
            "--checkpoint-every-epochs", "0"]
    r = _train([*args, "--stop-after-steps", "11"], jax_cache, devices=2)  # "preempted"
    assert "stopped after step 11" in r.stdout
    # every 3rd step, but not at the end of epoch 1 (step 8): --checkpoint-every-epochs 0
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [3, 6, 9]
    r = _train(args, jax_cache, devices=2)  # the same command again: resumes at step 9
    assert "resumed from step 9" in r.stdout
    ref, got = _final_state(ref_dir), _final_state(workdir)
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-exact
    for a, b in zip(_metrics(ref_dir), _metrics(workdir), strict=True):
        for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == b[key], key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(reference_run, jax_cache, tmp_path):
    """2 processes x 1 CPU device through jax.distributed = 1 process x 2 devices."""
    ref_dir, _ = reference_run
    workdir = tmp_path / "two"
    port = _free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):  # files, not pipes: a full pipe would stall a process
        with open(log, "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, TRAIN, *TINY, "--workdir", str(workdir),
                 "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id",
                 str(i)],
                cwd=REPO, env=_env(jax_cache), stdout=f, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        p.wait(timeout=600)
    outs = [(log.read_text(), "") for log in logs]
    for p, (out, _) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-5000:]
    assert "devices: 2 x cpu (cpu) on 2 process(es)" in outs[0][0]
    ref, got = _final_state(ref_dir), _final_state(workdir)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_metrics(ref_dir), _metrics(workdir), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 64 + 1e-9)


_MULTI_DEVICE = textwrap.dedent("""
    import jax, numpy as np
    from flax_resnet import training as T, data as D
    from flax_resnet.config import TrainConfig, make_config
    from flax_resnet.batches import DataPosition, TrainBatches
    from flax_resnet.program import DataSpec, build_program
    from flax_resnet.sharding import make_mesh, replicate

    assert jax.device_count() == 8
    cfg = make_config(dataset="synthetic:256:64", depth=20, width=0.25, batch_size=32,
                        optimizer="sgd", lr=0.02, schedule="constant", label_smoothing=0.1,
                        num_classes=10)
    ds = D.load_dataset(cfg.dataset)
    spec = DataSpec(8, ds.image_shape, ds.mean, ds.std)
    program0, state0 = build_program(cfg, make_mesh(jax.devices()[:1]), spec)
    defs, tx, state0 = program0.defs, program0.tx, jax.device_get(state0)

    def run_program(cfg, start, devices, parallel, steps):
        # the product's program of cfg on devices from the host state start: steps updates;
        # the state and each step's loss
        mesh = make_mesh(devices)
        program, _ = build_program(cfg, mesh, spec, parallel=parallel)
        state, metrics = replicate(start, mesh), program.zero_metrics()
        batches = TrainBatches(ds.train, 32, mesh, DataPosition(0, 0, 0))
        losses = []
        for i in range(steps):
            before = T.summarize(metrics)["loss"] * i
            state, metrics = program.train_step(state, metrics, *next(batches))
            losses.append(T.summarize(metrics)["loss"] * (i + 1) - before)
        return jax.device_get(state), losses

    def run(devices, parallel, steps, start=state0):
        return run_program(cfg, start, devices, parallel, steps)

    def maxdiff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    def floats(tree):
        return [x for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating)]

    def drift(a, b):  # (params, optimizer state) max abs difference
        return (maxdiff(a.params, b.params), max(float(np.max(np.abs(x - y))) for x, y in
                                                 zip(floats(a.opt_state), floats(b.opt_state),
                                                     strict=True)))

    # jit: the global batch sharded over 8 devices = 1 device, to float32 rounding. The
    # BatchNorm weight gradients cancel (sum g*x_hat is ~1/1000 of sum |g*x_hat| here), so
    # a different summation order moves the params after 3 steps by up to ~1e-4. The noise
    # floor is measured as the largest move that a 1-2 ulp change of the nonzero initial
    # params causes on 1 device, over two draws. Params, 1 vs 8 devices against that floor:
    # jax 0.10.2 4.5e-8 vs 2.7e-4; jax 0.11.2 8.5e-5 vs 8.5e-5 (its 8-device program rounds
    # differently from its 1-device one); jax 0.12.0.1 6e-8 vs 8.5e-5. Per-device BatchNorm
    # statistics, the error this guards against, move them by 1.3e-2.
    one, l1 = run(jax.devices()[:1], "jit", 3)
    eight, l8 = run(jax.devices(), "jit", 3)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    assert int(one.step) == int(eight.step) == 3
    np.testing.assert_array_equal(one.rng, eight.rng)
    noise = [0.0, 0.0]
    for seed in (1, 2):
        signs = np.random.default_rng(seed)
        ulp = state0.replace(params=jax.tree.map(
            lambda p: (p * (1 + 2.0**-23 * signs.choice([-1.0, 1.0], p.shape))).astype(p.dtype),
            state0.params))
        moved = drift(one, run(jax.devices()[:1], "jit", 3, ulp)[0])
        noise = [max(n, m) for n, m in zip(noise, moved, strict=True)]
    assert noise[0] < 1e-3, noise  # a well-posed comparison: rounding moves params < 1e-3
    tolerance = [3 * n + 1e-7 for n in noise]
    ddp3, _ = run(jax.devices(), "pmap", 3)
    print("jit drift", drift(one, eight), "noise", noise, "per-device stats", drift(one, ddp3),
          "stats", maxdiff(one.batch_stats, eight.batch_stats))
    assert all(d <= t for d, t in zip(drift(one, eight), tolerance, strict=True))
    assert drift(one, ddp3)[0] > 4 * tolerance[0]  # the check can fail
    for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)

    # pmap (DDP semantics): one step = mean of the 8 per-shard gradients, each shard with its
    # own BatchNorm statistics; the running stats are shard 0's.
    ddp, _ = run(jax.devices(), "pmap", 1)
    order = D.epoch_permutation(0, 0, 256)[:32]
    x = D.augment(jax.random.fold_in(state0.rng, 0), ds.train.images[order])
    x = D.normalize(x, ds.mean, ds.std)
    y = ds.train.labels[order]
    local = jax.jit(lambda p, b, x, y: T._loss_and_updates(defs.train, p, b, x, y, 0.1))
    shards = [local(state0.params, state0.batch_stats, x[k * 4:(k + 1) * 4], y[k * 4:(k + 1) * 4])
              for k in range(8)]
    grads = jax.tree.map(lambda *g: sum(g) / 8, *[s[0] for s in shards])
    updates, _ = tx.update(grads, state0.opt_state, state0.params)
    params = jax.device_get(jax.tree.map(lambda p, u: p + u, state0.params, updates))
    print("pmap params", maxdiff(params, ddp.params),
          "stats", maxdiff(jax.device_get(shards[0][1]), ddp.batch_stats))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ddp.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(shards[0][1])),
                    jax.tree.leaves(ddp.batch_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert maxdiff(one.batch_stats, ddp.batch_stats) > 1e-4  # per-device stats differ

    # float64, the semantic check: 1 device against 8 (jit: global BatchNorm statistics)
    # after 3 steps, free of float32 rounding. Largest relative error (max|a - b| / max|b| of
    # any leaf of params, running stats and optimizer state): measured 3.2e-15 (jax 0.10.2,
    # x86-64), tolerance F64_RTOL = 1e-12 (300x headroom for another summation order);
    # per-device statistics (pmap) miss it by 1e12 (measured 1.4).
    import dataclasses
    with jax.enable_x64(True):
        cfg64 = dataclasses.replace(cfg, dtype="float64")
        s64 = jax.device_get(build_program(cfg64, make_mesh(jax.devices()[:1]), spec)[1])
        assert {np.asarray(x).dtype for x in floats(s64)} == {np.dtype("float64")}
        assert jax.tree.leaves(s64.batch_stats) and all(
            x.dtype == np.float64 for x in floats(s64.batch_stats))

        def run64(devices, parallel):
            state, losses = run_program(cfg64, s64, devices, parallel, 3)
            return state, sum(losses) / 3

        def rel64(a, b):
            return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))
                       for x, y in zip(floats(a), floats(b), strict=True))

        F64_RTOL = 1e-12
        one64, loss1 = run64(jax.devices()[:1], "jit")
        eight64, loss8 = run64(jax.devices(), "jit")
        ddp64, _ = run64(jax.devices(), "pmap")
        assert {np.asarray(x).dtype for x in floats(eight64)} == {np.dtype("float64")}
        err, err_ddp = rel64(eight64, one64), rel64(ddp64, one64)
        print("float64 1 vs 8 devices", err, "loss", abs(loss8 - loss1) / abs(loss1),
              "per-device stats", err_ddp)
        assert err <= F64_RTOL and abs(loss8 - loss1) <= F64_RTOL * abs(loss1), err
        assert err_ddp > 1e4 * F64_RTOL, err_ddp  # the check can fail, by orders of magnitude
    print("OK")
""")


def test_eight_devices_match_one_and_pmap_is_ddp(jax_cache):
    r = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], cwd=REPO,
                       env=_env(jax_cache, devices=8), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-5000:]
    print(r.stdout)


def test_batch_not_dividing_over_devices_is_a_clear_error(jax_cache, tmp_path):
    r = _train([*TINY, "--batch-size", "36", "--workdir", str(tmp_path / "w")], jax_cache,
               devices=8, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--batch-size 36" in r.stderr and "8 devices" in r.stderr


@pytest.mark.parametrize("argv,needles", [
    (["--depth", "33"], ["33", "34"]),
    (["--norm", "batchy"], ["batchy", "rms"]),
    (["--width", "0"], ["--width 0", "> 0"]),
    (["--optimizer", "lamb"], ["lamb", "adamw"]),
    (["--recipe", "slow"], ["slow", "fast"]),
    (["--dataset", "imagenet"], ["imagenet", "cifar10"]),
    (["--lr-milestones", "0.5,2"], ["2.0", "fractions"]),
    (["--dataset", "synthetic:64:8", "--batch-size", "128"], ["128", "64 training images"]),
    (["--dataset", "folder:/no/such/dir"], ["/no/such/dir"]),
    (["--num-processes", "2"], ["--coordinator"]),
    (["--checkpoint-every-epochs", "-1"], ["--checkpoint-every-epochs -1", ">= 0"]),
])
def test_bad_flags_exit_2_naming_the_value(argv, needles, tmp_path, capsys):
    import train

    try:
        code = train.main([*argv, "--workdir", str(tmp_path / "w")])
    except SystemExit as e:  # argparse's own errors (choices)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_data_subprocess_has_no_traceback(jax_cache, tmp_path):
    r = _train(["--dataset", "folder:" + str(tmp_path / "missing"), "--workdir",
                str(tmp_path / "w")], jax_cache, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(tmp_path / "missing") in r.stderr and "tar xzf" in r.stderr
    code = textwrap.dedent(f"""
        import socket, sys
        def refuse(*args, **kwargs):  # offline, whatever the machine
            raise OSError("no network in this test")
        socket.create_connection = refuse
        from flax_resnet.train_cli import main
        sys.exit(main(["--dataset", "cifar10", "--data-dir", {str(tmp_path / "tfds")!r},
                       "--workdir", {str(tmp_path / "w")!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(jax_cache),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cifar10 is not prepared" in r.stderr and "cannot be reached" in r.stderr
    assert "pip install 'flax_resnet[train]'" in r.stderr


def test_image_folder_cli_bfloat16_init_from(jax_cache, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for c, colour in (("red", 0), ("green", 1), ("blue", 2)):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                img[..., colour] += 150
                Image.fromarray(img).save(tmp_path / "imgs" / split / c / f"{i}.png")
    # --init-from: "pretrained" 10-class weights of the same architecture; the 3-class run
    # keeps the backbone and gets a fresh classifier.
    # (written by a subprocess: it shares the session's compilation cache)
    code = textwrap.dedent(f"""
        from flax_resnet import training as T
        from flax_resnet.config import TrainConfig, make_config
        from flax_resnet.optim import make_optimizer, make_schedule
        from flax_resnet.sharding import make_mesh, replicate
        from flax_resnet.convert import save_safetensors
        model = T.create_model(make_config(depth=20, width=0.25), 10, seed=7)
        save_safetensors(model, {str(tmp_path / "pretrained.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(jax_cache), check=True,
                   timeout=300)
    workdir = tmp_path / "run"
    r = _train(["--dataset", f"folder:{tmp_path / 'imgs'}", "--depth", "20", "--width", "0.25",
                "--batch-size", "8", "--epochs", "2", "--dtype", "bfloat16", "--no-progress",
                "--init-from", str(tmp_path / "pretrained.safetensors"),
                "--workdir", str(workdir)], jax_cache)
    assert "24 train / 9 test, 3 classes" in r.stdout
    assert "initialised from" in r.stdout
    assert (tmp_path / "imgs-decoded.npz").is_file()
    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    state = _final_state(workdir)
    assert state["params"]["fc"]["kernel"]["value"].shape[-1] == 3
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["opt_state"])
               if x.dtype.kind == "f")


def test_tfds_cli_mocked_without_tensorflow(jax_cache, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import tensorflow_datasets as tfds
        import train
        with tfds.testing.mock_data(num_examples=64):
            code = train.main(["--dataset", "cifar10", "--data-dir", {str(tmp_path)!r},
                               "--depth", "20", "--width", "0.25", "--batch-size", "32",
                               "--epochs", "1", "--no-progress",
                               "--workdir", {str(tmp_path / 'run')!r}])
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        sys.exit(code)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(jax_cache),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "64 train / 64 test, 10 classes" in r.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 1


def test_compilation_cache_dir_flag_env_default(monkeypatch, tmp_path):
    from flax_resnet import distributed as train

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/from/env")
    assert train.compilation_cache_dir("/from/flag") == "/from/flag"
    assert train.compilation_cache_dir("") is None  # disabled
    assert train.compilation_cache_dir(None) == "/from/env"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert train.compilation_cache_dir(None) == str(tmp_path / "flax_resnet" / "jax")
