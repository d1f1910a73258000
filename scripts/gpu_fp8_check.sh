#!/usr/bin/env bash
# The block-FP8 GEMMs at large M on one GPU, in one command: their GPU tests, the MoE layer and the projections with
# a weight scale a tile against a scale a column (scripts/bench_kernels.py --tile-scales-ab), then the MoE's large-M
# buckets tuned again (scripts/tune_fp8.py, merged into kernels/configs/fp8_moe.json and copied to OUT) and measured.
# Usage: scripts/gpu_fp8_check.sh OUT     (MS: token counts measured; TUNE_MS: buckets tuned, empty skips the tuning;
# TESTS_S: the GPU tests' limit, 0 skips them)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_fp8_check.sh OUT}
MS=${MS:-256,1024,4096}
TUNE_MS=${TUNE_MS-1024,4096}
TESTS_S=${TESTS_S:-120}
source scripts/gpu_stages.sh

tables() {  # the Markdown tables a stage printed, into the summary
  sed -n "/^== $1 (/,/^== $1: exit/p" "$LOG" | grep -E '^\||^(MoE layer|Attention|NVIDIA)' >>"$SUMMARY"
}
if [ "$TESTS_S" != 0 ]; then
  stage "GPU tests: FP8 GEMMs and MoE" "$TESTS_S" $PY -m pytest -q -m gpu tests/test_kernels_fp8.py
fi
stage "FP8 kernels" 200 $PY scripts/bench_kernels.py --ms "$MS" --tile-scales-ab --out "$OUT"
tables "FP8 kernels"
if [ -n "$TUNE_MS" ]; then
  stage "FP8 MoE tuned" 150 $PY scripts/tune_fp8.py --only moe --ms "$TUNE_MS" --schemes block --out kernels/configs &&
    cp kernels/configs/fp8_moe.json "$OUT/fp8_moe.json"
  grep -h "^moe " "$LOG" >>"$SUMMARY"
  stage "FP8 MoE, tuned" 100 $PY scripts/bench_kernels.py --ms "$TUNE_MS" --skip-proj --tile-scales-ab \
    --out "$OUT/tuned"
  tables "FP8 MoE, tuned"
fi
echo "exit $status" | tee -a "$LOG"
exit $status
