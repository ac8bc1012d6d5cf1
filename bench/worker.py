"""A benchmark worker: one process per framework family, jobs as JSON lines on stdin.

``python -m bench.worker flax|torch``. Each framework gets its own process so that JAX and
PyTorch never share a CUDA context or allocator (JAX's preallocation is switched off in the
Flax worker by the orchestrator) and a crash or hang kills one family, not the run. Results go
to the original stdout as one JSON line per job; everything else printed (by libraries too)
is sent to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

FAMILIES = {"flax": ("flax", "flax_twopass"), "torch": ("torch", "torch_compile")}


def _run(job: dict) -> dict:
    from bench.configs import parse_config

    cmd = job.get("cmd", "run")
    family = job["family"]
    if cmd == "env":
        if family == "flax":
            from bench.flax_side import environment
        else:
            from bench.torch_side import environment
        return {"ok": True, "env": environment()}
    cfg = parse_config(job["config"], job.get("image_size", 32))
    common = dict(
        steps=job["steps"],
        warmup=job["warmup"],
        min_warmup_s=job.get("min_warmup_s", 0.0),
        windows=job["windows"],
        tf32=job["tf32"],
        steps_per_epoch=job["steps_per_epoch"],
        seed=job.get("seed", 0),
    )
    train_cfg = job["train_config"]
    fw = job["framework"]
    if fw in ("flax", "flax_twopass"):
        from bench.flax_side import run_job

        bn = "twopass" if fw == "flax_twopass" else "auto"
        return {"ok": True, "result": run_job(cfg, train_cfg, bn_variance=bn, **common)}
    if fw in ("torch", "torch_compile"):
        from bench.torch_side import run_job

        result = run_job(cfg, train_cfg, compile=fw == "torch_compile",
                         compile_mode=job.get("compile_mode", "default"), **common)
        return {"ok": True, "result": result}
    raise ValueError(f"unknown framework {fw!r}")


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout (libraries, C code) goes to stderr
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = _run(json.loads(line))
        except Exception as e:  # noqa: BLE001 - report every failure to the orchestrator
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
