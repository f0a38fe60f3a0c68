#!/usr/bin/env bash
# Prompt adherence of the built-in demo model (issue 13) and of its quantized forms (issue 14),
# on the CPU, in one run: 120 held-out prompts, guidance at the model's default and at 1.0,
# per backend (reference, torch, onnxruntime) and per quantization recipe (torch backend).
#
#   bash bench/demo_adherence.sh [OUT_DIR]      # about 25 minutes on one core
#   RUNS="reference torch" bash bench/demo_adherence.sh OUT    # some of the runs (two such
#                                               # calls in parallel use two cores)
#   N=10 THREADS=2 bash bench/demo_adherence.sh OUT   # N prompts (default 120), torch threads
#
# The quantized runs first calibrate on 64 training captions (about 3 minutes) and the
# onnxruntime run exports the demo model into OUT/onnx (about 1.5 minutes), whatever N; both are
# kept in OUT and reused by later calls.
#
# Writes OUT_DIR/*.json and prints (and writes OUT_DIR/table.md) one table of every run whose
# JSON is in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_adherence_out}
N=${N:-120}
THREADS=${THREADS:-1}
ALL="reference torch onnxruntime fp8-weight fp8 int8-weight int8-sq"
RUNS=${RUNS:-$ALL}
CKPT=bitdance_rt/demo/weights
mkdir -p "$OUT"
adherence() {  # label, then bench/adherence.py arguments
    local label=$1; shift
    echo "== $label" >&2
    python bench/adherence.py --n "$N" --threads "$THREADS" --label "$label" \
        --json "$OUT/$label.json" "$@" >&2
}
for run in $RUNS; do
    case $run in
    reference) adherence reference --backend reference ;;
    torch) adherence torch --backend torch --autoencoder ;;
    onnxruntime)  # the exported graphs on ONNX Runtime (CPU provider)
        [ -f "$OUT/onnx/manifest.json" ] || bitdance-export --checkpoint "$CKPT" --out "$OUT/onnx" >&2
        adherence onnxruntime --backend onnxruntime --export-dir "$OUT/onnx" ;;
    fp8-weight|fp8|int8-weight|int8-sq)
        # calibrated on 64 training-set captions (none of them held out)
        if [ ! -f "$OUT/calibration.safetensors" ]; then
            python -c "
from bitdance_rt.demo import shapes
print('\n'.join(shapes.sample(i, 32)[1] for i in range(64)))" > "$OUT/calibration_prompts.txt"
            bitdance-export calibrate -c "$CKPT" --out "$OUT/calibration.safetensors" \
                --prompts "$OUT/calibration_prompts.txt" --samples 64 --no-progress >&2
        fi
        [ -f "$OUT/$run/quantization.json" ] || bitdance-export quantize -c "$CKPT" \
            --recipe "$run" --calibration "$OUT/calibration.safetensors" --out "$OUT/$run" >&2
        adherence "$run" --backend torch --checkpoint "$OUT/$run" ;;
    *) echo "unknown run $run (choose from: $ALL)" >&2; exit 2 ;;
    esac
done
jsons=()
for run in $ALL; do [ -f "$OUT/$run.json" ] && jsons+=("$OUT/$run.json"); done
python bench/adherence.py --summarize "${jsons[@]}" | tee "$OUT/table.md"
