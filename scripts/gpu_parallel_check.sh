#!/usr/bin/env bash
# Tensor/expert parallelism and serving on a machine of N GPUs (2, 4 or 8), in one command.
# Usage: scripts/gpu_parallel_check.sh OUT
#
#   1. the GPU tests of the serving loop (CUDA-graph decode = eager decode); SERVE_TESTS=0 skips them
#   2. TP=N, EP=N (and TP=2 x EP=2 on 2 GPUs) over NCCL against one process: tiny BF16 and FP8 checkpoints (dense
#      and fp8 backends) and a tiny Q8_0 GGUF (gguf backend; TINY=0 skips the three), a generated 2-layer
#      real-width MiniMax-M2 FP8 slice (fp8 backend) and, with AWQ=1, a real-width INT4 slice of LAYERS4 layers
#      (default 2; make-checkpoint --dtype awq; awq backend).
#      Slices already in WORK are reused: a second call on a machine still warm skips making them
#   3. `quantkit bench` on those slices, serving sweep and per-layer roofline: 1 GPU, TP=N and EP=N, in FP8 and
#      (AWQ=1) INT4
#
# CHECK=0 skips step 2 (CHECK_LIMIT: its seconds, default 300); BENCHES="fp8:tp1 awq:epN ..." picks the benchmarks
# of step 3 (default: all of them).
#
# Writes: OUT/summary.md (every table), OUT/log.txt, OUT/check_parallel*.json, OUT/bench_*.json and .png. Each
# stage has its own time limit and a failure does not stop the later stages; the exit code is non-zero if any
# stage failed. About 6 minutes on 2 H200s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_parallel_check.sh OUT}
WORK=${WORK:-/tmp/quantkit-gpu-parallel}
mkdir -p "$WORK"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SLICE=a-tiny-fp8-checkpoint CONC=1,2 OUTLEN=4: a dry run of this script on a CPU
CONC=${CONC:-1,4,32,128}
NGPU=${NGPU:-$($PY -c 'import torch; print(max(2, torch.cuda.device_count()))' 2>/dev/null || echo 2)}
# Experts split by intermediate size need (1536 / N) % 128 == 0: true up to 4 GPUs; on 8 the TP run splits attention
# 8 ways and the experts by expert (TP8 x EP8, TPN_EP=8), and pure TP8 is run once to show its refusal
TPN_EP=${TPN_EP:-$([ "$NGPU" -ge 8 ] && echo "$NGPU" || echo 1)}
DEGREES=${DEGREES:-$([ "$NGPU" = 2 ] && echo 2x1,1x2,2x2 || echo "${NGPU}x${TPN_EP},1x${NGPU}")}
SERVE_TESTS=${SERVE_TESTS:-1}
TINY=${TINY:-1}
AWQ=${AWQ:-0}
OUTLEN=${OUTLEN:-64}
CHECK_STAGE=${CHECK:-1}  # CHECK=0 skips the logits check
CHECK_LIMIT=${CHECK_LIMIT:-300}
BENCHES=${BENCHES:-fp8:tp1 fp8:tpN fp8:epN awq:tp1 awq:tpN awq:epN}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
source scripts/gpu_stages.sh

[ "$SERVE_TESTS" = 1 ] && stage "GPU tests: serving with CUDA graphs" 240 $PY -m pytest -q -m gpu tests/test_serve.py

TINY16="$WORK/tiny-bf16" TINY8="$WORK/tiny-fp8" SLICE=${SLICE:-$WORK/m2-2layers-fp8} LAYERS4=${LAYERS4:-2}
SLICE4=${SLICE4:-$WORK/m2-${LAYERS4}layers-int4}
rm -f "$WORK/check.md"
CASES=()
if [ "$TINY" = 1 ]; then
  [ -f "$TINY16/config.json" ] || stage "make tiny bf16" 60 $PY -m quantkit.cli make-checkpoint --preset tiny -o "$TINY16" --force
  [ -f "$TINY8/config.json" ] || stage "make tiny fp8" 60 $PY -m quantkit.cli make-checkpoint --preset tiny --dtype fp8 --seed 1 -o "$TINY8" --force
  [ -n "$(ls "$WORK"/tiny-gguf/*.gguf 2>/dev/null)" ] ||
    stage "make tiny Q8_0 GGUF" 120 $PY -m quantkit.cli convert "$TINY16" --to gguf --type q8_0 -o "$WORK/tiny-gguf" --force
  CASES+=("$TINY16" "$TINY8" "$WORK/tiny-gguf")
fi
[ -f "$SLICE/model.safetensors.index.json" ] ||
  stage "make real-width 2-layer FP8 slice" 240 $PY -m quantkit.cli make-checkpoint --preset minimax-m2 --layers 2 \
    --dtype fp8 -o "$SLICE" --force
CASES+=("$SLICE@fp8")
if [ "$AWQ" = 1 ]; then
  [ -f "$SLICE4/model.safetensors.index.json" ] ||
    stage "make real-width $LAYERS4-layer INT4 slice" 240 $PY -m quantkit.cli make-checkpoint --preset minimax-m2 \
      --layers "$LAYERS4" \
      --dtype awq -o "$SLICE4" --force
  CASES+=("$SLICE4")
fi

if [ "$CHECK_STAGE" = 1 ] && stage "NCCL logits vs one process ($DEGREES)" "$CHECK_LIMIT" $PY scripts/check_parallel.py "${CASES[@]}" \
    --device "$DEVICE" --degrees "$DEGREES" --json "$OUT/check_parallel.json" --md "$WORK/check.md"; then :; fi
[ -f "$WORK/check.md" ] && { echo; echo "## NCCL logits vs one process"; echo; cat "$WORK/check.md"; } >>"$SUMMARY"

BENCH=(--concurrency "$CONC" --input-len 128 --output-len "$OUTLEN" --per-layer --dtype bf16 --device "$DEVICE")
TPN=(--tp "$NGPU")
[ "$TPN_EP" = 1 ] || TPN+=(--ep "$TPN_EP")
SETUPS=("fp8 tp1" "fp8 tpN ${TPN[*]}" "fp8 epN --ep $NGPU")
[ "$AWQ" = 1 ] && SETUPS+=("awq tp1" "awq tpN ${TPN[*]}" "awq epN --ep $NGPU")
if [ "$TPN_EP" != 1 ]; then  # the degrees quantkit must refuse, with its one line
  { echo "== quantkit bench --tp $NGPU alone (expected: refused)"
    timeout 120 $PY -m quantkit.cli bench "$SLICE" --tp "$NGPU" --backend fp8 --device "$DEVICE" -o "$WORK/refused" \
      --concurrency 1 --output-len 4 2>&1 | tail -3
    echo "== exit ${PIPESTATUS[0]}"; } | tee -a "$LOG" >>"$SUMMARY"
fi
for setup in "${SETUPS[@]}"; do
  set -- $setup
  backend=$1 name=$2
  shift 2
  [[ " $BENCHES " == *" $backend:$name "* ]] || continue
  name=${name/N/$NGPU}
  [ "$name" = "tp$NGPU" ] && [ "$TPN_EP" != 1 ] && name=tp${NGPU}ep$TPN_EP
  [ "$backend" = fp8 ] && { ckpt=$SLICE; tag=$name; } || { ckpt=$SLICE4; tag=awq_$name; }
  dir="$WORK/bench_$tag"
  if ! stage "bench $backend $name" 200 $PY -m quantkit.cli bench "$ckpt" -o "$dir" "${BENCH[@]}" --backend "$backend" "$@"; then
    stage "bench $backend $name without CUDA graphs" 200 $PY -m quantkit.cli bench "$ckpt" -o "$dir" "${BENCH[@]}" \
      --backend "$backend" "$@" --no-cuda-graphs
  fi
  if [ -f "$dir/bench.json" ]; then
    cp "$dir/bench.json" "$OUT/bench_$tag.json"
    [ -f "$dir/bench.png" ] && cp "$dir/bench.png" "$OUT/bench_$tag.png"
    { echo; echo "## bench $backend $name"; echo; cat "$dir/bench.md"; } >>"$SUMMARY"
  fi
done
echo "exit $status" | tee -a "$LOG"
exit $status
