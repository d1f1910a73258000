#!/usr/bin/env bash
# Every format on the reference model, on one GPU, in one command. Usage: scripts/gpu_compare.sh OUT
#
#   1. the conversions of scripts/demo (FP8 block and channel, AWQ in both layouts with calibration on the GPU,
#      GGUF q8_0/q6_k/q5_k_m/q4_k_m and q4_k_m with the imatrix from quantkit's own calibration)
#   2. `quantkit compare --device cuda` on all of them against the BF16 reference
#   3. the GPU tests of every kernel and runtime backend (FP8, W4A16, GGUF; each against its PyTorch reference)
#
# Writes OUT/summary.md, OUT/log.txt and OUT/compare/comparison.{md,json,png}. Each stage has its own time limit
# and a failure does not stop the later stages; the exit code is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_compare.sh OUT}
MODEL=${MODEL:-evals/assets/reference}
WORK=${WORK:-/tmp/quantkit-gpu-compare}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu TESTS=: a dry run of this script on a CPU
TESTS=${TESTS-tests/test_kernels_fp8.py tests/test_kernels_w4a16.py tests/test_kernels_gguf.py tests/test_runtime_fp8.py
tests/test_runtime_awq.py tests/test_runtime_gguf.py}  # TESTS= : no tests
mkdir -p "$WORK"
BUDGET=${BUDGET:-580}
source scripts/gpu_stages.sh

QK=("$PY" -m quantkit.cli)
stage "convert fp8 block" 60 "${QK[@]}" convert "$MODEL" --to fp8 -o "$WORK/fp8-block" --force --no-progress
stage "convert fp8 channel" 60 "${QK[@]}" convert "$MODEL" --to fp8 --scheme channel -o "$WORK/fp8-channel" --force --no-progress
stage "calibrate" 120 "${QK[@]}" calibrate "$MODEL" -o "$WORK/calib/stats.safetensors" --device "$DEVICE" --no-progress
stage "convert awq" 120 "${QK[@]}" convert "$MODEL" --to awq -o "$WORK/awq" --force --no-progress
stage "convert awq compressed-tensors" 120 "${QK[@]}" convert "$MODEL" --to awq --awq-format compressed-tensors \
  -o "$WORK/awq-ct" --force --no-progress
for t in q8_0 q6_k q5_k_m q4_k_m; do
  stage "convert gguf $t" 60 "${QK[@]}" convert "$MODEL" --to gguf --type "$t" -o "$WORK/gguf-$t" --force --no-progress
done
stage "convert gguf q4_k_m + imatrix" 60 "${QK[@]}" convert "$MODEL" --to gguf --type q4_k_m \
  --imatrix "$WORK/calib/stats.safetensors" -o "$WORK/gguf-q4_k_m-imatrix" --force --no-progress
if stage "compare on $DEVICE" 400 "${QK[@]}" compare "$MODEL" --device "$DEVICE" --jobs "${JOBS:-5}" \
    --quant fp8-block="$WORK/fp8-block" --quant fp8-channel="$WORK/fp8-channel" \
    --quant awq="$WORK/awq" --quant awq-compressed-tensors="$WORK/awq-ct" --quant gguf-q8_0="$WORK/gguf-q8_0" \
    --quant gguf-q6_k="$WORK/gguf-q6_k" --quant gguf-q5_k_m="$WORK/gguf-q5_k_m" \
    --quant gguf-q4_k_m="$WORK/gguf-q4_k_m" --quant gguf-q4_k_m-imatrix="$WORK/gguf-q4_k_m-imatrix" \
    -o "$OUT/compare"; then
  { echo; echo "## Comparison on $DEVICE"; echo; cat "$OUT/compare/comparison.md"; } >>"$SUMMARY"
fi
if [ -n "$TESTS" ]; then
  stage "GPU tests: kernels and runtime backends" 400 $PY -m pytest -q -m gpu -p no:cacheprovider $TESTS
  { echo; echo "## GPU tests"; echo; grep -E "passed|failed|error" "$LOG" | tail -n 3; } >>"$SUMMARY"
fi
exit $status
