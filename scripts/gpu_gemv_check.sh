#!/usr/bin/env bash
# The CUDA-core decode kernels on one GPU, in one command: their GPU tests (the GGUF GEMV path, the W4A16 MoE's
# "gemv" and "rows" paths), then the GGUF MoE tuned with the GEMV candidates (scripts/bench_gguf_kernels.py
# --tune, winners merged into kernels/configs/gguf_moe.json and copied to OUT) and benchmarked, then the W4A16 MoE
# at decode sizes tuned among its paths (scripts/bench_w4a16.py, table copied to OUT).
# Usage: scripts/gpu_gemv_check.sh OUT     (GGUF_TUNE / W4_TUNE: tuning seconds, 0 skips; GGUF_MS, GGUF_TUNE_MS:
# token counts benchmarked and tuned; GGUF_CHECK= skips the GGUF kernels' check against their references; TESTS_S:
# the GPU tests' limit, about 10 s a test on a fresh machine, whose Triton cache is empty)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_gemv_check.sh OUT}
BUDGET=${BUDGET:-580}
GGUF_TUNE=${GGUF_TUNE:-150}
W4_TUNE=${W4_TUNE:-120}
GGUF_MS=${GGUF_MS:-1,2,4,8,16,32,64,128,256}
GGUF_TUNE_MS=${GGUF_TUNE_MS:-1,4,16,64,256}
GGUF_CHECK=${GGUF_CHECK---check}
TESTS_S=${TESTS_S:-150}
source scripts/gpu_stages.sh

stage "GPU tests: GEMV paths, decode attention, router" "$TESTS_S" $PY -m pytest -q -m gpu \
  -k "gemv or rows or real_widths or cuda_graph or decode_attention or route" \
  tests/test_kernels_gguf.py tests/test_kernels_w4a16.py tests/test_kernels_fused_ops.py
stage "GGUF kernels, tuned" 260 $PY scripts/bench_gguf_kernels.py $GGUF_CHECK --tune "$GGUF_TUNE" --out "$OUT" \
  --ms "$GGUF_MS" --tune-ms "$GGUF_TUNE_MS" &&
  cp kernels/configs/gguf_moe.json "$OUT/gguf_moe.json"
stage "W4A16 MoE at decode sizes, tuned" 200 $PY scripts/bench_w4a16.py --ms 1,2,4,8,16 --skip-proj \
  --tune-seconds "$W4_TUNE" --out "$OUT"
echo "exit $status" | tee -a "$LOG"
exit $status
