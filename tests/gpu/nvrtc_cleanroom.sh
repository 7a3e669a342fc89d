#!/usr/bin/env bash
# Clean-room check of the NVRTC build (issue 13 "Done when"), logs under $OUT (default ./cleanroom_out).
#   STEPS=install bash tests/gpu/nvrtc_cleanroom.sh   then STEPS=suites, then STEPS=ab (each < 10 min;
#   default: all three). Repo root, a GPU machine with a CUDA torch. The kernels go to the pack's
#   own cache (sageattn2/_build/kernels), emptied by the install step, kept for the later steps.
# The device has torch 2.11+cu130 installed and no internet, so its Python packages stay as they
# are (not a clean room for Python packages); what is made unreachable is the toolchain: PATH
# holds only the basic system tools and a `python` that runs the torch interpreter, with nvcc,
# gcc, g++, cc and ninja absent, and CUDA_HOME / CUDA_PATH unset.
# Then: install.py (timed) + self-check, both GPU suites, and an A/B of the attention benchmark
# (kernel and whole-call TOPS, error, host time per call) against the previous commit's nvcc build.
set -uo pipefail
OUT=${OUT:-$PWD/cleanroom_out}; mkdir -p "$OUT"
STEPS=${STEPS:-install suites ab}
want() { [[ " $STEPS " == *" $1 "* ]]; }
fail=0
BIN=/tmp/sa2_bin; rm -rf "$BIN"; mkdir -p "$BIN"
for t in bash sh env ls cat mkdir rm cp mv tar grep sed awk head tail tee date nproc timeout git uname dirname basename readlink; do
  p=$(command -v $t) && ln -sf "$p" "$BIN/$t"
done
# The interpreter that has torch, called by its full path: its own bin folder (which may hold
# ninja or nvcc from pip) stays off PATH.
PY=$(python3 -c 'import sys; print(sys.executable)')
printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > "$BIN/python"; chmod +x "$BIN/python"
CLEAN="env -u CUDA_HOME -u CUDA_PATH PATH=$BIN HOME=$HOME"
for t in nvcc gcc g++ cc ninja; do
  $CLEAN bash -c "command -v $t" >/dev/null && { echo "CLEAN ROOM BROKEN: $t reachable" | tee -a "$OUT/summary.txt"; fail=1; }
done
if want install; then
rm -rf sageattn2/_build/kernels
start=$(date +%s)
$CLEAN python install.py 2>&1 | tee "$OUT/install.log"; rc=${PIPESTATUS[0]}
echo "install.py + selfcheck: rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"; [ $rc = 0 ] || fail=1
start=$(date +%s)
$CLEAN python install.py --no-selfcheck > "$OUT/install_again.log" 2>&1
echo "second install (cache hit): $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
# The kernels only the suites use (every wgmma schedule, emulated INT4), so no test times out compiling.
$CLEAN python install.py --all --no-selfcheck > "$OUT/install_all.log" 2>&1
echo "install.py --all: rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
fi
if want suites; then
for suite in test_mma_kernels test_wgmma_kernels; do
  $CLEAN SA2_TEST_LOG="$OUT/$suite.jsonl" timeout 280 python -m pytest -q --maxfail=40 -p no:cacheprovider \
    tests/gpu/$suite.py > "$OUT/$suite.log" 2>&1
  rc=$?; echo "$suite: rc=$rc $(tail -1 "$OUT/$suite.log")" | tee -a "$OUT/summary.txt"; [ $rc = 0 ] || fail=1
done
fi
# A/B: the last nvcc revision, exported beside the tree and carried (the device copy has no git):
#   rm -rf .before && git archive --prefix=.before/ $(git log -1 --format=%H -- csrc/attn_mma.cu)^ | tar x
# built with the normal PATH (it needs nvcc and ninja).
if want ab; then
PREV=${BEFORE:-.before}
if [ -d "$PREV" ]; then
  (cd "$PREV" && TORCH_CUDA_ARCH_LIST=9.0 timeout 300 python3 install.py -j 16 --no-selfcheck) > "$OUT/prev_build.log" 2>&1 \
    || echo "previous build failed (see prev_build.log)" | tee -a "$OUT/summary.txt"
else
  echo "no $PREV: A/B skipped" | tee -a "$OUT/summary.txt"; PREV=
fi
for side in ${PREV:+prev} new; do
  dir=$PWD; [ $side = prev ] && dir=$PREV
  (cd "$dir" && timeout 240 python3 bench/bench_attention.py --breakdown \
    1x24x4608x128,1x40x32760x128) \
    > "$OUT/bench_$side.md" 2>&1 || echo "bench $side failed" | tee -a "$OUT/summary.txt"
  (cd "$dir" && timeout 120 python3 -m sageattn2.selfcheck) \
    > "$OUT/selfcheck_$side.md" 2>&1
done
echo "host µs/call: the 'host µs/call' column of selfcheck_prev.md / selfcheck_new.md and bench_*.md" >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
exit $fail
