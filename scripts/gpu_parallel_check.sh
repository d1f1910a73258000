#!/usr/bin/env bash
# Tensor/expert parallelism and serving on a 2-GPU machine, in one command. Usage: scripts/gpu_parallel_check.sh OUT
#
#   1. the GPU tests of the serving loop (CUDA-graph decode = eager decode)
#   2. TP=2, EP=2 and TP=2 x EP=2 over NCCL against one process: tiny BF16 and FP8 checkpoints (dense and fp8
#      backends) and a generated 2-layer real-width MiniMax-M2 FP8 slice (fp8 backend)
#   3. `quantkit bench` on that slice, serving sweep and per-layer roofline: 1 GPU, TP=2 and EP=2
#
# Writes (8 files at most): OUT/summary.md (every table), OUT/log.txt, OUT/check_parallel.json,
# OUT/bench_{tp1,tp2,ep2}.json, OUT/bench_{tp1,tp2}.png. Each stage has its own time limit and a failure does
# not stop the later stages; the exit code is non-zero if any stage failed. About 6 minutes on 2 H200s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_parallel_check.sh OUT}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/quantkit-gpu-parallel}
mkdir -p "$WORK"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SLICE=a-tiny-fp8-checkpoint CONC=1,2 OUTLEN=4: a dry run of this script on a CPU
CONC=${CONC:-1,4,32,128}
OUTLEN=${OUTLEN:-64}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONWARNINGS=ignore
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.md"
: >"$LOG"
: >"$SUMMARY"
status=0
BUDGET=${BUDGET:-560}  # seconds for the whole script: stages are cut to what is left, and skipped under 20 s
stage() {  # stage NAME SECONDS CMD...: run, log, keep going
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, $left s of the budget left" | tee -a "$LOG"
    status=1
    return 1
  fi
  echo "== $name ($(date -u +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
  return $rc
}

# quantkit into this python, without dependencies (none can be fetched here)
$PY -c 'import quantkit.kernels, quantkit.evals' 2>/dev/null ||
  $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
$PY -c 'import torch, quantkit; print("torch", torch.__version__, "GPUs", torch.cuda.device_count(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "commit", __import__("subprocess").run(["git", "rev-parse", "--short", "HEAD"],
  capture_output=True, text=True).stdout.strip())' 2>&1 | tee -a "$LOG" "$SUMMARY"

stage "GPU tests: serving with CUDA graphs" 240 $PY -m pytest -q -m gpu tests/test_serve.py

TINY16="$WORK/tiny-bf16" TINY8="$WORK/tiny-fp8" SLICE=${SLICE:-$WORK/m2-2layers-fp8}
rm -f "$WORK/check.md"
[ -f "$TINY16/config.json" ] || stage "make tiny bf16" 60 $PY -m quantkit.cli make-checkpoint --preset tiny -o "$TINY16" --force
[ -f "$TINY8/config.json" ] || stage "make tiny fp8" 60 $PY -m quantkit.cli make-checkpoint --preset tiny --dtype fp8 --seed 1 -o "$TINY8" --force
[ -f "$SLICE/model.safetensors.index.json" ] ||
  stage "make real-width 2-layer FP8 slice" 240 $PY -m quantkit.cli make-checkpoint --preset minimax-m2 --layers 2 \
    --dtype fp8 -o "$SLICE" --force

if stage "NCCL logits vs one process" 300 $PY scripts/check_parallel.py "$TINY16" "$TINY8" "$SLICE@fp8" \
    --device "$DEVICE" --degrees 2x1,1x2,2x2 --json "$OUT/check_parallel.json" --md "$WORK/check.md"; then :; fi
[ -f "$WORK/check.md" ] && { echo; echo "## NCCL logits vs one process"; echo; cat "$WORK/check.md"; } >>"$SUMMARY"

BENCH=(--concurrency "$CONC" --input-len 128 --output-len "$OUTLEN" --per-layer --backend fp8 --dtype bf16
  --device "$DEVICE")
for setup in "tp1" "tp2 --tp 2" "ep2 --ep 2"; do
  set -- $setup
  name=$1
  shift
  dir="$WORK/bench_$name"
  if ! stage "bench $name" 200 $PY -m quantkit.cli bench "$SLICE" -o "$dir" "${BENCH[@]}" "$@"; then
    stage "bench $name without CUDA graphs" 200 $PY -m quantkit.cli bench "$SLICE" -o "$dir" "${BENCH[@]}" "$@" \
      --no-cuda-graphs
  fi
  if [ -f "$dir/bench.json" ]; then
    cp "$dir/bench.json" "$OUT/bench_$name.json"
    [ "$name" = ep2 ] || cp "$dir/bench.png" "$OUT/bench_$name.png"
    { echo; echo "## bench $name"; echo; cat "$dir/bench.md"; } >>"$SUMMARY"
  fi
done
echo "exit $status" | tee -a "$LOG"
exit $status
