#!/usr/bin/env bash
# The prepared GPU session: one borrowed H100/H200, one command of at most ~9.5 minutes (a
# device-tool call ends at 10; with the machine's start, ~12 of its 15 minutes).
#
#   OUT=dir bash scripts/gpu_session.sh            # from the repo root ($OUT set there:
#                                                  # bash scripts/gpu_session.sh)
#
# The caller carries .devcarry/ (git-ignored): .devcarry/whl/*.whl (grain, array_record,
# tensorboardX, portpicker, etils, importlib_resources for the machine's Python 3.12,
# installed first into /tmp/site without network; fetch them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .devcarry/whl grain==0.2.18 array-record==0.8.6 \
#     tensorboardX==2.6.5 portpicker etils importlib_resources
# ) and .devcarry/cifar10-jpeg.tar.gz (the CIFAR-10 JPEG copy for tta, warm,
# long; cp ../shared/data/cifar10-jpeg.tar.gz .devcarry/), unpacked in the background while
# the GPU-bound resnet50 part runs.
#
# Parts (PARTS, default "resnet50 e2e input tta profile autotune warm parity"), most important
# first, each under its own time limit and skipped when the time left before DEADLINE_S
# (default 560 s after the start) is too short for it, so that the default run ends within
# ~9.5 minutes and a hang costs one part, not the session. Estimated seconds on an H200:
#   resnet50 (~150) - the training step of resnet50-b256-bf16-in224 (R50_CONFIG): ImageNet
#              stem, 224x224, 1000 classes, the crop made on the host so the step normalises
#              only, on both sides; Flax vs PyTorch eager vs torch.compile (python -m bench,
#              R50_STEPS=30 timed steps; --time-budget R50_BUDGET_S=170 skips torch.compile
#              when the first two took over ~80 s; killed at R50_TIMEOUT_S=230;
#              R50_COMPILE_MODE=max-autotune costs minutes of compilation: not by default);
#   e2e      (~140) - end to end on E2E_IMAGES=8000 generated ImageNet-like JPEGs on this
#              machine's disk (~5 s with every core): bench/flax_e2e.py (train.py's streamed
#              pipeline in E2E_WORKERS=12 grain workers + the product's step) then
#              bench/torch_e2e.py (ImageFolder + DataLoader with 12 workers + torch_ref,
#              channels_last, bf16 autocast, fused SGD), ResNet-50 b256 bf16 at 224 (E2E_CONFIG),
#              each timed for E2E_TIME_S=30 s after its start-up, first step and >= 5 s of
#              warm-up: images/s and the fraction of the time the loop waited for data
#              (e2e_flax.json, e2e_torch.json, e2e.md);
#   input    (~160) - python -m bench.input_pipeline --images 2000,8000 --workers 1,4,8,12
#              --size 224 --batch-size 256 --batches 20: host-only pipeline throughput and
#              memory, flax_resnet vs DataLoader (the folders made beforehand, in parallel;
#              killed at INPUT_TIMEOUT_S=200, its rows stay in session.log);
#   tta      (~120) - time to 94% test accuracy (flip TTA, the fast recipe's eval) with the
#              fast recipe on the CIFAR-10 JPEG copy, bf16, with a cold JAX compilation
#              cache: Flax (train.py) then PyTorch (bench/torch_train.py: channels_last +
#              autocast + fused SGD, data on the device), the same recipe, data order, clock;
#              ~20 s of it decode the copy into memory once;
#   profile  (~200) - bench/kernel_profile.py: each kernel of the ResNet-18 b512 bf16 step,
#              measured (JAX profiler) against its roofline, with XLA's default command
#              buffers (CUDA graphs) and without them; and bench/roofline.py compiled on the
#              device, to set against the deviceless compile in
#              bench/results/2026-11-26-deviceless/;
#   autotune (~80)  - the step benchmark (Flax only, ResNet-18 b512 bf16) with XLA's default
#              autotuning and with --xla_gpu_autotune_level=0: compile time against speed;
#   warm     (~50)  - the Flax tta run again: what a rerun with the persistent cache costs;
#   parity   (~90)  - forward/gradient parity of Flax on the GPU (TF32 off) against torch_ref;
# and, not by default: bench (bench/gpu_run.sh, the CIFAR matrix of record, BENCH_BUDGET_S
# default 180 s), long / long_torch (the fast recipe at LONG_EPOCHS=100 epochs, Flax / PyTorch).
# With the default parts, resnet50, e2e and input fill ~460 s of the 560, tta_flax most of the
# rest; tta_torch, profile, autotune, warm and parity run only if the time left fits their
# minimum (62, 120, 60, 70 and 90 s): on a fast day, or in a second call straight after the
# first, while the machine is warm (e.g. PARTS=tta DEADLINE_S=150, ~2.5 minutes).
#
# The device tool returns few files, so $OUT gets two: session.log (all output) and
# results.tar.gz (every JSON / JSONL / Markdown result, refreshed after each part, so a kill
# keeps what finished). CPU smoke runs of the plumbing (a minute or two each):
#   PARTS="resnet50 e2e input" R50_CONFIG=resnet18w0.125-b8-fp32-in64 R50_FRAMEWORKS=flax,torch \
#     E2E_CONFIG=resnet18w0.125-b8-fp32-in64 E2E_IMAGES=64 E2E_WORKERS=2 E2E_STEPS=2 \
#     E2E_TIME_S=5 E2E_WARMUP=1 E2E_WARMUP_S=0 INPUT_IMAGES=64 INPUT_WORKERS=1 INPUT_SIZE=64 \
#     INPUT_BATCH=8 INPUT_BATCHES=2 OUT=/tmp/o bash scripts/gpu_session.sh
#   PARTS="tta warm" DATASET=synthetic:256:64 DTYPE=float32 TORCH_PARTS=0 \
#     EXTRA="--depth 18 --width 0.125 --batch-size 32 --epochs 2" OUT=/tmp/o bash scripts/gpu_session.sh
set -uo pipefail
OUT="${OUT:-./gpu_out}"
PARTS="${PARTS:-resnet50 e2e input tta profile autotune warm parity}"
DEADLINE_S="${DEADLINE_S:-560}"
DATASET="${DATASET:-folder:data/cifar10-jpeg}"
DTYPE="${DTYPE:-bfloat16}"
LONG_EPOCHS="${LONG_EPOCHS:-100}"
TORCH_PARTS="${TORCH_PARTS:-1}"
PCFG="${PROFILE_CONFIG:-resnet18-b512-bf16}"
R50_CONFIG="${R50_CONFIG:-resnet50-b256-bf16-in224}"
R50_FRAMEWORKS="${R50_FRAMEWORKS:-flax,torch,torch_compile}"
R50_COMPILE_MODE="${R50_COMPILE_MODE:-default}"
R50_STEPS="${R50_STEPS:-30}"
R50_BUDGET_S="${R50_BUDGET_S:-170}"
R50_TIMEOUT_S="${R50_TIMEOUT_S:-230}"
E2E_CONFIG="${E2E_CONFIG:-$R50_CONFIG}"
E2E_IMAGES="${E2E_IMAGES:-8000}"
E2E_WORKERS="${E2E_WORKERS:-12}"
E2E_TIME_S="${E2E_TIME_S:-30}"
E2E_STEPS="${E2E_STEPS:-2000}"
E2E_WARMUP="${E2E_WARMUP:-20}"
E2E_WARMUP_S="${E2E_WARMUP_S:-5}"
E2E_SETUP_S="${E2E_SETUP_S:-110}"  # allowed per side beyond E2E_TIME_S: start-up, compile
INPUT_IMAGES="${INPUT_IMAGES:-2000,8000}"
INPUT_WORKERS="${INPUT_WORKERS:-1,4,8,12}"
INPUT_SIZE="${INPUT_SIZE:-224}"
INPUT_BATCH="${INPUT_BATCH:-256}"
INPUT_BATCHES="${INPUT_BATCHES:-20}"
INPUT_TIMEOUT_S="${INPUT_TIMEOUT_S:-200}"
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d)"
RES="$SCRATCH/results"
FOLDERS="$SCRATCH/folders"  # generated JPEG folders, on the machine's local disk
mkdir -p "$RES" "$FOLDERS"
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
# cap LIMIT_S: LIMIT_S, or the time left if that is less
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }

stamp "setup"
if [[ -d .devcarry/whl ]]; then
  # The wheels the machine lacks (no network there); --no-deps: their dependencies are there.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .devcarry/whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  echo "wheels exit status: $?"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(lscpu | sed -n 's/^Model name: *//p')"
  "$PY" - <<'PYEOF'
import importlib
for name in ("jax", "flax", "torch", "torchvision", "grain", "tensorboardX", "PIL"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING", e)
PYEOF
} 2>&1 | tee "$RES/env.txt"

# The CIFAR-10 copy unpacks on one core while the GPU-bound resnet50 part runs (never
# beside the CPU-bound e2e and input parts: else it unpacks before tta).
cifar() { { has tta || has warm || has long || has long_torch; } && [[ $DATASET == folder:* ]] \
  && [[ ! -d ${DATASET#folder:} ]]; }
DATA_PID=""
if cifar && has resnet50; then
  mkdir -p data
  tar xzf .devcarry/cifar10-jpeg.tar.gz -C data &
  DATA_PID=$!
fi

# tta_run NAME SCRIPT LIMIT_S [ARGS...]: one time-to-accuracy run into $RES/NAME.{json,jsonl}
tta_run() {
  local name=$1 script=$2 limit=$3
  shift 3
  if (($(left) < limit / 2)); then echo "skipped $name: $(left) s left"; return; fi
  limit=$(cap "$limit")
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

if has resnet50; then
  if (($(left) < 90)); then echo "skipped resnet50: $(left) s left"; else
    limit=$(cap "$R50_TIMEOUT_S")
    budget=$((limit - 40 < R50_BUDGET_S ? limit - 40 : R50_BUDGET_S))
    stamp "resnet50 ($R50_CONFIG: $R50_FRAMEWORKS, budget $budget s, limit $limit s)"
    # --time-budget skips a job (recorded so) that would not fit; the JSON is rewritten
    # after every job, so a kill keeps the finished ones.
    timeout -k 10 "$limit" "$PY" -m bench --configs "$R50_CONFIG" \
      --frameworks "$R50_FRAMEWORKS" --torch-compile-mode "$R50_COMPILE_MODE" \
      --steps "$R50_STEPS" --windows 5 --warmup 5 --min-warmup-s 1 --tf32 on \
      --time-budget "$budget" --job-timeout "$limit" \
      --json "$RES/resnet50.json" --markdown "$RES/resnet50.md"
    echo "resnet50 exit status: $?"
    pack
  fi
fi

if has e2e; then
  if (($(left) < E2E_TIME_S + 60)); then echo "skipped e2e: $(left) s left"; else
    stamp "e2e: $E2E_IMAGES JPEGs"
    E2E_ROOT="$FOLDERS/jpeg-$E2E_IMAGES"  # the name input_pipeline reuses for that size
    "$PY" -m bench.e2e make-folder --root "$E2E_ROOT" --images "$E2E_IMAGES"
    for side in flax torch; do
      if (($(left) < E2E_TIME_S + 30)); then echo "skipped e2e $side: $(left) s left"; continue; fi
      limit=$(cap $((E2E_TIME_S + E2E_SETUP_S)))
      stamp "e2e $side ($E2E_CONFIG, $E2E_WORKERS workers, limit $limit s)"
      timeout -k 10 "$limit" "$PY" -m "bench.${side}_e2e" --root "$E2E_ROOT" \
        --config "$E2E_CONFIG" --workers "$E2E_WORKERS" --steps "$E2E_STEPS" \
        --time-limit "$E2E_TIME_S" --warmup "$E2E_WARMUP" --warmup-s "$E2E_WARMUP_S" \
        --json "$RES/e2e_$side.json"
      echo "e2e $side exit status: $?"
      pack
    done
    "$PY" -m bench.e2e table "$RES/e2e_flax.json" "$RES/e2e_torch.json" \
      --markdown "$RES/e2e.md"
    pack
  fi
fi

if has input; then
  if (($(left) < 60)); then echo "skipped input: $(left) s left"; else
    stamp "input: folders"
    for n in ${INPUT_IMAGES//,/ }; do
      "$PY" -m bench.e2e make-folder --root "$FOLDERS/jpeg-$n" --images "$n"
    done
    limit=$(cap "$INPUT_TIMEOUT_S")
    stamp "input (limit $limit s)"
    timeout -k 10 "$limit" "$PY" -m bench.input_pipeline --images "$INPUT_IMAGES" \
      --workers "$INPUT_WORKERS" --size "$INPUT_SIZE" --batch-size "$INPUT_BATCH" \
      --batches "$INPUT_BATCHES" --root "$FOLDERS" --json "$RES/input.json" \
      --markdown "$RES/input.md"
    echo "input exit status: $?"
    pack
  fi
fi

if [[ -n $DATA_PID ]]; then
  stamp "data: waiting for the CIFAR-10 copy to unpack"
  wait "$DATA_PID"
  echo "data exit status: $?"
elif cifar; then
  stamp "data"
  mkdir -p data && tar xzf .devcarry/cifar10-jpeg.tar.gz -C data
fi
if { has tta || has warm || has long || has long_torch; } && (($(left) > 60)); then
  JAX_PLATFORMS=cpu "$PY" -c "from flax_resnet.data import load_dataset as l
d = l('$DATASET'); print(len(d.train), 'train', len(d.test), 'test')"
fi

if has tta; then
  tta_run tta_flax "${FLAX[@]}"
  ((TORCH_PARTS)) && tta_run tta_torch "${TORCH[@]}"
fi

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
  if (($(left) >= 60)); then
    JAX_COMPILATION_CACHE_DIR="$SCRATCH/jax-cache-profile" timeout -k 10 60 \
      "$PY" -m bench.roofline --target local --top 12 --config "$PCFG" \
      --json "$RES/roofline_local.json" --markdown "$RES/roofline_local.md" | tail -4
    echo "roofline exit status: ${PIPESTATUS[0]}"
    pack
  fi
fi

if has autotune; then
  for level in default 0; do
    if (($(left) < 60)); then echo "skipped autotune $level: $(left) s left"; continue; fi
    stamp "autotune $level"
    flags="${XLA_FLAGS:-}"
    [[ $level != default ]] && flags="$flags --xla_gpu_autotune_level=$level"
    XLA_FLAGS="$flags" timeout -k 10 "$(cap 120)" "$PY" -m bench --configs resnet18-b512-bf16 \
      --frameworks flax --steps 60 --windows 10 --warmup 10 --min-warmup-s 1.5 --tf32 on \
      --json "$RES/autotune_$level.json" --markdown "$RES/autotune_$level.md" | tail -4
    pack
  done
fi

has warm && tta_run tta_flax_warm "${FLAX[@]}"

if has bench; then
  if (($(left) < 120)); then echo "skipped bench: $(left) s left"; else
    stamp "bench"
    budget=$(cap "${BENCH_BUDGET_S:-180}")
    BENCH_BUDGET_S="$budget" BENCH_TIMEOUT_S="$(cap "${BENCH_TIMEOUT_S:-250}")" \
      OUT="$SCRATCH/bench" bash bench/gpu_run.sh
    cp "$SCRATCH/bench/bench.json" "$SCRATCH/bench/bench.md" "$RES/" 2>/dev/null
    pack
  fi
fi

has long && tta_run long_flax "${FLAX[0]}" "${LONG_FLAX_TIMEOUT_S:-150}" "${FLAX[@]:2}" \
  --epochs "$LONG_EPOCHS"
if has long_torch && ((TORCH_PARTS)); then
  tta_run long_torch "${TORCH[0]}" "${LONG_TORCH_TIMEOUT_S:-130}" --epochs "$LONG_EPOCHS"
fi

if has parity; then
  # Killed part-way it reports nothing: it runs only with the time it needs (~90 s).
  if (($(left) < ${PARITY_MIN_S:-90})); then echo "skipped parity: $(left) s left"; else
    stamp "parity ($(left) s left)"
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 5 "$(left)" \
      "$PY" scripts/parity_report.py --depths 18 50 --out "$RES/parity_gpu.md" | tail -30
    pack
  fi
fi
stamp "done"
