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
from bench.hlo_kernels import by_size, parse_kernels, roofline_time
from bench.roofline import analyze, compiled_step_hlo, main

FIXTURE = Path(__file__).parent / "fixtures" / "resnet18w0.125-b8-bf16.h100.hlo.gz"
TINY = "resnet18w0.125-b8"


def expected_train_flops(config: str) -> int:
    cfg = parse_config(config)
    f = resnet_flops(cfg.depth, width=cfg.width, image_size=cfg.image_size)
    stem_channels = int(64 * cfg.width)
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


# A hand-written program: a cuDNN forward conv with a 32 MiB workspace, a fusion that only
# slices one of its operands, and a cuBLAS GEMM.
LIBRARY_CALLS = """HloModule m, entry_computation_layout={()->()}

%sliced (p0: bf16[64,8,8,16], p1: f32[16]) -> f32[1,1,1,16] {
  %p0 = bf16[64,8,8,16]{3,2,1,0} parameter(0)
  %c = f32[64,8,8,16]{3,2,1,0} convert(%p0)
  %s = f32[1,1,1,16]{3,2,1,0} slice(%c), slice={[0:1], [0:1], [0:1], [0:16]}
  %p1 = f32[16]{0} parameter(1)
  %b = f32[1,1,1,16]{3,2,1,0} bitcast(%p1)
  ROOT %a = f32[1,1,1,16]{3,2,1,0} add(%s, %b)
}

ENTRY %main (x: bf16[64,8,8,8], w: bf16[16,3,3,8], v: f32[16], m: f32[32,48]) -> f32[1,1,1,16] {
  %x = bf16[64,8,8,8]{3,2,1,0} parameter(0)
  %w = bf16[16,3,3,8]{3,2,1,0} parameter(1)
  %v = f32[16]{0} parameter(2)
  %m = f32[32,48]{1,0} parameter(3)
  @CONV@
  %y = bf16[64,8,8,16]{3,2,1,0} get-tuple-element(%conv), index=0
  @GEMM@
  ROOT %f = f32[1,1,1,16]{3,2,1,0} fusion(%y, %v), kind=kLoop, calls=%sliced
}
""".replace(
    "@CONV@",
    "%conv = (bf16[64,8,8,16]{3,2,1,0}, u8[33554432]{0}) custom-call(%x, %w), "
    "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, "
    'custom_call_target="__cudnn$convForward"',
).replace(
    "@GEMM@",
    "%gemm = (f32[32,32]{1,0}, s8[4194304]{0}) custom-call(%m, %m), "
    'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":'
    '{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
    '"rhs_contracting_dimensions":["1"]}}}',
)


def test_library_workspaces_and_sliced_operands_are_not_traffic():
    conv, gemm, fusion = parse_kernels(LIBRARY_CALLS)
    assert (conv.kind, gemm.kind, fusion.kind) == ("convForward", "matmul", "fusion:kLoop")
    assert conv.read_bytes == 2 * (64 * 8 * 8 * 8 + 16 * 3 * 3 * 8)
    assert conv.write_bytes == 2 * 64 * 8 * 8 * 16  # the 32 MiB workspace is scratch
    assert conv.flops == 2 * (64 * 8 * 8 * 16) * 9 * 8
    assert gemm.write_bytes == 4 * 32 * 32
    assert gemm.flops == 2 * 32 * 32 * 48
    # The fusion reads one bf16 element per channel of %y (not all of it) and all of %v.
    assert fusion.read_bytes == 2 * 16 + 4 * 16
    assert fusion.write_bytes == 4 * 16


@pytest.mark.parametrize("broken, message", [
    (LIBRARY_CALLS.replace("bf16[64,8,8,8]{3,2,1,0} parameter(0)",
                           "s3[64,8,8,8]{3,2,1,0} parameter(0)"), "unknown element type"),
    (LIBRARY_CALLS.replace("fusion(%y, %v)", "fusion(%y, %undefined)"), "not defined"),
    (LIBRARY_CALLS.replace("ENTRY %main", "%main"), "no 'ENTRY"),
    (LIBRARY_CALLS.replace("%v = f32[16]{0} parameter(2)", "%v = f32[16]{0} parameter 2"),
     "cannot parse"),
])
def test_malformed_hlo_is_an_error_not_zero_bytes(broken, message):
    with pytest.raises(ValueError, match=message):
        parse_kernels(broken)


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


def test_size_bins_and_launch_floors_recount_the_same_kernels():
    cfg = parse_config(f"{TINY}-bf16")
    kernels = parse_kernels(gzip.open(FIXTURE, "rt").read())
    report = analyze(kernels, cfg, "NVIDIA H100 80GB HBM3")
    peak, bw = 989e12, 3.35e12
    times = [max(k.flops / peak, k.bytes / bw) for k in kernels]
    bins = report["by_size"]
    assert [b["from_s"] for b in bins] == [0, 1e-6, 3e-6, 1e-5, 3e-5]
    assert sum(b["count"] for b in bins) == len(kernels)
    for b, hi in zip(bins, [*(x["from_s"] for x in bins[1:]), math.inf], strict=True):
        inside = [t for t in times if b["from_s"] <= t < hi]
        assert b["count"] == len(inside)
        assert math.isclose(b["roofline_s"], sum(inside), rel_tol=1e-9, abs_tol=1e-15)
    # This tiny model's kernels are almost all below a microsecond: a floor dominates.
    assert bins[0]["count"] > len(kernels) / 2
    previous = report["totals"]["roofline_s"]
    for f in report["launch_floor"]:
        expected = sum(max(t, f["floor_s"]) for t in times)
        assert math.isclose(f["roofline_s"], expected, rel_tol=1e-12)
        assert f["roofline_s"] > previous
        assert math.isclose(f["images_per_s"], 8 / expected, rel_tol=1e-12)
        previous = f["roofline_s"]


def test_measured_ceilings_time_the_kernels_but_mfu_stays_against_the_datasheet():
    from bench.flops import DeviceRates

    cfg = parse_config(f"{TINY}-bf16")
    kernels = parse_kernels(gzip.open(FIXTURE, "rt").read())
    datasheet = analyze(kernels, cfg, "NVIDIA H100 80GB HBM3")
    half = analyze(kernels, cfg, "NVIDIA H100 80GB HBM3",
                   ceilings=DeviceRates(989.0 / 2, 3.35 / 2))
    # Every kernel takes twice as long at half of both rates...
    assert math.isclose(half["totals"]["roofline_s"], 2 * datasheet["totals"]["roofline_s"],
                        rel_tol=1e-12)
    # ...so the MFU ceiling halves: its denominator is still the datasheet peak.
    assert math.isclose(half["ceiling"]["mfu"], datasheet["ceiling"]["mfu"] / 2, rel_tol=1e-12)
    assert half["meta"]["peak_tflops"] == 989.0
    assert half["meta"]["ceilings"] == {"peak_tflops": 989.0 / 2, "hbm_tbs": 3.35 / 2}
    model_flops = datasheet["meta"]["model_flops_per_step"]
    for f in half["launch_floor"]:
        assert math.isclose(f["mfu"], model_flops / f["roofline_s"] / 989e12, rel_tol=1e-12)


def test_ceiling_flags_time_the_kernels_and_reject_bad_values(tmp_path, capsys):
    hlo = tmp_path / "step.hlo"
    hlo.write_text(gzip.open(FIXTURE, "rt").read())
    args = ["--from-hlo", str(hlo), "--device", "NVIDIA H100 80GB HBM3",
            "--config", f"{TINY}-bf16", "--top", "0"]
    for bad in ("0", "-3", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            main([*args, "--ceiling-tbs", bad])
        assert e.value.code == 2
        assert f"--ceiling-tbs must be a finite number > 0, got {float(bad)}" in (
            capsys.readouterr().err)
    out = tmp_path / "r.json"
    # Only the bandwidth given: the matrix rate stays the datasheet's.
    assert main([*args, "--ceiling-tbs", "1.675", "--json", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["ceilings"] == {"peak_tflops": 989.0, "hbm_tbs": 1.675}
    assert "measured ceilings 989.0 TFLOP/s and 1.675 TB/s" in capsys.readouterr().out


def test_sub_microsecond_kernels_are_grouped_by_name_without_suffix():
    from bench.hlo_kernels import Kernel

    kernels = [Kernel("loop_add_fusion", "fusion:kLoop", 4, 4, 0),
               Kernel("loop_add_fusion.7", "fusion:kLoop", 4, 4, 0),
               Kernel("copy.12", "copy", 8, 8, 0),
               Kernel("loop_add_fusion.3", "fusion:kLoop", 4, 4, 0),
               Kernel("big_fusion.1", "fusion:kLoop", 10**9, 10**9, 0)]
    report = analyze(kernels, parse_config(f"{TINY}-bf16"), "NVIDIA H100 80GB HBM3")
    assert report["sub_microsecond"] == [
        {"kind": "fusion:kLoop", "name": "loop_add_fusion", "count": 3},
        {"kind": "copy", "name": "copy", "count": 1},
    ]
    assert report["by_size"][0]["count"] == 4 and report["by_size"][-1]["count"] == 1


def test_size_bins_reject_bad_edges_and_misaligned_measurements():
    kernels = parse_kernels(gzip.open(FIXTURE, "rt").read())
    for edges in ([], [1e-6, 3e-6], [0, 3e-6, 1e-6], [0, 1e-6, 1e-6]):
        with pytest.raises(ValueError, match="edges_s"):
            by_size(kernels, 989e12, 3.35e12, edges)
    with pytest.raises(ValueError, match="measured times"):
        by_size(kernels, 989e12, 3.35e12, [0, 1e-6], measured_s=[0.0])
    with pytest.raises(ValueError, match="floor_s"):
        roofline_time(kernels, 989e12, 3.35e12, floor_s=-1e-6)
    with pytest.raises(ValueError, match="needs a bandwidth"):
        by_size(kernels, 989e12, None, [0, 1e-6])


def test_a_kernel_on_a_bin_edge_belongs_to_the_bin_above():
    from bench.hlo_kernels import Kernel

    # 1e6 bytes at 1e12 B/s: exactly 1 us; one byte less is just under it.
    kernels = [Kernel("edge", "copy", 10**6, 0, 0), Kernel("under", "copy", 10**6 - 1, 0, 0)]
    bins = by_size(kernels, None, 1e12, [0, 1e-6, 3e-6])
    assert [b["count"] for b in bins] == [1, 1, 0]
    assert bins[1]["roofline_s"] == 1e-6


def test_profile_report_bins_measured_time_by_roofline_size():
    from bench.kernel_profile import profile_report, render_markdown

    cfg = parse_config(f"{TINY}-bf16")
    kernels = parse_kernels(gzip.open(FIXTURE, "rt").read())
    # As if every kernel but every third had run for 2 us + 1 ns per byte, with one idle
    # microsecond after each (wall = busy + 1 us per kernel seen), over 3 steps.
    ran = kernels[::3] + kernels[1::3]
    per_op = {k.name: 3 * (2e-6 + k.bytes * 1e-9) for k in ran}
    busy = sum(per_op.values()) / 3
    report = profile_report(kernels, per_op, 3, busy + len(ran) * 1e-6, cfg,
                            "NVIDIA H100 80GB HBM3", "device")
    bins = report["by_size"]
    assert sum(b["count"] for b in bins) == len(kernels)
    assert sum(b["seen"] for b in bins) == len(ran) == report["kernels_seen"]
    assert math.isclose(sum(b["measured_s"] for b in bins), busy, rel_tol=1e-9)
    small = [k for k in ran if max(k.flops / 989e12, k.bytes / 3.35e12) < 1e-6]
    assert bins[0]["seen"] == len(small) < bins[0]["count"]
    assert math.isclose(bins[0]["measured_s"], sum(2e-6 + k.bytes * 1e-9 for k in small),
                        rel_tol=1e-9)
    text = render_markdown(report)
    per_seen = sum(2e-6 + k.bytes * 1e-9 for k in small) / len(small) * 1e6
    assert f"| 0–1 µs | {bins[0]['count']} | {len(small)} | " in text
    assert f"| {per_seen:.2f} |" in text
    assert (f"Idle between kernels: {len(ran) * 1e-3:.3f} ms per step, 1.00 µs per kernel seen"
            in text)


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
    # Nearly all the traced time is charged to kernels of the compiled step.
    assert report["unmatched_step_s"] <= 0.1 * report["busy_step_s"]


# A GPU trace as the profiler writes it: a stream line with two kernels (one tagged with
# its HLO instruction, one cuDNN-internal), the derived "XLA Ops" line repeating the first,
# and a kernel of another module.
GPU_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines { id: 1 name: "Stream #7(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 2000000
             stats { metadata_id: 1 str_value: "loop_add_fusion" }
             stats { metadata_id: 2 str_value: "jit_step" } }
    events { metadata_id: 2 offset_ps: 3000000 duration_ps: 1000000 }
    events { metadata_id: 1 offset_ps: 5000000 duration_ps: 7000000
             stats { metadata_id: 1 str_value: "loop_add_fusion" }
             stats { metadata_id: 2 str_value: "jit_other" } }
  }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 2000000
             stats { metadata_id: 1 str_value: "loop_add_fusion" }
             stats { metadata_id: 2 str_value: "jit_step" } }
  }
  event_metadata { key: 1 value { id: 1 name: "loop_add_fusion" } }
  event_metadata { key: 2 value { id: 2 name: "sm90_xmma_fprop_kernel" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
  stat_metadata { key: 2 value { id: 2 name: "hlo_module" } }
}
"""


def test_gpu_trace_counts_stream_kernels_once_and_only_of_the_step(tmp_path):
    from jax.profiler import ProfileData

    from bench.kernel_profile import device_time_per_op, traced_modules

    path = tmp_path / "t.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(GPU_TRACE))
    per_op, source = device_time_per_op(str(path), "jit_step")
    assert source == "device"
    assert per_op.keys() == {"loop_add_fusion", "?sm90_xmma_fprop_kernel"}
    assert math.isclose(per_op["loop_add_fusion"], 2e-6)
    assert math.isclose(per_op["?sm90_xmma_fprop_kernel"], 1e-6)
    assert traced_modules(str(path)) == {"jit_step", "jit_other"}
