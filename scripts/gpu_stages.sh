# Sourced by the scripts/gpu_*.sh runners: a log and a summary under $OUT, stages with time limits cut to what is
# left of $BUDGET seconds (a failed stage does not stop the later ones; $status becomes 1), quantkit installed into
# $PY without dependencies (none can be fetched on the GPU machines), and a first line naming the software and the
# code. COMMIT=...: the code's commit where a copied tree's git metadata may not be current.
# Sets PY (python3), BUDGET (560) unless given, and PYTHONWARNINGS=ignore; makes $OUT.
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${BUDGET:-560}  # seconds for the whole script: stages are cut to what is left, and skipped under 10 s
export PYTHONWARNINGS=ignore
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.md"
: >"$LOG"
: >"$SUMMARY"
status=0
stage() {  # stage NAME SECONDS CMD...: run, log, keep going
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then
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
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export QUANTKIT_COMMIT=$COMMIT
$PY -c 'import quantkit.kernels, quantkit.evals' 2>/dev/null ||
  $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
$PY -c 'import torch, triton, quantkit; print("torch", torch.__version__, "triton", triton.__version__, "GPUs",
  torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
  "commit", "'"$COMMIT"'")' 2>&1 | tee -a "$LOG" "$SUMMARY"
