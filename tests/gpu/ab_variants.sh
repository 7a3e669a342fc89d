#!/usr/bin/env bash
# A/B of kernel builds on one card in one call. Each side is built by install.py into its own
# cache / build dir (SAGEATTN2_CACHE_DIR for NVRTC trees, SAGEATTN2_BUILD_DIR for older nvcc ones): this tree's -D variants (VARIANTS), and optionally an earlier revision exported
# beside the tree (BEFORE). The wgmma suite runs on every build of this tree, then
# bench_attention.py times the sides in the order before, variants..., variants again, before
# (cuDNN re-measured in every table). Logs and tables end up in $OUT/ab_raw.tgz.
#
#   VARIANTS="base: alt:-DSA2_MY_SWITCH=0,-DSA2_OTHER=1" SHAPES=1x24x4096x128,1x40x32760x128 \
#     BENCH_ARGS=--all-schedules bash tests/gpu/ab_variants.sh
#   against a revision (here: rm -rf .before && git archive --prefix=.before/ REV csrc sageattn2
#   install.py requirements.txt pyproject.toml | tar x; carry .before):
#     BEFORE=.before bash tests/gpu/ab_variants.sh
#
# A variant is name:flags (flags comma-separated); the switches are whatever -D guards the
# experiment under test adds to the kernel sources (none are kept once a winner is chosen).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/ab_out}
BEFORE=${BEFORE:-}
VARIANTS=${VARIANTS:-after:}
SHAPES=${SHAPES:-1x24x4096x128,1x24x4608x128,1x24x8192x128,1x40x32760x128,1x24x8192x64,1x32x8192x128c}
RAW=$OUT/raw
mkdir -p "$RAW"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0

# name, source tree, build dir, compiler flags (comma-separated; NVRTC or, for an older tree, nvcc)
build() {
  (cd "$2" && SAGEATTN2_BUILD_DIR=$3 SAGEATTN2_CACHE_DIR=$3 SAGEATTN2_NVCC_FLAGS="${4//,/ }" \
    SAGEATTN2_NVRTC_FLAGS="${4//,/ }" python3 install.py -j 16 --no-selfcheck $( [ "$2" = . ] && echo --all )) \
    > "$RAW/build_$1.log" 2>&1 \
    || { echo "$1: build failed"; tail -5 "$RAW/build_$1.log"; }
}
# table name, package root, build dir
bench() {
  SAGEATTN2_BUILD_DIR=$3 SAGEATTN2_CACHE_DIR=$3 timeout 300 python3 bench/bench_attention.py --no-mma --shapes "$SHAPES" \
    ${BENCH_ARGS:-} --package-root "$2" --out "$RAW/$1.md" > "$RAW/$1.log" 2>&1
  echo "== $1"
  grep -E "^\| [0-9]" "$RAW/$1.md" | cut -d'|' -f2-6 | sed -E 's/\[[^]]*\]//g'
}

[ -n "$BEFORE" ] && build before "$BEFORE" "$PWD/$BEFORE/sageattn2/_build" ""
for v in $VARIANTS; do
  build "${v%%:*}" . "/tmp/sa2_ab/${v%%:*}" "${v#*:}"
done
for v in $VARIANTS; do
  name=${v%%:*}
  echo "tests $name: $(SAGEATTN2_CACHE_DIR=/tmp/sa2_ab/$name timeout 150 python3 -m pytest \
    tests/gpu/test_wgmma_kernels.py -x -q -p no:cacheprovider 2>&1 | tail -1)"
done
[ -n "$BEFORE" ] && bench before1 "$BEFORE" "$PWD/$BEFORE/sageattn2/_build"
for round in 1 2; do
  for v in $VARIANTS; do
    bench "${v%%:*}$round" . "/tmp/sa2_ab/${v%%:*}"
  done
done
[ -n "$BEFORE" ] && bench before2 "$BEFORE" "$PWD/$BEFORE/sageattn2/_build"
tar czf "$OUT/ab_raw.tgz" -C "$OUT" raw && rm -rf "$RAW"
