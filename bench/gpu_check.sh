#!/usr/bin/env bash
# Every GPU-only check in one run, for a session lent a GPU (`run` tool):
#   bash bench/gpu_check.sh        (writes results under $OUT, default ./gpu_out)
# Kernels and CUDA graphs (pytest -m gpu), bf16 attention error and timing at 14b shapes,
# and the 14b-64x latency table (random weights, 1024x1024, N=50, g=7.5), reference vs torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
pip install -q torch==2.13.0 2>/dev/null; pip install -q -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -m gpu tests 2>&1 | tail -20 | tee "$OUT/pytest_gpu.txt"
python bench/attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.txt"
python bench/latency.py --preset 14b-64x --weights random --backends reference,torch \
    --height 1024 --width 1024 --steps 50 --guidance 7.5 --warmup 1 --repeats 1 \
    --json "$OUT/latency_14b64.json" 2>&1 | tee "$OUT/latency_14b64.txt"
