#!/usr/bin/env python
"""PyTorch (torch_ref) vs Flax (flax_resnet) parity report as a Markdown table.

Runs the configurations of ``parity_tests/test_forward_parity.py``'s matrix (every depth x
norm x stem, reduced width) through the same harness (``parity_tests/harness.py``): torch_ref
weights go through a file into flax_resnet, in float32 and float64, and every tensor (eval
and train logits, BatchNorm running statistics after one step, every parameter gradient) is
judged as the tests judge it:

* float64: flax64 vs torch64, the worst relative error over the tensors (bar ``F64_RTOL``);
* float32: flax32 vs torch64 beside torch32 vs torch64 (PyTorch's own float32 error), the
  worst ratio of the two over the tensors above the floor (bar ``F32_K``), and how many ReLU
  decisions were re-decided because a float32 ReLU input fell on the other side of zero;
* for information, the earlier absolute flax32-vs-torch32 figures (logits, gradients).

    python scripts/parity_report.py                       # reduced widths, ~3-5 min on 2 CPUs
    python scripts/parity_report.py --out docs/parity.md  # the table docs/parity.md shows
    python scripts/parity_report.py --full-width --depths 50 110 --norms bn in

The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import flax
import jax
import torch

from parity_tests import harness

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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> str:
    d = jax.devices()[0]
    return (f"jax {d.platform}:{d.device_kind}; torch cpu, {torch.get_num_threads()} threads "
            f"(the harness uses 1); {cpu_model()} ({platform.machine()}, {os.cpu_count()} cpus)")


def worst(errors: dict[str, float], prefix: str = "") -> float:
    return max((v for k, v in errors.items() if k.startswith(prefix)), default=0.0)


def row(cfg: harness.Config, r: harness.ParityResult) -> tuple[str, dict[str, float]]:
    f64, f64_key = r.worst_f64
    flax_key = max(r.flax32, key=r.flax32.get)
    ratio, ratio_key = r.worst_ratio
    flips = f"{r.relu_flips.get('flax', 0)} / {r.relu_flips.get('torch', 0)}"
    mark = " **FAIL**" if r.failures() else ""
    cells = [
        str(cfg.depth), cfg.block, cfg.resolved_stem, cfg.norm, f"{cfg.resolved_width:g}",
        f"{f64:.1e}", f"`{f64_key}`",
        f"{r.flax32[flax_key]:.1e}", f"{r.torch32[flax_key]:.1e}", f"`{flax_key}`",
        f"{ratio:.2f}" if ratio_key != "–" else "–", flips,
        f"{worst(r.abs32, 'logits/'):.1e}", f"{worst(r.abs32, 'grad/'):.1e}",
        f"{r.seconds:.1f}{mark}",
    ]
    needed = max(((v - harness.F32_FLOOR) / r.torch32[k] for k, v in r.flax32.items()
                   if r.torch32[k] > 0), default=0.0)
    figures = {
        "float64": f64, "flax32": r.flax32[flax_key], "torch32": worst(r.torch32),
        "ratio": ratio, "K needed": needed, "abs32 logits": worst(r.abs32, "logits/"),
        "abs32 grads": worst(r.abs32, "grad/"),
        "flips": r.relu_flips.get("flax", 0) + r.relu_flips.get("torch", 0),
    }
    return "| " + " | ".join(cells) + " |", figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full-width",
        action="store_true",
        help=f"width 1.0 (101/152: {FULL_WIDTH_HEAVY}) instead of the reduced widths",
    )
    parser.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    parser.add_argument("--depths", type=int, nargs="+", default=list(harness.DEPTHS))
    parser.add_argument("--norms", nargs="+", default=list(harness.NORMS))
    parser.add_argument("--stems", nargs="+", default=list(harness.STEMS))
    args = parser.parse_args(argv)

    command = "python scripts/parity_report.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    lines = [
        "# flax_resnet vs torch_ref parity, per configuration",
        "",
        f"`{command.strip()}` · {datetime.date.today().isoformat()} · "
        f"python {platform.python_version()} · jax {jax.__version__} · flax {flax.__version__} "
        f"· torch {torch.__version__} · {device()}",
        "",
        "Per tensor: relative error max|x - ref| / max|ref|; each column is the worst over "
        "the configuration's tensors. float64: eval and train logits, running statistics "
        "after one train step and every parameter gradient of the whole step. float32: the "
        "logits and running statistics of the whole step, and unit by unit (stem, blocks, "
        "pooled classifier; each float32 unit fed the float64 unit's input and output "
        "gradient) every unit output, unit input gradient and parameter gradient. "
        "Bars: float64 flax64 vs torch64 <= "
        f"{harness.F64_RTOL:g}; float32 flax32 vs torch64 <= {harness.F32_K:g} x (torch32 vs "
        f"torch64) + {harness.F32_FLOOR:g}. *ratio*: the largest flax32/torch32 error ratio "
        f"over the tensors whose error is above {harness.F32_FLOOR:g}. *ReLU re-decided*: "
        "elements where flax32 / torch32 put a ReLU input on the other side of zero than "
        "float64 did, re-decided in the float64 reference for their gradients. *abs32*: "
        f"flax32 vs torch32 (information; the old bars were {harness.LOGIT_RTOL:g} for "
        f"logits, {harness.GRAD_RTOL:g} for gradients). Input: batch 2, "
        + ", ".join(f"{s} stem {h}x{w}" for s, (h, w) in harness.DEFAULT_HW.items())
        + ".",
        "",
        "| depth | block | stem | norm | width | float64 | worst float64 tensor | flax32 "
        "| torch32 | worst float32 tensor | ratio | ReLU re-decided | abs32 logits "
        "| abs32 grads | s |",
        "|---:|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for line in lines:
        print(line, flush=True)

    failed = count = 0
    totals: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs(args):
            r = harness.run_config(cfg, tmp)
            failed += bool(r.failures())
            count += 1
            text, figures = row(cfg, r)
            for k, v in figures.items():
                totals[k] = totals.get(k, 0.0) + v if k == "flips" else max(totals.get(k, 0), v)
            lines.append(text)
            print(text, flush=True)
    summary = [
        "",
        f"{count} configurations, {failed} failing, {time.perf_counter() - start:.0f} s. Worst "
        "per column: " + ", ".join(
            f"{k} {v:.0f}" if k == "flips" else f"{k} {v:.1e}" for k, v in totals.items()
        ) + " (flips: total ReLU elements re-decided; K needed: the largest "
        f"(flax32 - {harness.F32_FLOOR:g}) / torch32 over all tensors, against the bar "
        f"{harness.F32_K:g}).",
    ]
    lines += summary
    print("\n".join(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
