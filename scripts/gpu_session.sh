#!/usr/bin/env bash
# The prepared GPU session: one borrowed H100/H200, one command of about 9 minutes.
#
#   OUT=dir bash scripts/gpu_session.sh            # from the repo root
#
# Parts (PARTS, default "bench tta parity"), each under its own time limit so that a hang
# costs one part, not the session; every file is written as soon as its part ends:
#   bench  - bench/gpu_run.sh: Flax vs PyTorch eager vs torch.compile, most important
#            config first, skipping what does not fit in BENCH_BUDGET_S (default 180 s);
#   tta    - time to 94% test accuracy with the fast recipe on the CIFAR-10 JPEG copy, bf16:
#            Flax (train.py) then PyTorch (bench/torch_train.py, channels_last + autocast +
#            fused SGD, data on the device), the same recipe, data order and clock;
#   parity - forward/gradient parity of Flax on the GPU (TF32 off) against torch_ref,
#            in whatever time is left before DEADLINE_S (default 530 s after the start).
# Needs .devcarry/cifar10-jpeg.tar.gz (cp ../shared/data/cifar10-jpeg.tar.gz .devcarry/) for
# "tta". The device tool returns at most 8 files: $OUT gets session.log (all output),
# bench.json, bench.md, tta_flax.json, tta_flax.jsonl, tta_torch.json, tta_torch.jsonl and
# parity_gpu.md.
set -uo pipefail
OUT="${OUT:-./gpu_out}"
PARTS="${PARTS:-bench tta parity}"
DEADLINE_S="${DEADLINE_S:-530}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d)"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
exec > >(tee -a "$OUT/session.log") 2>&1
start=$SECONDS
has() { [[ " $PARTS " == *" $1 "* ]]; }
stamp() { echo "=== [$((SECONDS - start)) s] $*"; }

if has bench; then
  stamp "bench"
  BENCH_BUDGET_S="${BENCH_BUDGET_S:-180}" BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-250}" \
    OUT="$SCRATCH/bench" bash bench/gpu_run.sh
  cp "$SCRATCH/bench/bench.json" "$SCRATCH/bench/bench.md" "$OUT/" 2>/dev/null
fi

if has tta; then
  stamp "tta: data"
  mkdir -p data && tar xzf .devcarry/cifar10-jpeg.tar.gz -C data
  JAX_PLATFORMS=cpu "$PY" -c "from flax_resnet.data import load_dataset as l
d = l('folder:data/cifar10-jpeg'); print(len(d.train), 'train', len(d.test), 'test')"
  for fw in flax torch; do
    stamp "tta: $fw"
    if [[ $fw == flax ]]; then
      script=train.py; limit="${TTA_FLAX_TIMEOUT_S:-140}"
      extra=(--no-progress --dtype bfloat16 --checkpoint-every-epochs 0)
    else
      script=bench/torch_train.py; limit="${TTA_TORCH_TIMEOUT_S:-125}"
      extra=(--dtype bfloat16)
    fi
    timeout -k 10 "$((limit + 45))" "$PY" bench/time_to_accuracy.py --time-limit "$limit" \
      --train-script "$script" --dataset folder:data/cifar10-jpeg --target 0.94 --stop-at-target \
      --workdir "$SCRATCH/tta_$fw" --json "$OUT/tta_$fw.json" -- "${extra[@]}"
    echo "time-to-accuracy ($fw) exit status: $?"
    cp "$SCRATCH/tta_$fw/metrics.jsonl" "$OUT/tta_$fw.jsonl" 2>/dev/null
  done
fi

if has parity; then
  left=$((DEADLINE_S - (SECONDS - start)))
  stamp "parity ($left s left)"
  if ((left > 20)); then
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 5 "$left" \
      "$PY" scripts/parity_report.py --depths 18 50 --out "$OUT/parity_gpu.md" | tail -30
  fi
fi
stamp "done"
