#!/usr/bin/env bash
# Programmatic dependent launch (QUANTKIT_PDL=1) on one Hopper GPU, in one command: the GPU test that serves the same
# tokens with it on and off, the real-width FP8 decode chain timed both ways with its outputs compared bit for bit
# (scripts/bench_pdl_chain.py), and the TMA/warp-specialization check (scripts/check_tma_ws.py). The per-layer bench
# both ways is `PDL_AB=1 TUNE=0 GEMM_TESTS=0 BACKENDS=fp8,awq scripts/gpu_decode_check.sh OUT`, a call of its own.
# Usage: scripts/gpu_pdl_check.sh OUT     (WS=0 skips the TMA check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_pdl_check.sh OUT}
WS=${WS:-1}
source scripts/gpu_stages.sh

stage "GPU test: the same tokens with PDL" 120 $PY -m pytest -q -m gpu tests/test_serve.py -k programmatic
stage "FP8 decode chain, PDL off and on" 180 $PY scripts/bench_pdl_chain.py --layers 4 --json "$OUT/pdl_chain.json"
grep -E "^QUANTKIT_PDL|bit for bit" "$LOG" >>"$SUMMARY"
if [ "$WS" = 1 ]; then
  stage "TMA GEMMs split against unsplit" 180 $PY scripts/check_tma_ws.py
  grep -E "^M = |^ |^projection" "$LOG" >>"$SUMMARY"
fi
echo "exit $status" | tee -a "$LOG"
exit $status
