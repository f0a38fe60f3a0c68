#!/usr/bin/env bash
# Every GPU-only check in one run, for a session lent a GPU (the `device` tool's `run`):
#
#   OUT=$OUT bash bench/gpu_check.sh           # on the GPU machine (timeout_s 600)
#   SMOKE=1 OUT=/tmp/smoke bash bench/gpu_check.sh   # here, on the CPU: same steps, small
#                                                    # shapes, to catch plumbing errors first
#
# Steps (each under its own time limit, 9.5 minutes in all; a failing step does not stop the
# others), most important first:
#   1. bench/latency.py: 14b-64x with random weights at 1024x1024, N = 50, g = 7.5,
#      reference against torch (CUDA graphs, bf16), per-stage table, block-step growth and the
#      weight-read floor.
#   2. bench/latency.py --recipe fp8, then --recipe fp8-weight: the torch backend with the FP8
#      recipes (placeholder activation scales: timing only), same shapes (issue 14).
#   3. bench/attention.py: bf16 error against fp32 SDPA and time per call, ours against SDPA over
#      a concatenated cache (B = 2, Hq 40, Hkv 8, D 128, T 64, cache lengths 200 .. 4200),
#      then the kernel under eight block-size configurations at the longest cache (tuning data).
#   4. pytest -m gpu: Triton kernel at 14b shapes in bf16, CUDA graphs against eager, the FP8
#      scaled-matmul path.
#   5. bench/agreement.py: identical tokens and pixels, torch backend against the reference, on
#      make-tiny checkpoints in fp32 and bf16.
#
# The GPU machine has no package registry: nothing is installed, the repository is put on
# PYTHONPATH and the machine's own python3 (with torch and triton) runs everything. TensorRT is
# not on it: the TensorRT backend's GPU tests need a machine with TensorRT.
# At most 8 files come back from $OUT: every step's output goes to log.txt, its JSON beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt" LOG="$OUT/log.txt"
: > "$SUMMARY"
: > "$LOG"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" > "$OUT/.step.txt" 2>&1
  local rc=$?
  cat "$OUT/.step.txt" >> "$LOG"
  tail -n 25 "$OUT/.step.txt"
  rm -f "$OUT/.step.txt"
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
} >> "$SUMMARY" 2>&1
cat "$SUMMARY"

if [ "${SMOKE:-0}" = 1 ]; then
  DEV=(--device cpu) ATTN=(--small --iters 2) AGREE=(--steps 1 --cases 4:256x896,16:256x1024)
  LAT=(--preset tiny --height 256 --width 896 --steps 2 --replay 2)
  QLAT=(--preset tiny --height 256 --width 896 --steps 2 --replay 0)
else
  DEV=() ATTN=() AGREE=()
  LAT=(--preset 14b-64x --height 1024 --width 1024 --steps 50 --replay 10)
  QLAT=(--preset 14b-64x --height 1024 --width 1024 --steps 50 --replay 0)
fi

step latency 220 "$PY" bench/latency.py "${DEV[@]}" "${LAT[@]}" --weights random \
  --backends reference,torch --guidance 7.5 --warmup 1 --repeats 1 --json "$OUT/latency.json"
for recipe in fp8 fp8-weight; do
  step "latency_$recipe" 70 "$PY" bench/latency.py "${DEV[@]}" "${QLAT[@]}" --weights random \
    --backends torch --recipe "$recipe" --guidance 7.5 --warmup 1 --repeats 1 \
    --json "$OUT/latency_$recipe.json"
done
step attention 80 "$PY" bench/attention.py "${DEV[@]}" "${ATTN[@]}" --json "$OUT/attention.json"
step pytest_gpu 70 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_plugins_attention.py tests/test_runtime.py tests/test_quant.py
step agreement 60 "$PY" bench/agreement.py "${DEV[@]}" "${AGREE[@]}" --json "$OUT/agreement.json"

echo "== summary"
cat "$SUMMARY"
