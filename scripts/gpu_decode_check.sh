#!/usr/bin/env bash
# Decode-size kernels and a decode step on one GPU, in one command: the GPU tests of the FP8 GEMMs and the fused
# decoder-layer ops, the FP8 projections' split-K configs tuned and compared (scripts/tune_small_m.py, winners merged
# into kernels/configs/fp8_gemm.json and copied to OUT), the kernels of a decode step (scripts/profile_decode.py) and `quantkit bench --per-layer` on a
# generated 2-layer real-width FP8 slice, the last two with the configs just tuned.
# Usage: scripts/gpu_decode_check.sh OUT     (BACKENDS=fp8,awq for the profile and the bench; TUNE=0 skips tuning;
# GEMM_TESTS=0 skips the GEMMs' GPU tests; CONFIGS=DIR copies tuned tables from DIR into kernels/configs first;
# PDL_AB=1 runs the bench again with QUANTKIT_PDL=1, programmatic dependent launch, into bench_<backend>-pdl.json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_decode_check.sh OUT}
BACKENDS=${BACKENDS:-fp8}
TUNE=${TUNE:-1}
GEMM_TESTS=${GEMM_TESTS:-1}
CONFIGS=${CONFIGS:-}
PDL_AB=${PDL_AB:-0}
WORK=${WORK:-/tmp/quantkit-profile}
source scripts/gpu_stages.sh

if [ -n "$CONFIGS" ]; then  # tuned tables from an earlier run on this machine
  cp "$CONFIGS"/*.json kernels/configs/ 2>/dev/null && echo "configs from $CONFIGS: $(ls "$CONFIGS")" | tee -a "$LOG"
fi
if [ "$GEMM_TESTS" = 1 ]; then
  stage "GPU tests: GEMMs" 150 $PY -m pytest -q -m gpu -k 'split or linear or matmul or quantized or gemm' \
    tests/test_kernels_fp8.py tests/test_kernels_w4a16.py
fi
stage "GPU tests: fused decoder-layer ops, FP8 runtime, serving" 150 $PY -m pytest -q -m gpu \
  tests/test_kernels_fused_ops.py tests/test_runtime_fp8.py tests/test_serve.py
if [ "$TUNE" = 1 ]; then
  stage "split-K FP8 projections" 240 $PY scripts/tune_small_m.py --json "$OUT/tune_small_m.json" \
    --write-configs kernels/configs
  cp kernels/configs/fp8_gemm.json "$OUT/fp8_gemm.json"
fi
stage "decode step, kernel by kernel" 150 $PY scripts/profile_decode.py --backends "$BACKENDS" --concurrency 1,32 \
  --layers 2 --work "$WORK" --json "$OUT/profile.json"
for b in ${BACKENDS//,/ }; do
  stage "bench $b per layer" 150 $PY -m quantkit.cli bench "$WORK/m2-2layers-$b" -o "$WORK/bench_$b" --backend "$b" \
    --concurrency 1,4,32,128 --input-len 128 --output-len 64 --per-layer --dtype bf16 --device cuda &&
    cp "$WORK/bench_$b/bench.json" "$OUT/bench_$b.json" &&
    { echo; echo "## bench $b"; echo; cat "$WORK/bench_$b/bench.md"; } >>"$SUMMARY"
  if [ "$PDL_AB" = 1 ]; then
    QUANTKIT_PDL=1 stage "bench $b per layer, PDL" 150 $PY -m quantkit.cli bench "$WORK/m2-2layers-$b" \
      -o "$WORK/bench_$b-pdl" --backend "$b" --concurrency 1,4,32,128 --input-len 128 --output-len 64 --per-layer \
      --dtype bf16 --device cuda && cp "$WORK/bench_$b-pdl/bench.json" "$OUT/bench_$b-pdl.json" &&
      { echo; echo "## bench $b, QUANTKIT_PDL=1"; echo; cat "$WORK/bench_$b-pdl/bench.md"; } >>"$SUMMARY"
  fi
done
echo "exit $status" | tee -a "$LOG"
exit $status
