#!/usr/bin/env bash
# Every GPU-only check of bitdance-rt in one run, for a user with a CUDA GPU (an H100/H200 or
# any card with >= 40 GB for the 14B-shaped latency step):
#
#   OUT=gpu_out bash bench/gpu_check.sh          # on the GPU machine, from the repository root
#   SMOKE=1 OUT=/tmp/smoke bash bench/gpu_check.sh   # on a CPU-only machine: the same steps on
#                                                    # small shapes, to catch plumbing errors
#                                                    # before GPU time is spent (3x the limits,
#                                                    # a 1800 s budget)
#
# It needs the machine's python3 with torch (CUDA) and triton; nothing is installed, the
# repository is put on PYTHONPATH. It finishes within about 9 minutes, and writes what it
# measured to $OUT (below) as it goes, so a run stopped early still leaves its numbers.
#
# Steps, most important first, each under its own time limit (a failing or stopped step does
# not stop the others). Limits: startup 20 s, latency 140 s, latency_fp8 60 s,
# latency_fp8-weight 60 s, attention 60 s, pytest_gpu 60 s, agreement 50 s, throughput 65 s;
# 3 s more per step for a step that ignores SIGTERM (timeout -k). At most 536 s in all, and a
# step never runs past BUDGET (540 s from the start: it is shortened, or skipped when under
# 10 s are left), so the whole script ends within 10 minutes (e.g. inside a job limit of 600 s).
#   1. latency: bench/latency.py, 14b-64x with random weights at 1024x1024, N = 50, g = 7.5,
#      reference against torch (CUDA graphs, bf16), per-stage table, block-step growth and the
#      weight-read floor.
#   2. latency_fp8, latency_fp8-weight: bench/latency.py --recipe fp8, then --recipe
#      fp8-weight: the torch backend with the FP8 recipes (placeholder activation scales:
#      timing only), same shapes (issue 14); each records which path its E4M3 layers took
#      (torch._scaled_mm or the dequantize fallback: "fp8_path" in the JSON).
#   3. attention: bench/attention.py, bf16 error against fp32 SDPA and time per call, ours
#      against SDPA over a concatenated cache (B = 2, Hq 40, Hkv 8, D 128, T 64, cache lengths
#      200 .. 4200), then the kernel under eight block-size configurations at the longest cache.
#   4. pytest_gpu: pytest -m gpu -v: Triton kernel at 14b shapes in bf16, CUDA graphs against
#      eager, the FP8 scaled-matmul path, graph capture on the backend's device and the engine
#      stream's ordering (tests/test_gpu_readiness.py).
#   5. agreement: bench/agreement.py, identical tokens and pixels, torch backend against the
#      reference, on make-tiny checkpoints (P = 4, 16, 64) in fp32 and bf16.
#   6. throughput: bench/throughput.py, img/s of the ImageNet family at batch 64 in bf16 with
#      random weights, 100 head steps, each preset's guidance (the setting of the paper's
#      Table 3: 24.18 img/s for B-4x and 90.26 for B-16x on an A100, their compiled code):
#      imagenet-b-16x, then imagenet-b-4x, our torch backend then the reference, one warmup
#      (1 head step) and one timed run each. The authors' code is not on the GPU machine: their
#      runner is not in this step (bench/throughput.py --authors runs it beside ours).
#
# What comes back (8 files in $OUT; at most 8 can):
#   summary.txt   the machine (GPU, driver, python, torch, triton, commit) and the startup's
#                 seconds, then one line per step as it ends: its rc (124/137: stopped at its
#                 limit) and seconds, or "skipped"; last the total seconds
#   log.txt       every step's whole output, appended line by line as it is printed
#   latency.json, latency_fp8.json, latency_fp8-weight.json, attention.json
#                 written by each script when it completes (until then its rows are in log.txt)
#   agreement.json  rewritten after every configuration ("complete": false until the last)
#   throughput.json rewritten after every timed run ("complete": false until the last)
#
# TensorRT is not needed (nor used): the TensorRT backend's GPU tests run under
# `python -m pytest -m "gpu and trt"` on a machine with TensorRT installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt" LOG="$OUT/log.txt"
: > "$SUMMARY"
: > "$LOG"
GRACE=3
if [ "${SMOKE:-0}" = 1 ]; then
  # the CPU dry run checks plumbing, not the GPU's times: a slow CPU gets 3x the limits
  BUDGET=${BUDGET:-1800} SCALE=${SCALE:-3}
else
  BUDGET=${BUDGET:-540} SCALE=${SCALE:-1}
fi

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local left=$((BUDGET - SECONDS - GRACE))
  if [ "$left" -lt 10 ]; then
    echo "$name: skipped, ${left}s left of the ${BUDGET}s budget" | tee -a "$LOG" "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  # the output goes into log.txt as it is printed (a stopped step keeps all it printed)
  timeout -k "$GRACE" "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 25
  local rc=${PIPESTATUS[0]}
  # pytest's own count (on a machine without a GPU every gpu test is skipped)
  local tally
  tally=$(grep -E "^=+ .*(passed|failed|skipped|error|no tests ran).* =+$" "$LOG" | tail -n 1 | tr -d '=' | xargs)
  [ "$name" = pytest_gpu ] && [ -n "$tally" ] && rc="$rc ($tally)"
  echo "$name: rc=$rc in $((SECONDS - t0))s" | tee -a "$SUMMARY"
}

{
  date -u
  if command -v nvidia-smi > /dev/null; then
    timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
      --format=csv
  fi
  timeout 15 "$PY" -c "import sys, torch, importlib.util as u; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); t = u.find_spec('triton'); print('triton', __import__('triton').__version__ if t else 'not installed')" 2>&1
  git rev-parse --short HEAD 2>/dev/null
  echo "startup: ${SECONDS}s"
} >> "$SUMMARY" 2>&1
cat "$SUMMARY"

if [ "${SMOKE:-0}" = 1 ]; then
  DEV=(--device cpu) ATTN=(--small --iters 2) AGREE=(--steps 1 --cases 4:256x896,16:256x1024)
  LAT=(--preset tiny --height 256 --width 896 --steps 2 --replay 2)
  QLAT=(--preset tiny --height 256 --width 896 --steps 2 --replay 0)
  TPUT=(--preset tiny-16x,tiny-4x --batch 2 --steps 2)
else
  DEV=() ATTN=() AGREE=()
  LAT=(--preset 14b-64x --height 1024 --width 1024 --steps 50 --replay 10)
  QLAT=(--preset 14b-64x --height 1024 --width 1024 --steps 50 --replay 0)
  TPUT=(--preset imagenet-b-16x,imagenet-b-4x --batch 64)
fi

step latency 140 "$PY" bench/latency.py "${DEV[@]}" "${LAT[@]}" --weights random \
  --backends reference,torch --guidance 7.5 --warmup 1 --repeats 1 --json "$OUT/latency.json"
for recipe in fp8 fp8-weight; do
  step "latency_$recipe" 60 "$PY" bench/latency.py "${DEV[@]}" "${QLAT[@]}" --weights random \
    --backends torch --recipe "$recipe" --guidance 7.5 --warmup 1 --repeats 1 \
    --json "$OUT/latency_$recipe.json"
done
step attention 60 "$PY" bench/attention.py "${DEV[@]}" "${ATTN[@]}" --json "$OUT/attention.json"
# -o addopts= : one process (the project's addopts start pytest-xdist, which a GPU machine may
# not have, and under which a missing file passes as "no tests ran")
step pytest_gpu 60 "$PY" -m pytest -v -rs -m gpu -p no:cacheprovider -o addopts= \
  tests/test_attention_attention.py tests/test_runtime.py tests/test_quant.py \
  tests/test_gpu_readiness.py tests/test_imagenet_export.py
step agreement 50 "$PY" bench/agreement.py "${DEV[@]}" "${AGREE[@]}" --json "$OUT/agreement.json"
step throughput 65 "$PY" bench/throughput.py "${DEV[@]}" "${TPUT[@]}" --dtype bfloat16 \
  --runners torch,reference --warmup 1 --repeats 1 --json "$OUT/throughput.json"

echo "total: ${SECONDS}s" | tee -a "$SUMMARY"
echo "== summary"
cat "$SUMMARY"
