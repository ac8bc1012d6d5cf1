"""The kernel model behind ``python -m bench.roofline`` (bench/hlo_kernels.py).

The FLOPs it reads off a compiled train step must equal the analytic count of bench/flops.py
(two independent computations: one from the HLO's convolution shapes, one from the model
config): 3x the forward convolutions and classifier, less the stem's data gradient, which
no framework computes for an input that needs no gradient. Checked on the CPU program
compiled here and on an XLA:GPU program for an H100 (cuDNN custom calls, whose operands
play different roles in the forward and the two backward convolutions), compiled without a
GPU by ``python -m bench.roofline --target h100 --config resnet18w0.125-b8-bf16 --hlo-out F``
(jax 0.10.2 with the CUDA 12 plugin) and stored with metadata stripped in fixtures/.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from bench.configs import parse_config
from bench.flops import lookup_hbm_tbs, resnet_flops
from bench.hlo_kernels import parse_kernels
from bench.roofline import analyze, compiled_step_hlo, main

FIXTURE = Path(__file__).parent / "fixtures" / "resnet18w0.125-b8-bf16.h100.hlo.gz"
TINY = "resnet18w0.125-b8"


def expected_train_flops(config: str) -> int:
    cfg = parse_config(config)
    f = resnet_flops(cfg.depth, width=cfg.width, image_size=cfg.image_size)
    stem_channels = 8  # 64 at width 1/8
    stem_forward = 2 * cfg.image_size**2 * 3 * stem_channels * 9
    return cfg.batch * (3 * f.forward_per_image - stem_forward)


def test_traffic_of_an_elementwise_kernel_is_its_input_plus_its_output():
    x = jnp.ones((128, 256), jnp.float32)
    y = jnp.ones((128, 256), jnp.bfloat16)
    hlo = jax.jit(lambda a, b: jnp.sin(a) * b.astype(jnp.float32)).lower(x, y).compile()
    kernels = parse_kernels(hlo.as_text())
    assert len(kernels) == 1, kernels
    assert kernels[0].read_bytes == 128 * 256 * (4 + 2)
    assert kernels[0].write_bytes == 128 * 256 * 4
    assert kernels[0].flops == 0


def test_matmul_flops_are_two_per_multiply_accumulate():
    a, b = jnp.ones((64, 48), jnp.float32), jnp.ones((48, 32), jnp.float32)
    kernels = parse_kernels(jax.jit(jnp.matmul).lower(a, b).compile().as_text())
    assert sum(k.flops for k in kernels) == 2 * 64 * 48 * 32


def test_flops_of_the_compiled_cpu_step_match_the_analytic_count():
    hlo, _ = compiled_step_hlo(parse_config(f"{TINY}-fp32"), "local")
    kernels = parse_kernels(hlo)
    assert sum(k.flops for k in kernels) == expected_train_flops(f"{TINY}-fp32")


def test_flops_of_the_h100_step_match_the_analytic_count_per_cudnn_role():
    kernels = parse_kernels(gzip.open(FIXTURE, "rt").read())
    per_kind: dict[str, int] = {}
    for k in kernels:
        per_kind[k.kind] = per_kind.get(k.kind, 0) + k.flops
    f = resnet_flops(18, width=0.125)
    conv_forward = 8 * f.conv_per_image
    stem_forward = 8 * 2 * 32 * 32 * 3 * 8 * 9
    assert per_kind["convForward"] == conv_forward
    assert per_kind["convBackwardFilter"] == conv_forward
    assert per_kind["convBackwardInput"] == conv_forward - stem_forward
    assert sum(per_kind.values()) == expected_train_flops(f"{TINY}-bf16")
    # cuDNN's workspace is scratch: a forward conv writes just its output.
    fwd = [k for k in kernels if k.kind == "convForward"]
    assert all(k.write_bytes < k.read_bytes * 10 for k in fwd)


def test_roofline_is_the_sum_of_per_kernel_maxima(tmp_path):
    cfg = parse_config(f"{TINY}-bf16")
    kernels = parse_kernels(gzip.open(FIXTURE, "rt").read())
    report = analyze(kernels, cfg, "NVIDIA H100 80GB HBM3", measured_img_s=1e5)
    peak, bw = 989e12, 3.35e12
    expected = sum(max(k.flops / peak, k.bytes / bw) for k in kernels)
    assert math.isclose(report["totals"]["roofline_s"], expected, rel_tol=1e-12)
    assert math.isclose(sum(r["roofline_s"] for r in report["kinds"]), expected, rel_tol=1e-9)
    assert math.isclose(report["ceiling"]["images_per_s"], 8 / expected, rel_tol=1e-12)
    assert report["totals"]["kernels"] == len(kernels)

    out = tmp_path / "r.json"
    hlo = tmp_path / "step.hlo"
    hlo.write_text(gzip.open(FIXTURE, "rt").read())
    assert main(["--from-hlo", str(hlo), "--device", "NVIDIA H100 80GB HBM3",
                 "--config", f"{TINY}-bf16", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["totals"] == report["totals"]


def test_from_hlo_needs_a_device_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--from-hlo", str(FIXTURE)])
    assert e.value.code != 0
    assert "--from-hlo needs --device" in capsys.readouterr().err


def test_bandwidth_lookup_prefers_the_specific_part():
    assert lookup_hbm_tbs("NVIDIA H100 PCIe") == 2.0
    assert lookup_hbm_tbs("NVIDIA H100 80GB HBM3") == 3.35
    assert lookup_hbm_tbs("NVIDIA H200") == 4.8
    assert lookup_hbm_tbs("NVIDIA A100-SXM4-80GB") == 2.039
    assert lookup_hbm_tbs("cpu") is None


def test_kernel_profile_charges_the_traced_events_to_the_compiled_kernels(tmp_path):
    from bench.kernel_profile import main as profile_main

    out = tmp_path / "profile.json"
    assert profile_main(["--config", f"{TINY}-fp32", "--steps", "2", "--warmup", "1",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # On the CPU every thunk is traced on the host and tagged with its HLO instruction.
    assert report["meta"]["source"] == "host"
    assert report["kernels_seen"] >= 0.9 * report["kernels"] > 0
    assert report["busy_step_s"] > 0 and report["wall_step_s"] > 0
    measured = sum(k["measured_s"] for k in report["kinds"])
    assert math.isclose(measured + report["unmatched_step_s"],
                        report["busy_step_s"], rel_tol=1e-9)
