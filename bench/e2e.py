"""End-to-end training throughput on a JPEG folder: the protocol both sides share.

    python -m bench.torch_e2e --root DIR [--config resnet50-b256-bf16-in224] [--workers 12]
                              [--steps 400] [--time-limit 60] [--json FILE]
    python -m bench.flax_e2e  (the same flags)
    python -m bench.e2e make-folder --root DIR --images 8000 [--procs 12]
    python -m bench.e2e table flax.json torch.json

Each side trains its ResNet on ``DIR/train/CLASS/*.JPEG`` with its own input pipeline, the
crop and flip on the host (RandomResizedCrop to the config's size), normalisation on the
device, as its users would (bench/torch_e2e.py, bench/flax_e2e.py), and is timed alike:

1. start-up: the loader's iterator made and the first batch received (worker start-up);
2. compile: the first step, synchronized (XLA compilation; cuDNN's benchmark search);
3. warm-up: ``--warmup`` more steps, and at least ``--warmup-s`` seconds, then a sync: the
   batches the workers prefetched while the first step compiled are used up here, so the
   timed steps see the pipeline's steady state, not its buffers;
4. timed: up to ``--steps`` steps, stopping early after ``--time-limit`` seconds, synchronized
   only at the end (the host runs ahead of the device exactly as in training).
   ``images_per_s`` = images / timed seconds; ``data_wait_fraction`` = the seconds the
   training loop spent getting its next batch onto the device's queue (the loader's
   ``next`` and the host-to-device copy's dispatch; ``train.py``'s ``data_wait``) / timed
   seconds. Near 0: the device is the bottleneck; near 1: the input pipeline is.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.configs import BenchConfig, parse_config

DEFAULT_CONFIG = "resnet50-b256-bf16-in224"


def default_workers() -> int:
    """Loader processes: all cores but one, at most 12 (as in the GPU session)."""
    return max(1, min(12, (os.cpu_count() or 2) - 1))


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--root", type=Path, required=True,
                   help="image folder with train/CLASS/*.JPEG (e.g. python -m bench.e2e "
                        "make-folder)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="a bench config with an -in<size> suffix: depth, width, batch, "
                        f"precision and crop size (default {DEFAULT_CONFIG})")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="loader worker processes (default: the cores but one, at most 12)")
    p.add_argument("--steps", type=int, default=400, help="timed steps at most")
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="stop the timed steps after this many seconds")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps after the first")
    p.add_argument("--warmup-s", type=float, default=5.0,
                   help="and keep warming up for at least this long")
    p.add_argument("--recipe", default="fast",
                   help="the TrainConfig recipe both sides take the optimizer, loss and "
                        "schedule from (default fast, as python -m bench; imagenet: "
                        "torchvision's); it changes the step's constants, not its cost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace,
                                                                             BenchConfig]:
    """The arguments and the config; a bad value ends the program (exit 2) naming it."""
    args = p.parse_args(argv)
    try:
        cfg = parse_config(args.config)
    except ValueError as e:
        p.error(str(e))
    from flax_resnet.config import RECIPES

    if args.recipe not in RECIPES:
        p.error(f"--recipe {args.recipe!r}; allowed: {', '.join(RECIPES)}")
    if not cfg.imagenet:
        p.error(f"--config {args.config!r}: end to end runs read images from files; give an "
                "-in<size> config, e.g. resnet50-b256-bf16-in224")
    if not (args.root / "train").is_dir():
        p.error(f"--root {args.root}: no train/ folder there (expected "
                f"{args.root}/train/CLASS/*.JPEG; python -m bench.e2e make-folder makes one)")
    for name, least in (("workers", 0), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name} {getattr(args, name)} must be >= {least}")
    if args.time_limit <= 0 or args.warmup_s < 0:
        p.error("--time-limit must be > 0 and --warmup-s >= 0")
    return args, cfg


def timed_run(next_batch: Callable[[], Any], step: Callable[[Any], Any],
              sync: Callable[[Any], None], *, batch: int, warmup: int, warmup_s: float,
              steps: int, time_limit: float) -> dict[str, Any]:
    """The protocol of the module's doc. ``next_batch()`` returns a batch on its way to the
    device (the loader's ``next`` and the copy's dispatch), ``step(batch)`` runs one
    training step and returns something ``sync`` can wait on."""
    t0 = time.perf_counter()
    first = next_batch()
    startup_s = time.perf_counter() - t0

    t = time.perf_counter()
    sync(step(first))
    compile_s = time.perf_counter() - t
    del first

    t_warm = time.perf_counter()
    done, out = 0, None
    while done < warmup or time.perf_counter() - t_warm < warmup_s:
        out = step(next_batch())
        done += 1
    if out is not None:
        sync(out)
    warmup_s_taken = time.perf_counter() - t_warm

    wait, n = 0.0, 0
    t_start = time.perf_counter()
    marks = [(t_start, 0)]
    while n < steps:
        t = time.perf_counter()
        b = next_batch()
        now = time.perf_counter()
        wait += now - t
        out = step(b)
        n += 1
        if now - t_start >= time_limit:
            break
        if now - marks[-1][0] >= 5.0:
            marks.append((now, n))
    sync(out)
    total = time.perf_counter() - t_start
    # Host-side rates of ~5 s intervals (no sync inside): the run's steadiness, not its rate.
    intervals = [batch * (n1 - n0) / (t1 - t0_) for (t0_, n0), (t1, n1) in
                 zip(marks, marks[1:], strict=False) if t1 > t0_]
    return {
        "startup_s": startup_s, "compile_s": compile_s,
        "warmup_steps": done, "warmup_s": warmup_s_taken,
        "timed_steps": n, "timed_s": total,
        "images_per_s": n * batch / total,
        "step_ms_mean": 1e3 * total / n,
        "data_wait_s": wait, "data_wait_fraction": wait / total,
        "interval_images_per_s": intervals,
        "stopped_by": "steps" if n >= steps else "time_limit",
    }


def finish(result: dict[str, Any], args: argparse.Namespace, cfg: BenchConfig) -> int:
    """Completes, prints and writes one side's result."""
    result = {
        "config": cfg.name, "recipe": args.recipe, "root": str(args.root),
        "workers": args.workers,
        "batch": cfg.batch, "image_size": cfg.image_size, "precision": cfg.precision,
        "steps_asked": args.steps, "time_limit_s": args.time_limit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **result,
    }
    print(f"[e2e] {result['framework']} {cfg.name} on {result['train_images']} images, "
          f"{args.workers} workers: {result['images_per_s']:,.0f} img/s, data wait "
          f"{100 * result['data_wait_fraction']:.0f}%, {result['timed_steps']} steps in "
          f"{result['timed_s']:.1f} s (start-up {result['startup_s']:.1f} s, first step "
          f"{result['compile_s']:.1f} s)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


# --------------------------------------------------------------------------- the folder

def _shard(args: tuple[Path, int, int]) -> Path:
    from bench.input_pipeline import make_folder

    root, n, seed = args
    return make_folder(root, n, seed=seed)


def make_folder_parallel(root: Path, n: int, procs: int | None = None) -> Path:
    """``bench.input_pipeline.make_folder(root, n)``'s kind of folder (ImageNet-like JPEGs in
    ``train/cNN`` and a small ``val``), made by ``procs`` processes, each its own seeded share,
    then moved together; reused when complete (``.complete``, as make_folder marks it)."""
    root = Path(root)
    if (root / ".complete").exists():
        return root
    procs = max(1, min(procs or (os.cpu_count() or 1), n))
    parts = root.with_name(root.name + ".parts")
    shutil.rmtree(parts, ignore_errors=True)
    shares = [n // procs + (k < n % procs) for k in range(procs)]
    jobs = [(parts / f"p{k:02d}", share, 1000 + k) for k, share in enumerate(shares) if share]
    # spawn: the caller may hold JAX's or torch's threads, which a fork could deadlock
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        made = list(pool.map(_shard, jobs))
    for k, part in enumerate(made):
        for split in ("train", "val") if k == 0 else ("train",):
            for src in sorted((part / split).glob("*/*")):
                dst = root / split / src.parent.name / f"p{k:02d}-{src.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    shutil.rmtree(parts, ignore_errors=True)
    (root / ".complete").touch()
    return root


def render(results: list[dict[str, Any]]) -> str:
    """A Markdown table of side results (``--json`` files), the first row the reference."""
    lines = ["| framework | config | images | workers | images/s | data wait | timed steps "
             "(s) | start-up s | first step s | vs first |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = r["images_per_s"] / results[0]["images_per_s"]
        lines.append(f"| {r['framework']} | {r['config']} | {r['train_images']:,} | "
                     f"{r['workers']} | {r['images_per_s']:,.0f} | "
                     f"{100 * r['data_wait_fraction']:.0f}% | {r['timed_steps']} "
                     f"({r['timed_s']:.1f}) | {r['startup_s']:.1f} | {r['compile_s']:.1f} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-folder", help="generate a folder of ImageNet-like JPEGs")
    mk.add_argument("--root", type=Path, required=True)
    mk.add_argument("--images", type=int, required=True)
    mk.add_argument("--procs", type=int, default=None, help="default: every core")
    tb = sub.add_parser("table", help="a Markdown table of --json results")
    tb.add_argument("files", type=Path, nargs="+")
    tb.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cmd == "make-folder":
        if args.images < 1:
            p.error(f"--images {args.images} must be >= 1")
        t = time.perf_counter()
        reused = (args.root / ".complete").exists()
        make_folder_parallel(args.root, args.images, args.procs)
        how = "reused" if reused else f"made in {time.perf_counter() - t:.1f} s"
        print(f"[e2e] {args.root}: {args.images} training images ({how})", flush=True)
        return 0
    results = []
    for path in args.files:
        if not path.exists():
            print(f"[e2e] no result {path} (that side failed or was skipped)", file=sys.stderr)
            continue
        results.append(json.loads(path.read_text()))
    if not results:
        return 1
    table = render(results)
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
