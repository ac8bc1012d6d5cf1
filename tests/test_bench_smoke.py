"""Smoke test of the training-step benchmark (bench/): one tiny config on the CPU.

Runs ``python -m bench`` end to end (orchestrator, Flax and PyTorch workers, the product's
train step, JSON and Markdown output) for ResNet-18 at 1/8 width, batch 8, 16x16 images,
two timed steps, and checks the JSON's structure and that the numbers are positive. No
timing assertions: CPU timings mean nothing here. torch.compile is left out (its C++/Triton
compile takes minutes on a small CPU box); its code path is the eager one plus one
``torch.compile`` call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "resnet18w0.125-b8-fp32"
RESULT_KEYS = {
    "ok", "compile_s", "step_ms_median", "step_ms_p10", "step_ms_p90", "images_per_s",
    "timed_steps", "final_loss", "achieved_tflops", "mfu", "step_source",
}

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "bench.json", out / "bench.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--configs", f"{CONFIG},{IN_TINY}", "--image-size",
         "16", "--frameworks", "flax,flax_twopass,torch", "--only", f"flax_twopass={CONFIG}",
         "--steps", "2", "--warmup", "1",
         "--windows", "2", "--input-pipeline", "1", "--input-images", "12",
         "--input-size", "32", "--input-batch-size", "4", "--input-batches", "1",
         "--json", str(json_path), "--markdown", str(md_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(json_path.read_text()), md_path.read_text(), proc.stdout


def test_the_input_pipeline_runs_beside_the_steps(bench_run: tuple[dict, str, str]) -> None:
    run, md, _ = bench_run
    rows = run["input_pipeline"]["rows"]
    assert {(r["side"], r["workers"], r["images"]) for r in rows} == {
        ("flax_resnet", 1, 12), ("torch", 1, 12)}
    for r in rows:
        assert r["batch_shape"] in ([4, 32, 32, 3], [4, 3, 32, 32]), r
        assert r["images_per_s"] > 0 and r["peak_rss_mib"] > 0, r
    assert "Input pipeline" in md


def test_json_structure(bench_run: tuple[dict, str, str]) -> None:
    run, _, _ = bench_run
    meta = run["meta"]
    for key in ("date", "device", "jax", "flax", "torch", "steps", "warmup", "windows",
                "tf32", "recipe", "notes"):
        assert key in meta, key
    assert meta["on_gpu"] is False
    entry, imagenet = run["results"]
    assert (entry["config"]["name"], imagenet["config"]["name"]) == (CONFIG, IN_TINY)
    assert entry["config"]["image_size"] == 16
    assert entry["flops"]["train_per_image"] == 3 * entry["flops"]["forward_per_image"] > 0
    assert entry["train_config"]["model"]["depth"] == 18
    assert entry["train_config"]["batch_size"] == 8
    assert set(entry["frameworks"]) == {"flax", "flax_twopass", "torch"}
    assert entry["frameworks"]["flax"]["bn_variance"] == "auto"
    assert entry["frameworks"]["flax_twopass"]["bn_variance"] == "twopass"


@pytest.mark.parametrize("framework", ["flax", "flax_twopass", "torch"])
def test_positive_numbers(bench_run: tuple[dict, str, str], framework: str) -> None:
    run, _, _ = bench_run
    r = run["results"][0]["frameworks"][framework]
    assert r["ok"], r.get("error")
    assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
    for key in ("compile_s", "step_ms_median", "step_ms_p10", "step_ms_p90", "images_per_s",
                "achieved_tflops"):
        assert r[key] > 0 and math.isfinite(r[key]), (key, r[key])
    assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
    assert r["timed_steps"] == 2
    assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
    assert r["mfu"] is None  # CPU without --peak-tflops
    if framework.startswith("flax"):
        assert r["step_source"] == "flax_resnet.training.make_train_step"
        assert r["peak_mem_bytes"] > 0
        assert r["flops_xla_per_step"] > 0
        # The compiled step's kernels are read; the roofline needs a GPU's peaks.
        assert r["kernels"] > 100 and r["hbm_traffic_bytes"] > 0
        assert r["roofline_step_s"] is None and "of_roofline" not in r


def test_markdown_table(bench_run: tuple[dict, str, str]) -> None:
    _, md, stdout = bench_run
    assert md.strip() == stdout.strip()
    assert "| config | framework | images/s" in md
    assert f"| {CONFIG} | Flax NNX (jit) |" in md
    assert f"| {CONFIG} | PyTorch eager |" in md
    assert "Flax / eager" in md and "Flax / two-pass BN" in md


def test_markdown_roofline_table_for_gpu_results(bench_run: tuple[dict, str, str]) -> None:
    from bench.report import render_markdown

    run, md, _ = bench_run
    assert "of the ceiling" not in md  # CPU: no roofline
    gpu = json.loads(json.dumps(run))
    flax = gpu["results"][0]["frameworks"]["flax"]
    flax.update(roofline_step_s=0.004, of_roofline=flax["images_per_s"] * 0.004 / 8)
    table = render_markdown(gpu)
    prefix = f"| {CONFIG} | Flax NNX (jit) | {flax['kernels']} |"
    row = next(line for line in table.splitlines() if line.startswith(prefix))
    assert f"| 4.000 | 2,000 | {flax['images_per_s']:,.0f} |" in row


def test_flop_count_matches_torchvision() -> None:
    """torchvision's model cards: ResNet-18 1.81, ResNet-50 4.09 GMACs ("GFLOPS") at 224."""
    from bench.flops import resnet_flops

    r18 = resnet_flops(18, stem="imagenet", image_size=224, num_classes=1000)
    r50 = resnet_flops(50, stem="imagenet", image_size=224, num_classes=1000)
    assert round(r18.forward_per_image / 2e9, 2) == 1.81
    assert round(r50.forward_per_image / 2e9, 2) == 4.09
    assert r18.train_per_image == 3 * r18.forward_per_image


def test_peak_table() -> None:
    from bench.flops import lookup_peak_tflops

    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", True) == 989.0
    assert lookup_peak_tflops("NVIDIA H200", "fp32", False) == 67.0
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16", True) == 756.0
    assert lookup_peak_tflops("cpu", "fp32", True) is None


def test_time_to_accuracy_summary() -> None:
    from bench.time_to_accuracy import summarize

    rows = [{"epoch": 1, "test_acc": 0.86, "elapsed_s": 3.0},
            {"epoch": 2, "test_acc": 0.905, "elapsed_s": 5.0},
            {"epoch": 3, "test_acc": 0.899, "elapsed_s": 7.5}]
    s = summarize(rows, 0.90)
    assert s["reached"] and s["epoch"] == 2 and s["train_elapsed_s"] == 5.0
    assert s["best_test_acc"] == 0.905 and s["final_test_acc"] == 0.899
    assert s["milestones"]["0.85"] == {"epoch": 1, "train_elapsed_s": 3.0}
    assert s["milestones"]["0.90"] == {"epoch": 2, "train_elapsed_s": 5.0}
    assert s["milestones"]["0.91"] is None
    assert not summarize(rows, 0.94)["reached"]
    flip = [dict(r, test_acc_flip=r["test_acc"] + 0.04) for r in rows]
    s = summarize(flip, 0.94, metric="test_acc_flip")
    assert s["metric"] == "test_acc_flip" and s["reached"] and s["epoch"] == 2
    assert s["best_test_acc"] == pytest.approx(0.945)


def test_torch_time_to_accuracy_runs(tmp_path: Path) -> None:
    """bench/torch_train.py through bench/time_to_accuracy.py: train.py's metrics contract."""
    report_path, workdir = tmp_path / "tta.json", tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "bench/time_to_accuracy.py", "--train-script", "bench/torch_train.py",
         "--dataset", "synthetic:256:64", "--target", "0.999", "--workdir", str(workdir),
         "--json", str(report_path), "--", "--depth", "18", "--width", "0.125",
         "--epochs", "2", "--batch-size", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["elapsed_s"] > rows[0]["elapsed_s"] > 0
    assert all(0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["train_loss"]) for r in rows)
    assert all(0.0 <= r["test_acc_flip"] <= 1.0 for r in rows)  # the fast recipe's eval_flip
    report = json.loads(report_path.read_text())
    assert report["epochs_logged"] == 2 and report["returncode"] == 0
    assert report["reached"] == (proc.returncode == 0)


def test_time_to_accuracy_side_by_side_table(tmp_path: Path) -> None:
    from bench.time_to_accuracy import main

    rows = {"a": [(0.50, 9.0), (0.86, 0.5), (0.91, 0.5)], "b": [(0.84, 2.0), (0.87, 1.0)]}
    paths = []
    for label, accs in rows.items():
        path = tmp_path / f"{label}.jsonl"
        elapsed = 0.0
        lines = []
        for epoch, (acc, t) in enumerate(accs, start=1):
            elapsed += t
            row = {"epoch": epoch, "test_acc": acc, "elapsed_s": elapsed,
                   "epoch_time_s": t, "train_images_per_s": 100 / t}
            if label == "a" and epoch == 1:
                row["compile_s"] = 7.5
            lines.append(json.dumps(row))
        path.write_text("\n".join(lines) + "\n")
        paths += ["--metrics", f"{label.upper()}={path}"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*paths, "--target", "0.9"]) == 0
    table = out.getvalue().splitlines()
    assert table[0].startswith("| run | epochs | best test acc")
    assert table[2] == ("| A | 3 | 91.00% | 91.00% | 2 (9.5) | 3 (10.0) | 3 (10.0) | 9.0 "
                        "| 7.5 | 0.50 | 200 |")
    assert table[3] == ("| B | 2 | 87.00% | 87.00% | 2 (3.0) | not reached | not reached "
                        "| 2.0 | — | 1.00 | 100 |")
    one = io.StringIO()  # one labelled file: a one-row table
    with contextlib.redirect_stdout(one):
        assert main([*paths[2:], "--target", "0.9"]) == 0
    assert one.getvalue().splitlines()[2] == table[3]


def test_eval_flip_counts_the_mirror_averaged_prediction_in_both_frameworks() -> None:
    """``--eval-flip``: train.py's eval step and torch_ref.training.evaluate (which
    bench/torch_train.py uses) score the argmax of logits(image) + logits(mirror image) on the
    same converted weights.

    The labels are set to the flip-averaged predictions of a direct Flax computation, so the
    flip count must be all 70 images, and to differ from the plain predictions on at least
    one image, so the plain count must not be (a flip along the height, or no flip, fails).
    70 images in batches of 32 also exercise the padded last batch.
    """
    import jax
    import torch

    import torch_ref
    from flax_resnet import training as T
    from flax_resnet.config import make_config
    from flax_resnet.convert import load_torch_state_dict
    from flax_resnet.data import normalize, synthetic_dataset
    from flax_resnet.program import DataSpec, build_program
    from flax_resnet.sharding import make_mesh
    from parity_tests.harness import randomize_norms_
    from torch_ref.training import evaluate as torch_evaluate
    from torch_ref.training import nhwc_to_nchw
    from torch_ref.training import normalize as torch_normalize

    cfg = make_config("fast", dataset="synthetic:64:70", depth=20, width=0.25, batch_size=32,
                        eval_flip=True, zero_init_residual=False)
    ds = synthetic_dataset(64, 70)
    tmodel = torch_ref.from_config(cfg.model)
    randomize_norms_(tmodel, seed=3)
    tmodel.eval()
    x_torch = torch_normalize(nhwc_to_nchw(ds.test.images), ds.mean, ds.std)
    with torch.no_grad():  # centre the logits: untrained, one class would win everywhere
        tmodel.fc.bias -= tmodel(x_torch).mean(0)
    model = T.create_model(cfg)
    load_torch_state_dict(model, tmodel.state_dict())

    model.eval()
    x = normalize(ds.test.images, ds.mean, ds.std, jax.numpy.float32)
    plain = np.asarray(model(x))
    mirrored = np.asarray(model(x[:, :, ::-1]))
    labels = np.argmax(plain + mirrored, -1).astype(np.int32)
    n_plain = int(np.sum(np.argmax(plain, -1) == labels))
    assert n_plain < 70, "the mirror changes no prediction: the test cannot tell flip from none"
    test = dataclasses.replace(ds.test, labels=labels)

    mesh = make_mesh(jax.devices()[:1])
    program, state = build_program(cfg, mesh, DataSpec(2, ds.image_shape, ds.mean, ds.std),
                                   initial=model)
    from flax_resnet.batches import eval_batches

    flax = T.evaluate(program.eval_step, state, mesh, eval_batches(test, 32, mesh))
    assert flax["count"] == 70 and flax["acc_flip"] == 1.0
    assert flax["acc"] == n_plain / 70

    y_torch = torch.from_numpy(labels.astype(np.int64))
    ref = torch_evaluate(tmodel, ((x_torch[i : i + 32], y_torch[i : i + 32])
                                  for i in range(0, 70, 32)), flip=True)
    assert ref["count"] == 70 and ref["acc_flip"] == 1.0 and ref["acc"] == n_plain / 70
    # float32 cross entropy summed over 70 images, two conv stacks' rounding apart
    assert ref["loss"] == pytest.approx(flax["loss"], rel=1e-5)


# --------------------------------------------------------------------------- ImageNet configs

IN_TINY = "resnet18w0.125-b8-fp32-in64"


def test_imagenet_config_grammar() -> None:
    from bench.configs import PRESETS, parse_config, parse_configs
    from bench.run import train_config
    from flax_resnet.config import TrainConfig
    from flax_resnet.training import device_augment

    cfg = parse_config("resnet50-b256-bf16-in224")
    assert (cfg.depth, cfg.batch, cfg.precision, cfg.width) == (50, 256, "bf16", 1.0)
    assert (cfg.stem, cfg.image_size, cfg.num_classes) == ("imagenet", 224, 1000)
    assert cfg.imagenet and not cfg.device_augment
    assert cfg.name == "resnet50-b256-bf16-in224"
    assert parse_config(IN_TINY, image_size=16).image_size == 64  # the suffix wins
    assert parse_config(IN_TINY).name == IN_TINY
    assert [c.name for c in parse_configs("imagenet")] == list(PRESETS["imagenet"])
    tc = TrainConfig.from_dict(train_config(cfg, "fast", None))
    assert (tc.model.stem, tc.model.num_classes, tc.image_size) == ("imagenet", 1000, 224)
    assert not device_augment(tc)  # the step normalises only
    # CIFAR configs build the very config they built before ImageNet configs existed.
    cifar = parse_config("resnet18-b512-bf16")
    assert (cifar.stem, cifar.image_size, cifar.num_classes) == ("cifar", 32, 10)
    assert cifar.device_augment and cifar.name == "resnet18-b512-bf16"
    ctc = TrainConfig.from_dict(train_config(cifar, "fast", None))
    assert ctc.augment == "auto" and ctc.image_size is None and device_augment(ctc)
    for bad in ("resnet50-b256-bf16-in", "resnet50-b256-bf16-in16", "resnet50-b256-in224"):
        with pytest.raises(ValueError, match=bad):
            parse_config(bad)


def test_torch_imagenet_step_normalizes_only() -> None:
    """augment=False: the step's input is the normalised batch itself, no crop or flip (the
    pad-crop-flip path, on the same batch, changes it)."""
    import torch

    import torch_ref
    from bench.augment import normalize_coeffs
    from bench.configs import parse_config
    from bench.run import train_config
    from bench.torch_side import make_forward_loss
    from flax_resnet.config import TrainConfig

    cfg = parse_config("resnet18w0.125-b2-fp32-in32")
    tc = TrainConfig.from_dict(train_config(cfg, "fast", None))
    model = torch_ref.from_config(tc.model).eval()
    mean, std = cfg.mean_std
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    labels = torch.tensor([3, 999])
    crit = torch.nn.CrossEntropyLoss()
    scale, shift = (torch.tensor(v) for v in normalize_coeffs(mean, std))
    with torch.no_grad():
        want = model((images.float() * scale + shift).permute(0, 3, 1, 2))
        plain, _ = make_forward_loss(model, crit, mean, std, bf16=False, augment=False)(
            images, labels)
        torch.manual_seed(0)
        augmented, _ = make_forward_loss(model, crit, mean, std, bf16=False)(images, labels)
    assert want.shape == (2, 1000)
    assert torch.equal(plain, want)
    assert not torch.allclose(augmented, want)


def test_imagenet_step_benchmark_both_sides(bench_run: tuple[dict, str, str]) -> None:
    """``python -m bench`` on a tiny ImageNet-stem config: both workers build and time it
    (its own size, whatever ``--image-size`` says for the CIFAR configs)."""
    from bench.flops import resnet_flops

    entry = bench_run[0]["results"][1]
    assert set(entry["frameworks"]) == {"flax", "torch"}
    assert entry["config"]["name"] == IN_TINY and entry["config"]["stem"] == "imagenet"
    assert entry["train_config"]["augment"] == "random-resized-crop"
    f = resnet_flops(18, stem="imagenet", width=0.125, num_classes=1000, image_size=64)
    assert entry["flops"]["train_per_image"] == f.train_per_image
    for fw in ("flax", "torch"):
        r = entry["frameworks"][fw]
        assert r["ok"], r.get("error")
        assert r["device_augment"] is False
        assert r["images_per_s"] > 0 and r["timed_steps"] == 2
        assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0


# --------------------------------------------------------------------------- end to end

def test_torch_e2e_on_a_tiny_folder(tmp_path: Path) -> None:
    """bench/torch_e2e.py on 64 generated JPEGs, 2 workers, over an epoch boundary (the
    folder's own epochs of 8 steps: 1 + 1 warm-up + 8 timed + 1 = 11 steps)."""
    from bench.e2e import make_folder_parallel

    root = make_folder_parallel(tmp_path / "jpeg", 64, procs=2)
    assert len(list((root / "train").glob("c*/*.JPEG"))) == 64
    assert (root / ".complete").exists() and not (tmp_path / "jpeg.parts").exists()
    out = tmp_path / "torch.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    args = [sys.executable, "-m", "bench.torch_e2e", "--root", str(root), "--config", IN_TINY,
            "--workers", "2", "--steps", "8", "--warmup", "1", "--warmup-s", "0",
            "--epoch-images", "0", "--json", str(out)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert (r["framework"], r["train_images"], r["classes"]) == ("torch", 64, 10)
    assert r["timed_steps"] == 8 and r["stopped_by"] == "steps"
    assert r["epochs_started"] == 2 and r["epoch_images"] == 64
    assert r["images_per_s"] > 0 and math.isfinite(r["loss"])
    assert 0 <= r["data_wait_s"] <= r["timed_s"]
    assert r["data_wait_fraction"] == pytest.approx(r["data_wait_s"] / r["timed_s"])
    assert f"[e2e] torch {IN_TINY} on 64 images" in proc.stdout
    # A config without -in, or a folder without train/: exit 2 naming the value.
    bad = subprocess.run([*args[:6], "resnet18-b8-fp32"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "-in<size>" in bad.stderr
    bad = subprocess.run([*args[:4], str(tmp_path), *args[5:7]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and f"--root {tmp_path}: no train/" in bad.stderr


def test_e2e_protocol_counts_the_wait_for_data() -> None:
    """bench/e2e.py's timed_run on a fake loop whose loader takes 20 ms and step ~0: the time
    limit stops it, and nearly all of its time is counted as waiting for data."""
    import time

    from bench.e2e import render, timed_run

    synced = []

    def next_batch() -> int:
        time.sleep(0.02)
        return 1

    r = timed_run(next_batch, lambda b: b, synced.append, batch=4, warmup=2, warmup_s=0.0,
                  steps=10_000, time_limit=0.2)
    assert len(synced) == 3  # after the first step, the warm-up and the timed steps
    assert r["warmup_steps"] == 2 and r["stopped_by"] == "time_limit"
    assert 5 <= r["timed_steps"] <= 12  # ~0.2 s of 20 ms batches
    assert r["data_wait_fraction"] > 0.9
    assert r["images_per_s"] == pytest.approx(4 * r["timed_steps"] / r["timed_s"])
    row = dict(r, framework="x", config="c", train_images=8, workers=1)
    table = render([row, dict(row, framework="y", images_per_s=r["images_per_s"] / 2)])
    assert table.splitlines()[2].endswith("| 1.00 |")
    assert table.splitlines()[3].endswith("| 0.50 |")
