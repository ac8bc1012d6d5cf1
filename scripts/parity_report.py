#!/usr/bin/env python
"""PyTorch (torch_ref) vs Flax (flax_resnet) parity report as a Markdown table.

Runs the configurations of ``parity_tests/test_forward_parity.py`` (every depth x norm x
stem, reduced width) through the same harness (``parity_tests/harness.py``): torch_ref
weights go through a file into flax_resnet, and the worst per-tensor relative errors of eval
logits, train logits, BatchNorm running statistics after one step and parameter gradients
are tabulated against the tests' tolerances.

    python scripts/parity_report.py                      # reduced widths, ~2-3 min on 2 CPUs
    python scripts/parity_report.py --full-width --out parity.md
    python scripts/parity_report.py --floor --depths 50 152 --norms bn in

``--floor`` adds PyTorch's own float32-vs-float64 errors on the same configuration: the
conditioning floor that no float32 implementation can beat. At full width a few gradient
checks exceed 1e-4 for float32 reasons, not bugs: InstanceNorm nets are ill-conditioned
(the floor column shows it), and with 8-64x more activations a ReLU input within rounding
of zero becomes likely (see the harness docstring). The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity_tests"))

import flax  # noqa: E402
import harness  # noqa: E402
import jax  # noqa: E402
import torch  # noqa: E402

FULL_WIDTH_HEAVY = 0.5  # 101/152 at full width take minutes each on CPU


def configs(args: argparse.Namespace) -> list[harness.Config]:
    out = []
    for cfg in harness.matrix_configs():
        if cfg.depth not in args.depths or cfg.norm not in args.norms:
            continue
        if cfg.resolved_stem not in args.stems:
            continue
        if args.full_width:
            cifar = cfg.depth in harness.CIFAR_DEPTHS
            width = FULL_WIDTH_HEAVY if cfg.depth in harness.HEAVY_DEPTHS else 1.0
            # 32 groups (the library default) divides 64..2048; He's CIFAR nets have 16.
            groups = 16 if cifar else 32
            cfg = harness.dataclasses.replace(cfg, width=width, norm_groups=groups)
        out.append(cfg)
    return out


def device() -> str:
    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return f"jax {d.platform}:{d.device_kind} ({cpu}, {os.cpu_count()} cpus); torch cpu"


def fmt(err: float, tol: float) -> str:
    mark = "" if err <= tol else " **FAIL**"
    return f"{err:.1e}{mark}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full-width",
        action="store_true",
        help=f"width 1.0 (101/152: {FULL_WIDTH_HEAVY}) instead of the reduced widths",
    )
    parser.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="add PyTorch float32-vs-float64 columns (conditioning floor)",
    )
    parser.add_argument("--depths", type=int, nargs="+", default=list(harness.DEPTHS))
    parser.add_argument("--norms", nargs="+", default=list(harness.NORMS))
    parser.add_argument("--stems", nargs="+", default=list(harness.STEMS))
    args = parser.parse_args(argv)

    lines = [
        "# flax_resnet vs torch_ref parity",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')} · jax {jax.__version__} · "
        f"flax {flax.__version__} · torch {torch.__version__} · {device()}",
        "",
        f"Worst per-tensor relative error max|flax - torch| / max|torch|; tolerances: logits "
        f"{harness.LOGIT_RTOL:g}, running stats {harness.STATS_RTOL:g}, gradients "
        f"{harness.GRAD_RTOL:g}. Input: batch 2, NCHW float32, "
        + ", ".join(f"{s} stem {h}x{w}" for s, (h, w) in harness.DEFAULT_HW.items())
        + " (InstanceNorm: "
        + ", ".join(f"{h}x{w}" for h, w in harness.INSTANCE_NORM_HW.values())
        + ").",
        "",
    ]
    header = (
        "| depth | block | stem | norm | width | eval logits | train logits | running stats "
        "| gradients | worst gradient tensor |"
    )
    rule = "|---:|---|---|---|---:|---:|---:|---:|---:|---|"
    if args.floor:
        header += " floor train | floor stats | floor grads |"
        rule += "---:|---:|---:|"
    header += " s |"
    rule += "---:|"
    lines += [header, rule]
    for line in lines:
        print(line, flush=True)

    failed = count = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs(args):
            r = harness.run_config(cfg, tmp)
            failed += bool(r.failures())
            count += 1
            worst = max(r.grads, key=r.grads.get)
            stats = fmt(r.worst_stats, harness.STATS_RTOL) if r.stats else "–"
            row = (
                f"| {cfg.depth} | {cfg.block} | {cfg.resolved_stem} | {cfg.norm} | "
                f"{cfg.resolved_width:g} | {fmt(r.eval_logits, harness.LOGIT_RTOL)} | "
                f"{fmt(r.train_logits, harness.LOGIT_RTOL)} | {stats} | "
                f"{fmt(r.worst_grad, harness.GRAD_RTOL)} | `{worst}` |"
            )
            if args.floor:
                f = harness.torch_float32_floor(cfg)
                row += (
                    f" {f.train_logits:.1e} | {f.worst_stats:.1e} | {f.worst_grad:.1e} |"
                    if f.stats
                    else f" {f.train_logits:.1e} | – | {f.worst_grad:.1e} |"
                )
            row += f" {r.seconds:.1f} |"
            lines.append(row)
            print(row, flush=True)
    summary = f"\n{count} configurations, {failed} failing, {time.perf_counter() - start:.0f} s."
    lines.append(summary)
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
