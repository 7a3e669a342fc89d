#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck, initcheck and synccheck over every product kernel
# (tests/gpu/sanitize_cases.py: both families, every head dim, PV type and schedule, causal,
# ragged tails, GQA) on small shapes. The kernel library must be built (install.py).
#
#   OUT=... bash tests/gpu/sanitize.sh [case-name filter]
#
# The four tools run side by side (one small process each). The caching allocator is off so
# every tensor is its own allocation: memcheck sees the true bounds, initcheck every buffer.
# Writes $OUT/sanitize_<tool>.txt and $OUT/sanitize_summary.txt; exit 1 unless every tool
# reports zero errors and every case ran.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/sanitize_out}
FILTER=${1:-}
LIMIT=${SANITIZE_TIMEOUT:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1

run_tool() {
  local tool=$1
  local start=$(date +%s)
  timeout "$LIMIT" compute-sanitizer --tool "$tool" --print-limit 100 --error-exitcode 9 \
    python3 tests/gpu/sanitize_cases.py "$FILTER" > "$OUT/sanitize_$tool.txt" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - start ))" > "$OUT/sanitize_$tool.rc"
}

tools=(memcheck racecheck initcheck synccheck)
for tool in "${tools[@]}"; do run_tool "$tool" & done
wait

status=0
{
  echo "compute-sanitizer $(compute-sanitizer --version | grep -oE '[0-9]{4}\.[0-9.]+' | head -1) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  for tool in "${tools[@]}"; do
    f=$OUT/sanitize_$tool.txt
    rc=$(cat "$OUT/sanitize_$tool.rc")
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$f" | tail -1)
    cases=$(grep -E "^CASES " "$f" | tail -1)
    # racecheck: "N hazards displayed (E errors, W warnings)"; the others: "ERROR SUMMARY: E errors".
    errors=$(echo "$summary" | grep -oE '[0-9]+ errors?' | head -1 | grep -oE '[0-9]+')
    echo "$tool: $rc | ${summary:-no summary line} | ${cases:-no CASES line}"
    if [ -z "$errors" ] || [ "$errors" != 0 ] || ! [[ "$rc" == rc=0* ]] || [ -z "$cases" ] \
       || [ "$(echo "$cases" | awk '{print $2}')" != "$(echo "$cases" | awk '{print $4}')" ]; then
      status=1
      grep -vE "^(ok |CASES )" "$f" | grep -E "=========|RAISED|NON-FINITE" | head -20 | sed 's/^/    /'
    fi
  done
  echo "status: $([ $status = 0 ] && echo CLEAN || echo FAILED)"
} | tee "$OUT/sanitize_summary.txt"
grep -q "status: CLEAN" "$OUT/sanitize_summary.txt"
