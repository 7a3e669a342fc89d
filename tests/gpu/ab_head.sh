#!/usr/bin/env bash
# A/B of the working tree against an earlier revision exported beside it, on one card in one
# call: each tree built by its own install.py (plus optional -D variants of this tree), the
# wgmma suite on this tree's builds, then bench_attention.py timing them in the order
# before, after, variants, after, before (cuDNN re-measured in every table).
#
#   here:   rm -rf .before && git archive --prefix=.before/ REV csrc sageattn2 install.py \
#             requirements.txt pyproject.toml | tar x          (.before is git-ignored locally)
#   device: carry .before;  OUT=... [SHAPES=...] [VARIANTS="name:-DFLAG=1,-DOTHER=2 ..."] \
#             bash tests/gpu/ab_head.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/ab_out}
BEFORE=${BEFORE:-.before}
SHAPES=${SHAPES:-1x24x4096x128,1x24x4608x128,1x24x8192x128,1x40x32760x128,1x24x8192x64,1x32x8192x128c}
RAW=$OUT/raw
mkdir -p "$RAW"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0

# name, source tree, build dir, nvcc flags (comma-separated)
build() {
  (cd "$2" && SAGEATTN2_BUILD_DIR=$3 SAGEATTN2_NVCC_FLAGS="${4//,/ }" \
    python3 install.py -j 16 --no-selfcheck) > "$RAW/build_$1.log" 2>&1 \
    || { echo "$1: build failed"; tail -5 "$RAW/build_$1.log"; }
}
# name, package root, build dir
bench() {
  SAGEATTN2_BUILD_DIR=$3 timeout 240 python3 bench/bench_attention.py --no-mma --shapes "$SHAPES" \
    --package-root "$2" --out "$RAW/$1.md" > "$RAW/$1.log" 2>&1
  echo "== $1"
  grep -E "^\| [0-9]" "$RAW/$1.md" | cut -d'|' -f2-6 | sed -E 's/\[[^]]*\]//g'
}

build before "$BEFORE" "$PWD/$BEFORE/sageattn2/_build" ""
build after . "$PWD/sageattn2/_build" ""
for v in ${VARIANTS:-}; do
  build "${v%%:*}" . "/tmp/sa2_ab/${v%%:*}" "${v#*:}"
done
echo "tests after: $(timeout 150 python3 -m pytest tests/gpu/test_wgmma_kernels.py -x -q \
  -p no:cacheprovider 2>&1 | tail -1)"
for v in ${VARIANTS:-}; do
  name=${v%%:*}
  echo "tests $name: $(SAGEATTN2_BUILD_DIR=/tmp/sa2_ab/$name timeout 150 python3 -m pytest \
    tests/gpu/test_wgmma_kernels.py -x -q -p no:cacheprovider 2>&1 | tail -1)"
done
bench before1 "$BEFORE" "$PWD/$BEFORE/sageattn2/_build"
bench after1 . "$PWD/sageattn2/_build"
for v in ${VARIANTS:-}; do
  bench "${v%%:*}" . "/tmp/sa2_ab/${v%%:*}"
done
bench after2 . "$PWD/sageattn2/_build"
bench before2 "$BEFORE" "$PWD/$BEFORE/sageattn2/_build"
tar czf "$OUT/ab_raw.tgz" -C "$OUT" raw && rm -rf "$RAW"
