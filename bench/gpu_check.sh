#!/usr/bin/env bash
# Every GPU-only check in one run, for a session lent a GPU (the `device` tool's `run`):
#
#   OUT=$OUT bash bench/gpu_check.sh           # on the GPU machine (timeout_s 600)
#   SMOKE=1 OUT=/tmp/smoke bash bench/gpu_check.sh   # here, on the CPU: same steps, small
#                                                    # shapes, to catch plumbing errors first
#
# Steps (each under its own time limit, about 9.5 minutes in all; a failing step does not stop
# the others), most important first:
#   1. bench/latency.py: 14b-64x with random weights at 1024x1024, N = 50, g = 7.5,
#      reference against torch (CUDA graphs, bf16), per-stage table and block-step growth.
#   2. bench/attention.py: bf16 error against fp32 SDPA and time per call, ours against SDPA over
#      a concatenated cache (B = 2, Hq 40, Hkv 8, D 128, T 64, cache lengths 200 .. 4200),
#      then the kernel under eight block-size configurations at the longest cache (tuning data).
#   3. pytest -m gpu: Triton kernel at 14b shapes in bf16, CUDA graphs against eager.
#   4. bench/agreement.py: identical tokens and pixels, torch backend against the reference, on
#      make-tiny checkpoints in fp32 and bf16.
#
# The GPU machine has no package registry: nothing is installed, the repository is put on
# PYTHONPATH and the machine's own python3 (with torch and triton) runs everything.
# At most 8 files come back from $OUT; this writes 8.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "$name: rc=$rc in $((SECONDS - t0))s" | tee -a "$SUMMARY"
}

{
  date -u
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${SMOKE:-0}" = 1 ]; then
  DEV=(--device cpu) ATTN=(--small --iters 2) AGREE=(--steps 1 --cases 4:256x896,16:256x1024)
  LAT=(--preset tiny --height 256 --width 896 --steps 2 --replay 2)
else
  DEV=() ATTN=() AGREE=()
  LAT=(--preset 14b-64x --height 1024 --width 1024 --steps 50 --replay 10)
fi

step latency 280 "$PY" bench/latency.py "${DEV[@]}" "${LAT[@]}" --weights random \
  --backends reference,torch --guidance 7.5 --warmup 1 --repeats 1 --json "$OUT/latency.json"
step attention 110 "$PY" bench/attention.py "${DEV[@]}" "${ATTN[@]}" --json "$OUT/attention.json"
step pytest_gpu 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_plugins_attention.py tests/test_runtime.py
step agreement 80 "$PY" bench/agreement.py "${DEV[@]}" "${AGREE[@]}"

echo "== summary"
cat "$SUMMARY"
