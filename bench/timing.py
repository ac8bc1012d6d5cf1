"""The one timing protocol both frameworks run under.

1. compile: wall time of the first step, synchronized (tracing + compilation + autotuning +
   the step itself; for torch eager, cuDNN's benchmark search and lazy initialization).
2. warmup: ``warmup`` more steps, then one synchronization, repeated until at least
   ``min_warmup_s`` seconds have passed: GPU clocks, allocator pools and autotuning caches
   settle over time, not over a step count (the first job of a fresh process otherwise
   shows slow windows).
3. timed: ``steps`` steps in ``windows`` equal windows. The device is synchronized only at
   window boundaries (never per step), so queued steps overlap host dispatch with device work
   exactly as in training. Per-step time of a window = window wall time / steps in it; the
   median, p10 and p90 are over windows, and throughput is total images / total timed time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_protocol(
    step: Callable[[], Any],
    sync: Callable[[Any], None],
    *,
    batch: int,
    steps: int,
    warmup: int,
    windows: int,
    min_warmup_s: float = 0.0,
) -> dict[str, float]:
    """``step()`` runs one training step and returns something ``sync`` can wait on."""
    windows = max(1, min(windows, steps))
    per_window = max(1, steps // windows)
    t0 = time.perf_counter()
    sync(step())
    compile_s = time.perf_counter() - t0

    t_warm = time.perf_counter()
    warmup_steps, chunk = 0, warmup
    while True:
        out = None
        for _ in range(chunk):
            out = step()
        warmup_steps += chunk
        if out is not None:
            sync(out)
        warmup_s = time.perf_counter() - t_warm
        if warmup_s >= min_warmup_s:
            break
        chunk = max(warmup, 1)

    window_s: list[float] = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(per_window):
            out = step()
        sync(out)
        window_s.append(time.perf_counter() - t)
    step_ms = [1e3 * w / per_window for w in window_s]
    total = sum(window_s)
    timed_steps = per_window * windows
    return {
        "compile_s": compile_s,
        "step_ms_median": statistics.median(step_ms),
        "step_ms_p10": percentile(step_ms, 10),
        "step_ms_p90": percentile(step_ms, 90),
        "step_ms_mean": 1e3 * total / timed_steps,
        "images_per_s": batch * timed_steps / total,
        "timed_steps": timed_steps,
        "windows": windows,
        "warmup_steps": warmup_steps,
        "warmup_s": warmup_s,
    }
