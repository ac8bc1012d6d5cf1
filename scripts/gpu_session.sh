#!/usr/bin/env bash
# The prepared GPU session: one borrowed H100/H200, one command of about 9 minutes.
#
#   OUT=dir bash scripts/gpu_session.sh            # from the repo root
#
# Parts (PARTS, default "profile tta warm long autotune long_torch parity"), most important
# first, each under its own time limit so that a hang costs one part, not the session:
#   profile  - bench/kernel_profile.py: each kernel of the ResNet-18 b512 bf16 step, measured
#              (JAX profiler) against its roofline, with XLA's default command buffers (CUDA
#              graphs) and without them; and bench/roofline.py compiled on the device, to
#              set against the deviceless compile in bench/results/2026-11-26-deviceless/;
#   bench    - bench/gpu_run.sh: Flax vs PyTorch eager vs torch.compile (the benchmark of
#              record; BENCH_BUDGET_S, default 180 s);
#   tta      - time to 94% test accuracy (flip TTA, the fast recipe's eval) with the fast
#              recipe on the CIFAR-10 JPEG copy, bf16, with a cold JAX compilation cache:
#              Flax (train.py) then PyTorch (bench/torch_train.py: channels_last + autocast +
#              fused SGD, data on the device), the same recipe, data order and clock;
#   warm     - the Flax run again: what a rerun with the persistent compilation cache costs;
#   long     - the fast recipe at LONG_EPOCHS (default 100) epochs, Flax: how far the
#              recipe gets on the lossy copy with more training;
#   autotune - the step benchmark (Flax only, ResNet-18 b512 bf16) with XLA's default
#              autotuning and with --xla_gpu_autotune_level=0: compile time against speed;
#   long_torch - PyTorch at LONG_EPOCHS, if time is left;
#   parity   - forward/gradient parity of Flax on the GPU (TF32 off) against torch_ref, in
#              whatever time is left before DEADLINE_S (default 530 s after the start).
# Needs .devcarry/cifar10-jpeg.tar.gz (cp ../shared/data/cifar10-jpeg.tar.gz .devcarry/) for
# the folder data set. The device tool returns few files, so $OUT gets two: session.log (all
# output) and results.tar.gz (every JSON / JSONL / Markdown result, refreshed after each part,
# so a kill keeps what finished). A CPU smoke run of the plumbing:
#   PARTS="tta warm" DATASET=synthetic:256:64 DTYPE=float32 TORCH_PARTS=0 \
#     EXTRA="--depth 18 --width 0.125 --batch-size 32 --epochs 2" OUT=/tmp/o bash scripts/gpu_session.sh
set -uo pipefail
OUT="${OUT:-./gpu_out}"
PARTS="${PARTS:-profile tta warm long autotune long_torch parity}"
DEADLINE_S="${DEADLINE_S:-530}"
DATASET="${DATASET:-folder:data/cifar10-jpeg}"
DTYPE="${DTYPE:-bfloat16}"
LONG_EPOCHS="${LONG_EPOCHS:-100}"
TORCH_PARTS="${TORCH_PARTS:-1}"
PCFG="${PROFILE_CONFIG:-resnet18-b512-bf16}"
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d)"
RES="$SCRATCH/results"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A cache of this session only: the tta part is cold, the warm part reuses it.
export JAX_COMPILATION_CACHE_DIR="$SCRATCH/jax-cache"
PY="${PYTHON:-python3}"
exec > >(tee -a "$OUT/session.log") 2>&1
start=$SECONDS
has() { [[ " $PARTS " == *" $1 "* ]]; }
stamp() { echo "=== [$((SECONDS - start)) s] $*"; }
pack() { tar czf "$OUT/results.tar.gz.tmp" -C "$RES" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }
left() { echo $((DEADLINE_S - (SECONDS - start))); }

# tta_run NAME SCRIPT LIMIT_S [ARGS...]: one time-to-accuracy run into $RES/NAME.{json,jsonl}
tta_run() {
  local name=$1 script=$2 limit=$3
  shift 3
  if (($(left) < limit / 2)); then echo "skipped $name: $(left) s left"; return; fi
  ((limit > $(left))) && limit=$(left)
  stamp "$name ($script, limit $limit s)"
  timeout -k 10 "$((limit + 45))" "$PY" bench/time_to_accuracy.py --time-limit "$limit" \
    --train-script "$script" --dataset "$DATASET" --target 0.94 --metric test_acc_flip \
    --stop-at-target --workdir "$SCRATCH/$name" --json "$RES/$name.json" -- \
    --dtype "$DTYPE" "$@" "${EXTRA[@]}"
  echo "$name exit status: $?"
  cp "$SCRATCH/$name/metrics.jsonl" "$RES/$name.jsonl" 2>/dev/null
  pack
}
FLAX=(train.py "${TTA_FLAX_TIMEOUT_S:-140}" --no-progress --checkpoint-every-epochs 0)
TORCH=(bench/torch_train.py "${TTA_TORCH_TIMEOUT_S:-125}")

if has profile; then
  stamp "profile"
  # A cache of its own, so that the tta part still compiles cold. The profiler makes XLA
  # run command buffers (CUDA graphs) thunk by thunk unless told otherwise, hence the flag.
  for cb in default off; do
    if (($(left) < 120)); then echo "skipped profile $cb: $(left) s left"; continue; fi
    flags="${XLA_FLAGS:-}"
    if [[ $cb == off ]]; then
      flags="$flags --xla_gpu_enable_command_buffer="
    else
      flags="$flags --xla_enable_command_buffers_during_profiling=true"
    fi
    XLA_FLAGS="$flags" JAX_COMPILATION_CACHE_DIR="$SCRATCH/jax-cache-profile" \
      timeout -k 10 100 "$PY" -m bench.kernel_profile --top 20 --config "$PCFG" \
      --json "$RES/profile_cb_$cb.json" --markdown "$RES/profile_cb_$cb.md" > "$SCRATCH/p.txt"
    echo "profile $cb exit status: $?"
    head -14 "$SCRATCH/p.txt"
    pack
  done
  JAX_COMPILATION_CACHE_DIR="$SCRATCH/jax-cache-profile" timeout -k 10 60 \
    "$PY" -m bench.roofline --target local --top 12 --config "$PCFG" \
    --json "$RES/roofline_local.json" --markdown "$RES/roofline_local.md" | tail -4
  echo "roofline exit status: ${PIPESTATUS[0]}"
  pack
fi

if has bench; then
  stamp "bench"
  BENCH_BUDGET_S="${BENCH_BUDGET_S:-180}" BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-250}" \
    OUT="$SCRATCH/bench" bash bench/gpu_run.sh
  cp "$SCRATCH/bench/bench.json" "$SCRATCH/bench/bench.md" "$RES/" 2>/dev/null
  pack
fi

if [[ $DATASET == folder:* && ! -d ${DATASET#folder:} ]]; then
  stamp "data"
  mkdir -p data && tar xzf .devcarry/cifar10-jpeg.tar.gz -C data
fi
if has tta || has warm || has long || has long_torch; then
  JAX_PLATFORMS=cpu "$PY" -c "from flax_resnet.data import load_dataset as l
d = l('$DATASET'); print(len(d.train), 'train', len(d.test), 'test')"
fi

if has tta; then
  tta_run tta_flax "${FLAX[@]}"
  ((TORCH_PARTS)) && tta_run tta_torch "${TORCH[@]}"
fi
has warm && tta_run tta_flax_warm "${FLAX[@]}"
has long && tta_run long_flax "${FLAX[0]}" "${LONG_FLAX_TIMEOUT_S:-150}" "${FLAX[@]:2}" \
  --epochs "$LONG_EPOCHS"

if has autotune; then
  for level in default 0; do
    if (($(left) < 60)); then echo "skipped autotune $level: $(left) s left"; continue; fi
    stamp "autotune $level"
    flags="${XLA_FLAGS:-}"
    [[ $level != default ]] && flags="$flags --xla_gpu_autotune_level=$level"
    XLA_FLAGS="$flags" timeout -k 10 120 "$PY" -m bench --configs resnet18-b512-bf16 \
      --frameworks flax --steps 60 --windows 10 --warmup 10 --min-warmup-s 1.5 --tf32 on \
      --json "$RES/autotune_$level.json" --markdown "$RES/autotune_$level.md" | tail -4
    pack
  done
fi

if has long_torch && ((TORCH_PARTS)); then
  tta_run long_torch "${TORCH[0]}" "${LONG_TORCH_TIMEOUT_S:-130}" --epochs "$LONG_EPOCHS"
fi

if has parity; then
  stamp "parity ($(left) s left)"
  if (($(left) > 20)); then
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 5 "$(left)" \
      "$PY" scripts/parity_report.py --depths 18 50 --out "$RES/parity_gpu.md" | tail -30
    pack
  fi
fi
stamp "done"
