#!/usr/bin/env bash
# Host (CPU) µs per attention call on a GPU, and the suites that drive the launch path.
# Builds this tree (install.py), then: bench/bench_host.py (each backend's attention(), sageattn
# per level, SDPA), the self-check table ("host µs/call"), the --breakdown host column, and the
# two kernel suites. With BEFORE=<an exported earlier revision> the same bench, self-check and
# breakdown run for it too, interleaved (after, before, after, before) on the same card:
#   rm -rf .before && git archive --prefix=.before/ REV csrc sageattn2 install.py \
#     requirements.txt pyproject.toml | tar x        # then carry .before
#   BEFORE=.before bash tests/gpu/host_cost.sh
# STEPS="build bench selfcheck breakdown suites" (default: all). Logs and tables go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/host_out}
STEPS=${STEPS:-build bench selfcheck breakdown suites}
BEFORE=${BEFORE:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# Both trees compile the same kernel sources: one cache serves both.
export SAGEATTN2_CACHE_DIR=${SAGEATTN2_CACHE_DIR:-$PWD/sageattn2/_build/kernels}
want() { [[ " $STEPS " == *" $1 "* ]]; }
sides() { echo after; [ -n "$BEFORE" ] && echo before; }
root() { [ "$1" = after ] && echo . || echo "$BEFORE"; }
rc=0

if want build; then
  python3 install.py -j 16 --no-selfcheck > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
fi
if want bench; then
  for round in 1 2; do
    for side in $(sides); do
      timeout 120 python3 bench/bench_host.py --package-root "$(root "$side")" \
        --out "$OUT/bench_host_${side}_$round.md" > "$OUT/bench_host_${side}_$round.log" 2>&1 || rc=1
    done
  done
fi
if want selfcheck; then
  for side in $(sides); do
    (cd "$(root "$side")" && timeout 150 python3 -m sageattn2.selfcheck) > "$OUT/selfcheck_$side.md" 2>&1 || rc=1
  done
fi
if want breakdown; then
  for side in $(sides); do
    timeout 150 python3 bench/bench_attention.py --no-table --package-root "$(root "$side")" \
      --breakdown 1x24x4608x128,1x40x32760x128 --out "$OUT/breakdown_$side.md" > "$OUT/breakdown_$side.log" 2>&1 || rc=1
  done
fi
if want suites; then
  timeout 240 python3 -m pytest tests/gpu/test_wgmma_kernels.py tests/gpu/test_mma_kernels.py -x -q \
    -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1 || rc=1
fi

echo "================ summary"
for f in "$OUT"/bench_host_*.md; do [ -f "$f" ] && { echo "== $(basename "$f")"; cat "$f"; }; done
for side in $(sides); do
  [ -f "$OUT/selfcheck_$side.md" ] && { echo "== selfcheck $side"; grep -E "^\||selfcheck\]" "$OUT/selfcheck_$side.md"; }
  [ -f "$OUT/breakdown_$side.md" ] && { echo "== breakdown $side"; grep -E "^\| [0-9]" "$OUT/breakdown_$side.md" | cut -d'|' -f2-7; }
done
[ -f "$OUT/gpu_tests.txt" ] && { echo "== GPU suites"; tail -3 "$OUT/gpu_tests.txt"; }
exit $rc
