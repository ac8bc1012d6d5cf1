#!/usr/bin/env bash
# One-shot GPU benchmark: flax_resnet vs torch_ref (eager, torch.compile), ~5 minutes.
#
#   OUT=/some/dir bash bench/gpu_run.sh     # from the repository root; OUT defaults to ./bench_out
#
# Writes four files: $OUT/env.txt (GPU, driver, versions), $OUT/bench.log (progress),
# $OUT/bench.json (everything) and $OUT/bench.md (the Markdown table, also printed last);
# two more with the optional time-to-accuracy run at the end.
#
# Configs run most important first, all frameworks of a config back to back: the target
# (ResNet-18, CIFAR stem, bf16, batch 512) with Flax, PyTorch eager, torch.compile and the
# two-pass-BN-variance Flax variant (the product uses one pass for bf16); then the rest of the
# matrix with Flax and PyTorch eager (torch.compile costs ~1 min of compilation per config, so
# only BENCH_COMPILE_CONFIGS get it). --time-budget skips the jobs that would not fit in
# BENCH_BUDGET_S seconds (they show as "skipped (time budget)"); the files are rewritten after
# every job, so even a kill leaves everything finished so far. The whole matrix (12 configs,
# torch.compile on the 6 bf16 ones) needs ~15 min: BENCH_BUDGET_S=900 BENCH_COMPILE_CONFIGS=bf16
# BENCH_TIMEOUT_S=1100.
set -uo pipefail
OUT="${OUT:-./bench_out}"
PY="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET_S:-240}"
COMPILE_CONFIGS="${BENCH_COMPILE_CONFIGS:-resnet18-b512-bf16}"
TIMEOUT="${BENCH_TIMEOUT_S:-480}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  "$PY" - <<'PYEOF' 2>&1 || true
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING", e)
PYEOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"

CONFIGS=resnet18-b512-bf16,resnet50-b512-bf16,resnet32-b128-bf16,resnet18-b128-bf16
CONFIGS+=,resnet18-b512-fp32,resnet50-b512-fp32,resnet32-b512-bf16,resnet50-b128-bf16
CONFIGS+=,resnet32-b128-fp32,resnet18-b128-fp32,resnet50-b128-fp32,resnet32-b512-fp32

timeout -k 10 "$TIMEOUT" "$PY" -m bench \
  --configs "$CONFIGS" \
  --frameworks flax,torch,torch_compile,flax_twopass \
  --only "torch_compile=$COMPILE_CONFIGS" --only flax_twopass=resnet18-b512-bf16,resnet50-b512-bf16 \
  --steps 60 --windows 10 --warmup 10 --min-warmup-s "${BENCH_MIN_WARMUP_S:-1.5}" --tf32 on \
  --time-budget "$BUDGET" --job-timeout 240 \
  --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
echo "bench exit status: $status"

# Optional, off by default (needs the data set on the machine and minutes more):
# BENCH_TTA_DATASET=folder:data/cifar10-jpeg adds a time-to-94% run of train.py --recipe fast
# ($OUT/tta.json, $OUT/tta.log).
if [[ -n "${BENCH_TTA_DATASET:-}" ]]; then
  timeout -k 10 "${BENCH_TTA_TIMEOUT_S:-900}" "$PY" bench/time_to_accuracy.py \
    --dataset "$BENCH_TTA_DATASET" --target "${BENCH_TTA_TARGET:-0.94}" --stop-at-target \
    --workdir "${TMPDIR:-/tmp}/bench_tta_$$" --json "$OUT/tta.json" -- --no-progress \
    2>&1 | tee "$OUT/tta.log"
  echo "time-to-accuracy exit status: ${PIPESTATUS[0]}"
fi
exit "$status"
