"""Training-step throughput of flax_resnet against torch_ref (eager and torch.compile).

    python -m bench [--configs all|bf16|fp32|target|cpu|tiny|imagenet|NAME,...]
                    [--frameworks flax,torch,torch_compile[,flax_twopass]]
                    [--steps N] [--warmup N] [--windows N] [--tf32 on|off]
                    [--torch-compile-mode default|max-autotune|...]
                    [--peak-tflops X] [--json FILE] [--markdown FILE]
                    [--input-pipeline WORKERS [--input-images N,...]]

Config names are ``resnet{depth}[w{width}]-b{batch}-{fp32|bf16}`` (CIFAR stem, BatchNorm,
32x32, 10 classes, pad-crop-flip on the device) or, with an ``-in{size}`` suffix, ImageNet's
step (ImageNet stem, size x size, 1000 classes; the crop is the host pipeline's, so the step
normalises only, on both sides; bench/configs.py). Each framework family runs in its own
worker process (bench/worker.py);
the jobs run one at a time, config by config, so they never share the device. The timing
protocol is in bench/timing.py, the FLOP count in bench/flops.py.

``--input-pipeline 1,2,4`` adds, after the steps, the input pipeline of bench/input_pipeline.py
(the 224 px training transform from JPEG files: flax_resnet's streamed pipeline against
``DataLoader`` + torchvision with the same worker counts, and the peak memory for each folder
size), in the same report.

MFU = (analytic FLOPs per image of a training step, convs + fc, 3x forward) x images/s /
the device's dense datasheet peak for the compute class (bf16; TF32 for fp32 with --tf32 on;
plain fp32 with --tf32 off). XLA's own count of the compiled step (cost_analysis) is recorded
too, as ``flops_xla_per_step``. On CPU the MFU is n/a unless ``--peak-tflops`` is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.configs import PRESETS, BenchConfig, parse_configs  # noqa: E402
from bench.report import render_markdown  # noqa: E402
from bench.torch_side import COMPILE_MODES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("flax", "flax_twopass", "torch", "torch_compile")
# Guessed job lengths (s) for --time-budget before one job of the framework has run.
DEFAULT_JOB_S = {"flax": 30.0, "flax_twopass": 30.0, "torch": 15.0, "torch_compile": 90.0}
FAMILY = {"flax": "flax", "flax_twopass": "flax", "torch": "torch", "torch_compile": "torch"}


class Worker:
    """A bench.worker subprocess for one framework family, restarted if it dies."""

    def __init__(self, family: str, env: dict[str, str]):
        self.family = family
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> None:
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.family == "flax":
            # Allocate on demand: no 75% grab, and the allocator peak means something.
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        else:
            # OpenMP threads that spin while waiting make torch's CPU ops 5x slower as soon as
            # another process shares the cores (measured here: 2.2 s vs 0.4 s a step on 2
            # busy cores); passive waiting costs nothing measurable. GPU runs barely use it.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Its own process group (same session), so that killing it on a timeout also kills
        # torch.compile's compile workers.
        group: dict[str, Any] = (
            {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **group,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def send(self, job: dict) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({**job, "family": self.family}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # receive() reports the dead worker

    def request(self, job: dict, timeout: float) -> dict:
        self.send(job)
        return self.receive(timeout)

    def receive(self, timeout: float) -> dict:
        assert self.proc is not None
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return {"ok": False, "error": f"timed out after {timeout:.0f} s (worker killed)"}
        if line is None:
            code = self.proc.wait()
            self.proc = None
            return {"ok": False, "error": f"worker exited with code {code}"}
        return json.loads(line)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--configs", default="auto",
                   help="comma-separated names or presets "
                        f"({', '.join(PRESETS)}); auto = all on GPU, cpu otherwise")
    p.add_argument("--frameworks", default="flax,torch,torch_compile",
                   help=f"comma-separated subset of {', '.join(FRAMEWORKS)}")
    p.add_argument("--only", action="append", default=[], metavar="FRAMEWORK=CONFIGS",
                   help="run FRAMEWORK only on these configs (names/presets), e.g. "
                        "torch_compile=bf16 or flax_twopass=target; repeatable")
    p.add_argument("--steps", type=int, default=50, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    p.add_argument("--min-warmup-s", type=float, default=2.0,
                   help="keep warming up (in chunks of --warmup steps) for at least this long")
    p.add_argument("--windows", type=int, default=10,
                   help="timed steps are split into this many synchronized windows")
    p.add_argument("--recipe", default="fast",
                   help="flax_resnet.training recipe the step is built from (default fast)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of every job, alternating frameworks; the best round (highest "
                        "images/s) is reported, all rounds' images/s are kept (for noisy, "
                        "shared machines)")
    p.add_argument("--optimizer", choices=("sgd", "adamw", "adam"), default=None,
                   help="override the recipe's optimizer (adamw/adam: lr 1e-3)")
    p.add_argument("--tf32", choices=("on", "off"), default="on",
                   help="fp32 convs/matmuls may use TF32 (JAX's GPU default) on both sides")
    p.add_argument("--torch-compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode for torch_compile jobs; max-autotune benchmarks "
                        "Triton and cuBLAS kernels for every op: minutes more compilation")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="override the device peak used for MFU (TFLOP/s)")
    p.add_argument("--image-size", type=int, default=32,
                   help="image size of the CIFAR-stem configs (an -in<size> config names its "
                        "own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: a job is skipped (and recorded so) when "
                        "the time left is under the longest earlier job of its framework "
                        "(or a guess: flax 30, torch 15, torch_compile 90)")
    p.add_argument("--job-timeout", type=float, default=600.0,
                   help="seconds per job before its worker is killed")
    p.add_argument("--allow-mixed-devices", action="store_true",
                   help="run even if JAX and torch are not both on the GPU (or both on CPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the jobs (config, framework) and FLOP counts, run nothing")
    p.add_argument("--input-pipeline", default="", metavar="WORKERS",
                   help="also benchmark the input pipeline with these worker counts (comma "
                        "list, e.g. 1,2,4) against DataLoader")
    p.add_argument("--input-images", default="2000,8000", metavar="N,...",
                   help="with --input-pipeline: images per generated JPEG folder, one folder "
                        "each (two sizes show the memory)")
    p.add_argument("--input-size", type=int, default=224, help="with --input-pipeline: the "
                   "RandomResizedCrop size")
    p.add_argument("--input-batch-size", type=int, default=64)
    p.add_argument("--input-batches", type=int, default=30, help="timed batches per "
                   "input-pipeline measurement")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    bad = [f for f in _csv(args.frameworks) if f not in FRAMEWORKS]
    if bad:
        p.error(f"unknown framework(s) {bad}; allowed: {', '.join(FRAMEWORKS)}")
    only: dict[str, str] = {}
    for item in args.only:
        fw, sep, spec = item.partition("=")
        if not sep or fw not in FRAMEWORKS or not spec:
            p.error(f"--only {item!r}: expected FRAMEWORK=CONFIGS with FRAMEWORK in "
                    f"{', '.join(FRAMEWORKS)}")
        only[fw] = spec
    args.only = only
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.steps < 1 or args.warmup < 0 or args.windows < 1:
        p.error("--steps and --windows must be >= 1, --warmup >= 0")
    return args


def train_config(cfg: BenchConfig, recipe: str, optimizer: str | None) -> dict[str, Any]:
    """The TrainConfig (as a dict) both sides build their step from: the recipe with the
    bench config's depth, width, stem, classes, batch and dtype; an ``-in`` config's augment
    is the host's random-resized-crop (the step normalises only) at its image size."""
    from flax_resnet.config import make_config

    overrides: dict[str, Any] = {
        "depth": cfg.depth, "width": cfg.width, "stem": cfg.stem, "batch_size": cfg.batch,
        "num_classes": cfg.num_classes, "dtype": cfg.dtype,
    }
    if cfg.imagenet:
        overrides.update(augment="random-resized-crop", image_size=cfg.image_size)
    if optimizer is not None:
        overrides["optimizer"] = optimizer
        if optimizer != "sgd":
            overrides.update(lr=1e-3, nesterov=False)
    return make_config(recipe, **overrides).to_dict()


def _flops_entry(cfg: BenchConfig) -> dict[str, Any]:
    from bench.flops import resnet_flops

    f = resnet_flops(
        cfg.depth, stem=cfg.stem, width=cfg.width, num_classes=cfg.num_classes,
        image_size=cfg.image_size,
    )
    return {
        "forward_per_image": f.forward_per_image,
        "train_per_image": f.train_per_image,
        "train_per_step": f.train_per_image * cfg.batch,
        "method": "analytic: convs + fc, 2 FLOPs/MAC, training step = 3x forward",
    }


def _notes(args: argparse.Namespace, meta: dict[str, Any],
           configs: list[BenchConfig] | None = None) -> list[str]:
    notes = [
        f"Flax: the product's step, flax_resnet.training.make_train_step, for the "
        f"'{args.recipe}' recipe at each config's depth/width/batch/dtype (CIFAR stem, "
        "BatchNorm; optimizer "
        f"{meta['optimizer']}). PyTorch: torch_ref with the same config through "
        "torch_ref.training's param groups, criterion (label smoothing) and per-batch "
        "scheduler. Input: a synthetic uint8 NHWC batch already on the device; every step "
        "does crop+flip augmentation and normalization on the device (Flax: flax_resnet.data "
        "inside the step; torch: the same algorithm in torch ops), then forward, "
        "cross-entropy, backward, optimizer update and BatchNorm running-stat update.",
        "bf16: Flax create_resnet(dtype=bfloat16) with float32 params and float32 BN "
        "statistics; torch autocast(bfloat16) with float32 params. PyTorch: channels_last, "
        "cudnn.benchmark, fused optimizer; torch.compile mode default, dynamic=False, compiling "
        "augment+forward+loss (backward via AOTAutograd).",
        f"fp32 with TF32 {args.tf32}: "
        + ("JAX's default GPU precision (TF32 for fp32 convs/matmuls) and torch "
           "cudnn/matmul TF32 allowed" if args.tf32 == "on" else
           "jax_default_matmul_precision=highest and torch TF32 disabled")
        + "; MFU for fp32 is against the "
        + ("TF32 tensor-core" if args.tf32 == "on" else "plain fp32") + " peak.",
        "Timing: first step (synchronized) = compile s (cold: no JAX persistent cache, empty "
        "Inductor/Triton caches); then warmup; then timed steps in "
        "windows synchronized only at their ends (jax.block_until_ready on the last step's "
        "outputs / torch.cuda.synchronize); step ms = window time / steps, median and p10–p90 "
        "over windows; images/s = images / total timed time.",
        "FLOPs: analytic (convs + fc, 2 FLOPs per MAC, training step = 3x forward); "
        f"peak {meta['peak_source']}. Peak memory: Flax = XLA buffer assignment of the compiled "
        "step (arguments + outputs − donated aliases + temporaries); torch = "
        "torch.cuda.max_memory_allocated.",
        "Process setup: one worker process per framework family, jobs run one at a time; "
        "JAX with XLA_PYTHON_CLIENT_PREALLOCATE=false, torch with OMP_WAIT_POLICY=PASSIVE "
        "(both unless set by the caller; the latter matters only for CPU ops)."
        + (f" XLA_FLAGS={meta['xla_flags']!r}." if meta.get("xla_flags") else ""),
    ]
    imagenet = [c.name for c in configs or () if c.imagenet]
    if imagenet:
        notes.append(
            f"ImageNet steps ({', '.join(imagenet)}): ImageNet stem (7x7/2 conv + max-pool), "
            "1000 classes, ImageNet mean/std; the input batch is already cropped (the host "
            "pipeline's RandomResizedCrop + flip in training), so these steps do no crop or "
            "flip on the device, only the normalization, on both sides (Flax: augment "
            "random-resized-crop in the config; torch: normalize + channels_last).")
    if args.torch_compile_mode != "default":
        notes.append(f"torch.compile mode {args.torch_compile_mode} (not the default).")
    return notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results (also written with --json / --markdown)."""
    args = parse_args(argv)
    # The workers get the caller's environment. This process only counts FLOPs and builds
    # configs (importing JAX through flax_resnet): keep it off the GPU, no preallocation.
    worker_env = dict(os.environ)
    # Compile times are cold-start times: torch.compile gets empty Inductor/Triton caches for
    # this run (JAX has no persistent cache unless one is configured).
    cache_dir = tempfile.mkdtemp(prefix="bench-compile-cache-")
    worker_env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))
    worker_env.setdefault("TRITON_CACHE_DIR", os.path.join(cache_dir, "triton"))
    saved = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        return _main(args, worker_env)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        if saved is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = saved


def _main(args: argparse.Namespace, worker_env: dict[str, str]) -> dict[str, Any]:
    from bench.flops import compute_class, lookup_peak_tflops

    t_start = time.monotonic()
    frameworks = _csv(args.frameworks)
    if args.dry_run:
        return _dry_run(args, frameworks)
    families = sorted({FAMILY[f] for f in frameworks}, key=["flax", "torch"].index)
    workers = {fam: Worker(fam, worker_env) for fam in families}
    env: dict[str, dict[str, Any]] = {}
    finished = False

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"[bench] terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        for w in workers.values():  # start the workers in parallel
            w.send({"cmd": "env"})
        for fam, w in workers.items():
            reply = w.receive(timeout=args.job_timeout)
            if not reply.get("ok"):
                raise SystemExit(f"{fam} worker failed to start: {reply.get('error')}")
            env[fam] = reply["env"]
        gpu = {}
        if "flax" in env:
            gpu["flax"] = env["flax"].get("backend") == "gpu"
        if "torch" in env:
            gpu["torch"] = env["torch"].get("device_kind", "cpu") != "cpu"
        if len(set(gpu.values())) > 1 and not args.allow_mixed_devices:
            raise SystemExit(
                f"the frameworks run on different devices ({gpu}; JAX: "
                f"{env['flax'].get('device_kind')}, torch: {env['torch'].get('device_kind')}): "
                "is JAX's CUDA plugin or torch's CUDA build missing? (--allow-mixed-devices "
                "to run anyway)"
            )
        on_gpu = any(gpu.values())
        if gpu.get("torch"):
            device = env["torch"]["device_kind"]
        elif gpu.get("flax"):
            device = env["flax"]["device_kind"]
        else:
            device = "cpu"
        spec = args.configs if args.configs != "auto" else ("all" if on_gpu else "cpu")
        configs = parse_configs(spec, args.image_size)
        only = {
            fw: {c.name for c in parse_configs(spec, args.image_size)}
            for fw, spec in args.only.items()
        }
        tf32 = args.tf32 == "on"
        if args.peak_tflops is not None:
            peak_source = f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
        elif on_gpu:
            peak_source = "datasheet dense peak of the device (bench/flops.py)"
        else:
            peak_source = "n/a on CPU (give --peak-tflops)"
        meta: dict[str, Any] = {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device if on_gpu else f"CPU ({os.cpu_count()} cores)",
            "on_gpu": on_gpu,
            "loadavg_start": _loadavg(),
            "steps": args.steps, "warmup": args.warmup, "windows": args.windows,
            "min_warmup_s": args.min_warmup_s,
            "repeats": args.repeats, "recipe": args.recipe,
            "optimizer": train_config(configs[0], args.recipe, args.optimizer)["optimizer"],
            "tf32": args.tf32, "image_size": args.image_size,
            "frameworks": frameworks, "peak_source": peak_source,
            "args": {k: v for k, v in vars(args).items()},
            "env": env,
        }
        for fam_env in env.values():
            for k in ("jax", "flax", "torch", "backend", "cuda", "cudnn", "python", "xla_flags"):
                if k in fam_env:
                    meta.setdefault(k, fam_env[k])
        meta["notes"] = _notes(args, meta, configs)
        results: list[dict[str, Any]] = []
        expected_s: dict[str, float] = {}  # longest job so far per framework (budgeting)
        run = {"meta": meta, "results": results}
        for cfg in configs:
            flops = _flops_entry(cfg)
            if args.peak_tflops is not None:
                peak = args.peak_tflops
            else:
                peak = lookup_peak_tflops(device, cfg.precision, tf32) if on_gpu else None
            tcfg = train_config(cfg, args.recipe, args.optimizer)
            entry: dict[str, Any] = {
                "config": cfg.to_dict(), "train_config": tcfg, "flops": flops,
                "peak_tflops": peak,
                "compute_class": compute_class(cfg.precision, tf32), "frameworks": {},
            }
            results.append(entry)
            for rnd in range(args.repeats):
                for fw in frameworks:
                    if fw in only and cfg.name not in only[fw]:
                        continue
                    prev = entry["frameworks"].get(fw)
                    if rnd > 0 and not (prev and prev.get("ok")):
                        continue  # failed or skipped in an earlier round
                    if args.time_budget is not None:
                        left = args.time_budget - (time.monotonic() - t_start)
                        if left < expected_s.get(fw, DEFAULT_JOB_S[fw]):
                            if prev is None:
                                entry["frameworks"][fw] = {
                                    "ok": False, "skipped": "skipped (time budget)"
                                }
                            continue
                    r = _run_job(workers[FAMILY[fw]], fw, cfg, tcfg, flops, peak, args)
                    expected_s[fw] = max(expected_s.get(fw, 0.0), r["job_wall_s"])
                    entry["frameworks"][fw] = _best_of(prev, r)
                    _write(run, args)  # partial results survive a later crash or timeout
        if args.input_pipeline:
            from bench.input_pipeline import run_input_benchmark

            run["input_pipeline"] = run_input_benchmark(
                [int(n) for n in _csv(args.input_images)],
                [int(w) for w in _csv(args.input_pipeline)], args.input_batch_size,
                args.input_size, args.input_batches,
                command=f"python -m bench --input-pipeline {args.input_pipeline} "
                        f"--input-images {args.input_images} --input-size {args.input_size} "
                        f"--input-batch-size {args.input_batch_size} "
                        f"--input-batches {args.input_batches}")
            if run["input_pipeline"] is None:
                raise SystemExit("[bench] the input pipeline benchmark failed (above)")
            _write(run, args)
        meta["total_wall_s"] = time.monotonic() - t_start
        meta["loadavg_end"] = _loadavg()
        finished = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for w in workers.values():
            w.close() if finished else w.kill()
    _write(run, args)
    print(render_markdown(run))
    return run


def _run_job(
    worker: Worker, fw: str, cfg: BenchConfig, tcfg: dict[str, Any], flops: dict[str, Any],
    peak: float | None, args: argparse.Namespace,
) -> dict[str, Any]:
    print(f"[bench] {cfg.name} {fw} ...", file=sys.stderr, flush=True)
    job = {
        "framework": fw, "config": cfg.name, "image_size": cfg.image_size,
        "steps": args.steps, "warmup": args.warmup, "windows": args.windows,
        "min_warmup_s": args.min_warmup_s, "tf32": args.tf32 == "on", "seed": args.seed,
        "train_config": tcfg,
        "steps_per_epoch": max(1, cfg.train_images // cfg.batch),
    }
    if fw == "torch_compile":
        job["compile_mode"] = args.torch_compile_mode
    t = time.monotonic()
    reply = worker.request(job, timeout=args.job_timeout)
    r = {"ok": reply.get("ok", False), **reply.get("result", {})}
    if not r["ok"]:
        r["error"] = reply.get("error", "failed")
    else:
        achieved = flops["train_per_image"] * r["images_per_s"] / 1e12
        r["achieved_tflops"] = achieved
        r["mfu"] = achieved / peak if peak else None
    r["job_wall_s"] = time.monotonic() - t
    msg = (
        f"{r['images_per_s']:,.0f} img/s, {r['step_ms_median']:.2f} ms/step, "
        f"compile {r['compile_s']:.1f} s" if r["ok"] else r["error"]
    )
    print(f"[bench] {cfg.name} {fw}: {msg}", file=sys.stderr, flush=True)
    return r


def _best_of(prev: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Keep the round with the highest throughput; the first round's (cold) compile time;
    every round's throughput under ``rounds_images_per_s``."""
    if prev is None or not prev.get("ok"):
        if new.get("ok"):
            new["rounds_images_per_s"] = [new["images_per_s"]]
        return new
    if not new.get("ok"):
        prev.setdefault("failed_rounds", []).append(new.get("error"))
        return prev
    rounds = prev["rounds_images_per_s"] + [new["images_per_s"]]
    best = new if new["images_per_s"] > prev["images_per_s"] else prev
    best = {**best, "compile_s": prev["compile_s"], "rounds_images_per_s": rounds}
    return best


def _dry_run(args: argparse.Namespace, frameworks: list[str]) -> dict[str, Any]:
    spec = "all" if args.configs == "auto" else args.configs
    only = {fw: {c.name for c in parse_configs(v, args.image_size)} for fw, v in args.only.items()}
    plan = []
    for cfg in parse_configs(spec, args.image_size):
        f = _flops_entry(cfg)
        tc = train_config(cfg, args.recipe, args.optimizer)
        fws = [fw for fw in frameworks if fw not in only or cfg.name in only[fw]]
        plan.append({"config": cfg.name, "frameworks": fws, "flops": f})
        print(f"{cfg.name:24s} {f['train_per_step'] / 1e12:8.3f} TFLOP/step  "
              f"{tc['optimizer']} lr {tc['lr']} dtype {tc['dtype']}  -> {', '.join(fws)}")
    return {"plan": plan}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _write(run: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(run, indent=2, default=str))
        os.replace(tmp, path)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(run))


if __name__ == "__main__":
    main()
