#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck, initcheck and synccheck over every product kernel
# (tests/gpu/sanitize_cases.py: both families, every head dim, PV type, accumulator and
# schedule, causal, ragged tails, GQA) on small shapes. The kernel library must be built
# (install.py --all: the suites' schedules and emulated INT4).
#
#   OUT=... [SANITIZE_TIMEOUT=480] [TOOLS="memcheck racecheck"] bash tests/gpu/sanitize.sh [case-name filter]
#
# The tools run side by side (one small process each, so the whole script takes about
# SANITIZE_TIMEOUT at most). The caching allocator is off so every tensor is its own
# allocation: memcheck sees the true bounds, initcheck every buffer. Writes
# $OUT/sanitize_<tool>.txt (+ .rc), one verdict line per tool on stdout and
# $OUT/sanitize_summary.md (the table for bench/results/); exit 1 unless every tool is CLEAN
# (zero errors and every case ran).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/sanitize_out}
FILTER=${1:-}
LIMIT=${SANITIZE_TIMEOUT:-480}
read -r -a tools <<< "${TOOLS:-memcheck racecheck initcheck synccheck}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1

tree=$(git rev-parse --short HEAD 2>/dev/null) || tree="unknown (no git)"
[[ $tree == unknown* ]] || git diff --quiet HEAD 2>/dev/null || tree="$tree + uncommitted changes"
echo "compute-sanitizer $(compute-sanitizer --version | grep -oE '[0-9]{4}\.[0-9.]+' | head -1)" \
  "on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)," \
  "torch $(python3 -c 'import torch; print(torch.__version__)'), tree $tree," \
  "time limit ${LIMIT} s per tool, tools side by side" > "$OUT/sanitize_header.txt"

run_tool() {
  local tool=$1 start
  start=$(date +%s)
  timeout "$LIMIT" compute-sanitizer --tool "$tool" --print-limit 100 --error-exitcode 9 \
    python3 tests/gpu/sanitize_cases.py "$FILTER" > "$OUT/sanitize_$tool.txt" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - start ))" > "$OUT/sanitize_$tool.rc"
}

for tool in "${tools[@]}"; do run_tool "$tool" & done
wait
cat "$OUT/sanitize_header.txt"
python3 tests/gpu/sanitize_cases.py --summarize "$OUT" "${tools[@]}"
