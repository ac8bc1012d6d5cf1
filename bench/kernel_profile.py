"""Measured time of each kernel of the train step, set against its roofline time.

    python -m bench.kernel_profile [--config resnet18-b512-bf16] [--steps 5] [--warmup 20]
                                   [--top 15] [--json FILE] [--markdown FILE]

Runs the product's train step (as ``python -m bench`` does: bench/flax_side.py) on the
attached device, times ``--steps`` steps, then records them with the JAX profiler and reads
the trace back (``jax.profiler.ProfileData``). Each device event that XLA tags with an HLO
instruction of the step's module is charged to that kernel of the compiled program
(bench/hlo_kernels.py), whose roofline time is max(FLOPs / peak, bytes / bandwidth). The
table shows, per kernel kind and for the kernels furthest from their roofline, how far each
is from it; the gap between the device's busy time and the step's wall time is time the
device spends idle (launch overhead, host work).

On a CPU the events are the host's thunks, which may overlap, and there is no roofline.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import re
import sys
import tempfile
import time
from typing import Any

from bench.configs import BenchConfig, parse_config  # noqa: E402
from bench.flops import device_rates  # noqa: E402
from bench.hlo_kernels import (  # noqa: E402
    Kernel,
    by_kind,
    by_size,
    kernel_time,
    parse_kernels,
)
from bench.report import fmt_ms, save_report, size_bin_labels  # noqa: E402
from bench.roofline import CIFAR_TRAIN_IMAGES, SIZE_EDGES_S  # noqa: E402


def module_name(hlo_text: str) -> str:
    """The name of an HLO module (what the profiler tags its events with)."""
    m = re.match(r"HloModule (\S+?),", hlo_text)
    if m is None:
        raise ValueError("no 'HloModule <name>,' header in this HLO text")
    return m.group(1)


def device_time_per_op(xplane_path: str, module: str) -> tuple[dict[str, float], str]:
    """Seconds of device time per HLO instruction of ``module`` in a trace, and where they
    came from: ``device`` or ``host`` (no device plane: CPU).

    On a GPU only the device planes' ``Stream`` lines are read: they hold the raw kernel
    records, while derived lines ("XLA Ops", "XLA Modules") would count each kernel again.
    Stream kernels without an ``hlo_op`` tag (cuDNN's inner kernels, CUDA-graph replays)
    are kept as ``?<kernel name>`` so that the busy time stays whole. An ``hlo_op`` event
    without an ``hlo_module`` tag is taken to belong to the step (the only module run).
    """
    from jax.profiler import ProfileData

    planes = list(ProfileData.from_file(xplane_path).planes)
    device_planes = [p for p in planes if p.name.startswith("/device:")]
    per_op: dict[str, float] = {}
    for plane in device_planes or planes:
        lines = list(plane.lines)
        if device_planes:
            lines = [ln for ln in lines if ln.name.startswith("Stream")]
            if not lines:
                raise SystemExit(
                    f"device plane {plane.name!r} of {xplane_path} has no 'Stream' lines "
                    f"(it has: {', '.join(ln.name for ln in plane.lines) or 'none'})"
                )
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    if stats.get("hlo_module", module) != module:
                        continue
                    op = str(stats["hlo_op"])
                elif device_planes:
                    op = f"?{event.name}"
                else:
                    continue
                per_op[op] = per_op.get(op, 0.0) + event.duration_ns * 1e-9
    return per_op, "device" if device_planes else "host"


def traced_modules(xplane_path: str) -> set[str]:
    """The ``hlo_module`` tags of a trace's events (to explain a trace that matched none)."""
    from jax.profiler import ProfileData

    return {
        str(dict(event.stats)["hlo_module"])
        for plane in ProfileData.from_file(xplane_path).planes
        for line in plane.lines
        for event in line.events
        if "hlo_module" in dict(event.stats)
    }


def _run_and_trace(cfg: BenchConfig, steps: int, warmup: int, trace_dir: str
                   ) -> tuple[str, float, str]:
    """(optimized HLO, wall seconds per step untraced, device kind) after tracing ``steps``."""
    import jax
    import numpy as np

    from bench.flax_side import build_step
    from bench.run import train_config
    from flax_resnet.sharding import put_batch

    train_cfg = train_config(cfg, "fast", None)
    steps_per_epoch = CIFAR_TRAIN_IMAGES // cfg.batch
    step, state, metrics, mesh = build_step(train_cfg, cfg.num_classes, steps_per_epoch,
                                            cfg.image_size)
    rng = np.random.default_rng(0)
    images, labels = put_batch(
        mesh, cfg.batch,
        rng.integers(0, 256, (cfg.batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
        rng.integers(0, cfg.num_classes, (cfg.batch,), dtype=np.int32),
    )
    compiled = step.lower(state, metrics, images, labels).compile()

    def run(n: int) -> None:
        nonlocal state, metrics
        for _ in range(n):
            state, metrics = compiled(state, metrics, images, labels)
        jax.block_until_ready((state, metrics))

    run(warmup)
    t = time.perf_counter()
    run(steps)
    wall = (time.perf_counter() - t) / steps
    with jax.profiler.trace(trace_dir):
        run(steps)
    device = jax.devices()[0]
    return compiled.as_text(), wall, str(getattr(device, "device_kind", device))


def profile_report(kernels: list[Kernel], per_op: dict[str, float], steps: int,
                   wall_step_s: float, cfg: BenchConfig, device: str, source: str,
                   tf32: bool = True, top: int = 15) -> dict[str, Any]:
    """Per kernel and kind: measured seconds per step (``per_op`` over ``steps``) against
    the roofline; the kernels furthest from it; busy and wall time per step."""
    rates = device_rates(device, cfg.precision, tf32)
    peak, bandwidth = rates.flops_per_s, rates.bytes_per_s
    names = {k.name for k in kernels}
    rows = []
    for k in kernels:
        rows.append({
            "name": k.name, "kind": k.kind, "bytes": k.bytes, "flops": k.flops,
            "measured_s": per_op.get(k.name, 0.0) / steps,
            "roofline_s": kernel_time(k, peak, bandwidth),
        })
    measured_by_kind: dict[str, float] = {}
    for r in rows:
        measured_by_kind[r["kind"]] = measured_by_kind.get(r["kind"], 0.0) + r["measured_s"]
    kinds = [{"kind": t.kind, "count": t.count, "measured_s": measured_by_kind[t.kind],
              "roofline_s": t.roofline_s} for t in by_kind(kernels, peak, bandwidth)]
    unmatched = {op: t / steps for op, t in per_op.items() if op not in names}
    busy = sum(r["measured_s"] for r in rows) + sum(unmatched.values())
    gap = (lambda r: r["measured_s"] - r["roofline_s"]) if bandwidth else (
        lambda r: r["measured_s"])
    return {
        "meta": {"config": cfg.to_dict(), "device": device, "source": source,
                 "peak_tflops": rates.peak_tflops, "hbm_tbs": rates.hbm_tbs, "steps": steps,
                 "date": _dt.date.today().isoformat()},
        "wall_step_s": wall_step_s,
        "busy_step_s": busy,
        "kernels_seen": sum(1 for r in rows if r["measured_s"] > 0),
        "kernels": len(rows),
        "roofline_s": sum(r["roofline_s"] for r in rows) if bandwidth else None,
        "kinds": sorted(kinds, key=lambda a: -a["measured_s"]),
        "unmatched_step_s": sum(unmatched.values()),
        "unmatched_ops": dict(sorted(unmatched.items(), key=lambda kv: -kv[1])[:top]),
        "furthest": sorted(rows, key=lambda r: -gap(r))[:top],
        # Measured time by roofline size: what a sub-microsecond kernel really costs,
        # against the launch floors that bench.roofline assumes.
        "by_size": by_size(kernels, peak, bandwidth, SIZE_EDGES_S,
                           [r["measured_s"] for r in rows]) if bandwidth else [],
    }


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]

    def eff(measured: float, roofline: float | None) -> str:
        return "—" if not roofline or not measured else f"{roofline / measured:.0%}"

    lines = [
        f"### Measured kernels of the train step — {meta['config']['name']} on "
        f"{meta['device']}",
        "",
        f"{meta['date']} · {meta['steps']} profiled steps · {meta['source']} events · "
        f"{report['kernels_seen']}/{report['kernels']} kernels seen · step "
        f"{fmt_ms(report['wall_step_s'])} ms wall, {fmt_ms(report['busy_step_s'])} ms busy, "
        f"roofline {fmt_ms(report['roofline_s'])} ms · "
        f"{fmt_ms(report['unmatched_step_s'])} ms in events of no kernel of the step",
        "",
        "| kernel kind | kernels | measured ms | roofline ms | roofline / measured |",
        "|---|---:|---:|---:|---:|",
    ]
    for a in report["kinds"]:
        lines.append(f"| {a['kind']} | {a['count']} | {fmt_ms(a['measured_s'])} | "
                     f"{fmt_ms(a['roofline_s'])} | {eff(a['measured_s'], a['roofline_s'])} |")
    sizes = report.get("by_size")
    if sizes:
        idle = report["wall_step_s"] - report["busy_step_s"]
        lines += ["", "| kernel roofline time | kernels | seen | measured ms | roofline ms | "
                  "measured µs per seen kernel |", "|---|---:|---:|---:|---:|---:|"]
        for b, span in zip(sizes, size_bin_labels(sizes), strict=True):
            per = f"{b['measured_s'] / b['seen'] * 1e6:.2f}" if b["seen"] else "—"
            lines.append(f"| {span} | {b['count']} | {b['seen']} | {fmt_ms(b['measured_s'])} | "
                         f"{fmt_ms(b['roofline_s'])} | {per} |")
        if report["kernels_seen"]:
            lines.append(f"\nIdle between kernels: {fmt_ms(idle)} ms per step, "
                         f"{idle / report['kernels_seen'] * 1e6:.2f} µs per kernel seen.")
    lines += ["", "| furthest from roofline | kind | MB | GFLOP | measured ms | roofline ms |",
              "|---|---|---:|---:|---:|---:|"]
    for r in report["furthest"]:
        lines.append(f"| {r['name']} | {r['kind']} | {r['bytes'] / 1e6:,.1f} | "
                     f"{r['flops'] / 1e9:,.2f} | {fmt_ms(r['measured_s'])} | "
                     f"{fmt_ms(r['roofline_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="resnet18-b512-bf16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--trace-dir", default=None, help="keep the raw trace here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    for flag in ("warmup", "top"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    try:
        cfg = parse_config(args.config, args.image_size)
    except ValueError as e:
        p.error(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.trace_dir or tmp
        hlo, wall, device = _run_and_trace(cfg, args.steps, args.warmup, trace_dir)
        paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
        if not paths:
            raise SystemExit(f"the profiler wrote no *.xplane.pb under {trace_dir}")
        per_op, source = device_time_per_op(paths[-1], module_name(hlo))
        report = profile_report(parse_kernels(hlo), per_op, args.steps, wall, cfg, device,
                                source, top=args.top)
        if report["kernels_seen"] == 0:
            raise SystemExit(
                f"no traced event was tagged with a kernel of module {module_name(hlo)!r} "
                f"({source} events; modules traced: {sorted(traced_modules(paths[-1]))}; "
                f"untagged kernels: {list(report['unmatched_ops'])[:5]})"
            )
    text = render_markdown(report)
    print(text, end="")
    save_report(report, text, args.json_path, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
