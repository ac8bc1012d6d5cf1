"""Where a training step's time can go: the compiled step's kernels against the roofline.

    python -m bench.roofline [--config resnet18-b512-bf16] [--target local|h100|h200]
                             [--measured-img-s X] [--top N] [--hlo-out FILE] [--json FILE]
    python -m bench.roofline --from-hlo FILE --device NAME [--config ...]

Compiles the product's train step (``flax_resnet.training.make_train_step``, the ``fast``
recipe at the config's depth, width, batch and precision, as ``python -m bench`` times it)
and lists the kernels of the optimized program (bench/hlo_kernels.py): per kernel kind the
count, the modeled HBM traffic and the convolution FLOPs, and each kernel's roofline time,
max(FLOPs / peak, bytes / bandwidth). Their sum is the step time this kernel list cannot
beat, since the kernels run one after another; it gives a ceiling on images/s and MFU.

``--target h100`` / ``h200`` compile for that GPU without one (deviceless AOT; needs the
CUDA plugin, ``pip install "jax[cuda12]"``, in the environment; no GPU or driver is used).
``--target local`` compiles for the first attached device. Convolution algorithms are not
autotuned without a device, which changes no kernel boundary or traffic figure here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.configs import BenchConfig, parse_config  # noqa: E402
from bench.flops import DeviceRates, device_rates, resnet_flops  # noqa: E402
from bench.gpu_targets import GPU_TARGETS, target_config  # noqa: E402
from bench.hlo_kernels import (  # noqa: E402
    Kernel,
    by_kind,
    by_size,
    kernel_time,
    parse_kernels,
    roofline_time,
)
from bench.report import fmt_ms, save_report, size_bin_labels  # noqa: E402

TARGETS = ("local", *GPU_TARGETS)
CIFAR_TRAIN_IMAGES = 50_000
CONTROL_FLOW = ("call", "while", "conditional")
# Kernels binned by roofline time, and the ceiling again with every kernel taking at least
# a launch floor: hundreds of sub-microsecond kernels (per-layer scalar and per-channel
# updates, second passes of split reductions) cost their launch, not their bytes.
SIZE_EDGES_US = (0, 1, 3, 10, 30)
LAUNCH_FLOORS_US = (1, 2, 3, 5)
SIZE_EDGES_S = tuple(e / 1e6 for e in SIZE_EDGES_US)


def _prepare_deviceless() -> None:
    # Must precede the CUDA plugin's initialization: its version check needs a driver.
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"


def _devices(target: str) -> list[Any]:
    import jax

    if target == "local":
        return jax.devices()[:1]
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=target_config(target), topology="1x1x1"
        )
    except (NotImplementedError, RuntimeError) as e:
        raise SystemExit(
            f"--target {target} needs JAX's CUDA plugin to compile without a GPU "
            f'(pip install "jax[cuda12]=={jax.__version__}"): {e}'
        ) from e
    return list(topology.devices)


def compiled_step_hlo(cfg: BenchConfig, target: str, recipe: str = "fast",
                      tf32: bool = True) -> tuple[str, str]:
    """(optimized HLO text, device kind) of the product's train step compiled for ``target``.

    Only shapes are traced: the state is initialized on the host and handed to the compiler
    as ``ShapeDtypeStruct``s with their shardings.
    """
    import jax
    import jax.numpy as jnp

    from bench.run import train_config
    from flax_resnet import data as data_lib
    from flax_resnet import training as T
    from flax_resnet.config import TrainConfig
    from flax_resnet.program import DataSpec, build_program
    from flax_resnet.sharding import batch_sharding, make_mesh, replicated

    devices = _devices(target)
    mesh = make_mesh(devices)
    train_cfg = TrainConfig.from_dict(train_config(cfg, recipe, None))
    train_cfg = train_cfg.replace(num_classes=cfg.num_classes)
    image = (cfg.batch, cfg.image_size, cfg.image_size, 3)
    spec = DataSpec(CIFAR_TRAIN_IMAGES // cfg.batch, image[1:], data_lib.CIFAR10_MEAN,
                    data_lib.CIFAR10_STD)
    repl, rows = replicated(mesh), batch_sharding(mesh)
    # JAX's default fp32 precision on GPU lets convs use TF32; "highest" forbids it.
    precision = jax.default_matmul_precision(None if tf32 else "highest")
    with precision, jax.default_device(jax.devices("cpu")[0]):
        program, state = build_program(train_cfg, mesh, spec, abstract=True)
        metrics = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                               T.zero_metrics(T.loss_dtype(train_cfg)))
    with precision:
        compiled = program.train_step.lower(
            state, metrics,
            jax.ShapeDtypeStruct(image, jnp.uint8, sharding=rows),
            jax.ShapeDtypeStruct((cfg.batch,), jnp.int32, sharding=rows),
        ).compile()
    return compiled.as_text(), str(getattr(devices[0], "device_kind", devices[0]))


def analyze(kernels: list[Kernel], cfg: BenchConfig, device: str, tf32: bool = True,
            measured_img_s: float | None = None, top: int = 10,
            ceilings: DeviceRates | None = None) -> dict[str, Any]:
    """The report (JSON-able) of a step's kernels on ``device``.

    Kernel times use the device's datasheet peaks, or ``ceilings`` (rates measured on such
    a device: a large copy, a large matrix product) where given; MFU is always against the
    datasheet peak.
    """
    rates = device_rates(device, cfg.precision, tf32)
    timing = ceilings or rates
    peak, bandwidth = timing.flops_per_s, timing.bytes_per_s
    mfu_peak = rates.flops_per_s
    flops = resnet_flops(cfg.depth, stem=cfg.stem, width=cfg.width,
                         num_classes=cfg.num_classes, image_size=cfg.image_size)
    model_flops_step = flops.train_per_image * cfg.batch
    times = [kernel_time(k, peak, bandwidth) for k in kernels]
    roofline_s = roofline_time(kernels, peak, bandwidth)
    totals = {
        "kernels": len(kernels),
        "read_bytes": sum(k.read_bytes for k in kernels),
        "write_bytes": sum(k.write_bytes for k in kernels),
        "conv_flops": sum(k.flops for k in kernels),
        "roofline_s": roofline_s,
        "unexpanded_control_flow": sum(k.kind in CONTROL_FLOW for k in kernels),
    }
    ceiling: dict[str, Any] = {"images_per_s": None, "mfu": None}
    if roofline_s:
        ceiling["images_per_s"] = cfg.batch / roofline_s
        if mfu_peak:
            ceiling["mfu"] = model_flops_step / roofline_s / mfu_peak
    ranked = sorted(zip(kernels, times, strict=True), key=lambda kt: -kt[0].bytes)
    sizes, floors, tiny = [], [], []
    if bandwidth:
        tiny = _commonest(k for k, t in zip(kernels, times, strict=True)
                          if t < SIZE_EDGES_S[1])
        sizes = by_size(kernels, peak, bandwidth, SIZE_EDGES_S)
        for floor_us in LAUNCH_FLOORS_US:
            t = roofline_time(kernels, peak, bandwidth, floor_s=floor_us / 1e6)
            floors.append({"floor_s": floor_us / 1e6, "roofline_s": t,
                           "images_per_s": cfg.batch / t if t else None,
                           "mfu": model_flops_step / t / mfu_peak if t and mfu_peak else None})
    report = {
        "meta": {
            "config": cfg.to_dict(), "device": device, "peak_tflops": rates.peak_tflops,
            "hbm_tbs": rates.hbm_tbs, "tf32": tf32,
            "ceilings": None if ceilings is None else {
                "peak_tflops": ceilings.peak_tflops, "hbm_tbs": ceilings.hbm_tbs},
            "date": _dt.date.today().isoformat(),
            "model_flops_per_step": model_flops_step,
        },
        "kinds": [vars(r) for r in by_kind(kernels, peak, bandwidth)],
        "totals": totals,
        "ceiling": ceiling,
        "by_size": sizes,
        "launch_floor": floors,
        "sub_microsecond": tiny,
        "top": [
            {"name": k.name, "kind": k.kind, "read_bytes": k.read_bytes,
             "write_bytes": k.write_bytes, "flops": k.flops, "roofline_s": t}
            for k, t in ranked[:top]
        ],
    }
    if measured_img_s:
        report["measured"] = {
            "images_per_s": measured_img_s,
            "step_s": cfg.batch / measured_img_s,
            "of_roofline": (measured_img_s / ceiling["images_per_s"]
                            if ceiling["images_per_s"] else None),
        }
    return report


def _ceilings_note(ceilings: dict[str, float | None] | None) -> str:
    if not ceilings:
        return ""
    return (f" · kernel times at the measured ceilings {ceilings['peak_tflops'] or '—'} "
            f"TFLOP/s and {ceilings['hbm_tbs'] or '—'} TB/s (MFU still against the datasheet "
            "peak)")


def _commonest(kernels: Iterable[Kernel], top: int = 8) -> list[dict[str, Any]]:
    """Kernels grouped by kind and name without XLA's numeric suffix, most frequent first."""
    groups = Counter((k.kind, re.sub(r"\.\d+$", "", k.name)) for k in kernels)
    return [{"kind": kind, "name": name, "count": n}
            for (kind, name), n in groups.most_common(top)]


def render_markdown(report: dict[str, Any]) -> str:
    meta, tot, ceiling = report["meta"], report["totals"], report["ceiling"]
    lines = [
        f"### Kernels of the compiled train step — {meta['config']['name']} on {meta['device']}",
        "",
        f"{meta['date']} · {meta.get('compiled', '')} · peak "
        f"{meta['peak_tflops'] or '—'} TFLOP/s, HBM {meta['hbm_tbs'] or '—'} TB/s"
        + _ceilings_note(meta.get("ceilings")),
        "",
        "| kernel kind | kernels | read MB | write MB | conv GFLOP | roofline ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["kinds"]:
        lines.append(
            f"| {r['kind']} | {r['count']} | {r['read_bytes'] / 1e6:,.1f} | "
            f"{r['write_bytes'] / 1e6:,.1f} | {r['flops'] / 1e9:,.1f} | {fmt_ms(r['roofline_s'])} |"
        )
    lines.append(
        f"| **total** | {tot['kernels']} | {tot['read_bytes'] / 1e6:,.1f} | "
        f"{tot['write_bytes'] / 1e6:,.1f} | {tot['conv_flops'] / 1e9:,.1f} | "
        f"{fmt_ms(tot['roofline_s'])} |"
    )
    lines.append("")
    if ceiling["images_per_s"]:
        mfu = f", MFU ≤ {ceiling['mfu']:.1%}" if ceiling["mfu"] else ""
        lines.append(
            f"Roofline of this kernel list: {fmt_ms(tot['roofline_s'])} ms per step, "
            f"≤ {ceiling['images_per_s']:,.0f} img/s{mfu}."
        )
    if tot["unexpanded_control_flow"]:
        lines.append(
            f"{tot['unexpanded_control_flow']} control-flow kernels (call/while/conditional) "
            "are counted by their own operands and results; their bodies are not expanded."
        )
    lines += _size_tables(report)
    measured = report.get("measured")
    if measured:
        share = measured["of_roofline"]
        lines.append(
            f"Measured {measured['images_per_s']:,.0f} img/s ({fmt_ms(measured['step_s'])} ms "
            f"per step)" + (f" = {share:.0%} of that ceiling." if share else ".")
        )
    return "\n".join(lines) + "\n"


def _size_tables(report: dict[str, Any]) -> list[str]:
    sizes, floors = report.get("by_size"), report.get("launch_floor")
    if not sizes:
        return []
    lines = ["", "| kernel roofline time | kernels | roofline ms |", "|---|---:|---:|"]
    for b, span in zip(sizes, size_bin_labels(sizes), strict=True):
        lines.append(f"| {span} | {b['count']} | {fmt_ms(b['roofline_s'])} |")
    lines += ["", "| every kernel at least | step ms | ≤ img/s | MFU ≤ |", "|---|---:|---:|---:|"]
    for f in floors:
        mfu = f"{f['mfu']:.1%}" if f["mfu"] else "—"
        img_s = f"{f['images_per_s']:,.0f}" if f["images_per_s"] else "—"
        lines.append(f"| {f['floor_s'] * 1e6:g} µs | {fmt_ms(f['roofline_s'])} | {img_s} | {mfu} |")
    tiny = report.get("sub_microsecond")
    if tiny:
        lines += ["", "Commonest kernels under 1 µs: " + ", ".join(
            f"{t['count']} × {t['name']} ({t['kind']})" for t in tiny) + "."]
    return [*lines, ""]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="resnet18-b512-bf16",
                   help="resnet<depth>[w<width>]-b<batch>-<fp32|bf16>")
    p.add_argument("--target", choices=TARGETS, default="local")
    p.add_argument("--recipe", default="fast")
    p.add_argument("--tf32", choices=("on", "off"), default="on",
                   help="fp32 configs: allow TF32 convs (JAX's GPU default) and use its peak")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--measured-img-s", type=float, default=None,
                   help="a measured throughput (python -m bench) to set against the ceiling")
    p.add_argument("--top", type=int, default=10, help="kernels listed by traffic")
    p.add_argument("--ceiling-tflops", type=float, default=None,
                   help="a measured matrix rate to time kernels by instead of the datasheet "
                        "peak (MFU stays against the datasheet)")
    p.add_argument("--ceiling-tbs", type=float, default=None,
                   help="a measured copy bandwidth (bytes read + written per s, in TB/s) to "
                        "time kernels by instead of the datasheet bandwidth")
    p.add_argument("--from-hlo", default=None, metavar="FILE",
                   help="analyze this optimized HLO text instead of compiling")
    p.add_argument("--device", default=None,
                   help="device name for the peaks with --from-hlo (e.g. 'NVIDIA H100')")
    p.add_argument("--hlo-out", default=None, metavar="FILE", help="write the optimized HLO")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--markdown", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if args.from_hlo and not args.device:
        p.error("--from-hlo needs --device (the peaks are looked up by its name)")
    if args.top < 0:
        p.error(f"--top must be >= 0, got {args.top}")
    for flag in ("ceiling_tflops", "ceiling_tbs"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{flag.replace('_', '-')} must be a finite number > 0, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = parse_config(args.config, args.image_size)
    except ValueError as e:
        raise SystemExit(f"--config: {e}") from e
    tf32 = args.tf32 == "on"
    if args.from_hlo:
        hlo, device, how = Path(args.from_hlo).read_text(), args.device, f"from {args.from_hlo}"
    else:
        if args.target != "local":
            _prepare_deviceless()
        import jax

        hlo, device = compiled_step_hlo(cfg, args.target, args.recipe, tf32)
        how = f"compiled by jax {jax.__version__} for " + (
            "the attached device" if args.target == "local" else f"{args.target}, deviceless"
        )
        if args.hlo_out:
            Path(args.hlo_out).write_text(hlo)
    ceilings = None
    if args.ceiling_tflops or args.ceiling_tbs:
        datasheet = device_rates(device, cfg.precision, tf32)
        ceilings = DeviceRates(args.ceiling_tflops or datasheet.peak_tflops,
                               args.ceiling_tbs or datasheet.hbm_tbs)
    report = analyze(parse_kernels(hlo), cfg, device, tf32, args.measured_img_s, args.top,
                     ceilings)
    report["meta"]["compiled"] = how
    text = render_markdown(report)
    print(text, end="")
    for k in report["top"]:
        print(f"  {(k['read_bytes'] + k['write_bytes']) / 1e6:9.1f} MB  "
              f"{k['flops'] / 1e9:8.1f} GFLOP  {fmt_ms(k['roofline_s']):>7s} ms  "
              f"{k['kind']:20s} {k['name']}")
    save_report(report, text, args.json_path, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
