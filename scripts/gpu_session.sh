#!/usr/bin/env bash
# The prepared GPU session (one borrowed H100/H200, minutes of device time):
#   part "bench": bench/gpu_run.sh (Flax vs PyTorch eager vs torch.compile);
#   part "train": time to 94% test accuracy with `train.py --recipe fast` on the CIFAR-10 JPEG
#                 copy, forward/gradient parity on the GPU (true fp32: TF32 off on both sides),
#                 and the side-by-side PyTorch/Flax training run on CUDA.
# Usage from the repo root: OUT=dir bash scripts/gpu_session.sh bench|train|all
# Needs .devcarry/cifar10-jpeg.tar.gz (copied from ../shared/data) for part "train".
set -uo pipefail
OUT="${OUT:-./gpu_out}"
PART="${1:-all}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if [[ $PART == bench || $PART == all ]]; then
  BENCH_BUDGET_S="${BENCH_BUDGET_S:-200}" BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-300}" \
    OUT="$OUT" bash bench/gpu_run.sh
fi

if [[ $PART == train || $PART == all ]]; then
  mkdir -p data && tar xzf .devcarry/cifar10-jpeg.tar.gz -C data
  timeout -k 10 "${TTA_TIMEOUT_S:-330}" "$PY" bench/time_to_accuracy.py \
    --dataset folder:data/cifar10-jpeg --target 0.94 --stop-at-target \
    --workdir /tmp/tta --json "$OUT/tta.json" -- --no-progress --dtype bfloat16 \
    2>&1 | tee "$OUT/tta.log"
  cp /tmp/tta/metrics.jsonl "$OUT/tta_metrics.jsonl" 2>/dev/null
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 10 "${PARITY_TIMEOUT_S:-100}" \
    "$PY" scripts/parity_report.py --depths 18 50 32 --out "$OUT/parity_gpu.md" \
    2>&1 | tail -40
  if [[ -f scripts/train_side_by_side.py ]]; then
    timeout -k 10 "${SBS_TIMEOUT_S:-120}" "$PY" scripts/train_side_by_side.py --device cuda \
      --dataset data/cifar10-jpeg 2>&1 | tee "$OUT/side_by_side.txt"
  fi
fi
