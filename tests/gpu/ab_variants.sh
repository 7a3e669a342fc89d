#!/usr/bin/env bash
# A/B of kernel build variants on one card in one call: each variant is built by install.py with
# its own SAGEATTN2_NVCC_FLAGS into its own build dir, then bench_attention.py times it on the
# same shapes (cuDNN re-measured in every table). Tables go to $OUT/ab_<name>.md.
#
#   VARIANTS="base: alt:-DSA2_MY_SWITCH=0,-DSA2_OTHER=1" SHAPES=1x24x4096x128,1x40x32760x128 \
#     BENCH_ARGS=--all-schedules bash tests/gpu/ab_variants.sh
#
# A variant is name:flags (flags comma-separated); the switches are whatever -D guards the
# experiment under test adds to the kernel sources (none are kept once a winner is chosen).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/ab_out}
SHAPES=${SHAPES:-1x24x4096x128,1x24x8192x128,1x40x32760x128,1x24x8192x64}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

for v in ${VARIANTS:-base:}; do
  name=${v%%:*} flags=${v#*:}
  dir=/tmp/sa2_ab/$name
  SAGEATTN2_BUILD_DIR=$dir SAGEATTN2_NVCC_FLAGS="${flags//,/ }" TORCH_CUDA_ARCH_LIST=9.0 \
    python3 install.py -j 16 --no-selfcheck > "$OUT/ab_$name.build.log" 2>&1 \
    || { echo "$name: build failed"; tail -5 "$OUT/ab_$name.build.log"; continue; }
  SAGEATTN2_BUILD_DIR=$dir timeout 300 python3 bench/bench_attention.py --shapes "$SHAPES" ${BENCH_ARGS:-} \
    --out "$OUT/ab_$name.md" > "$OUT/ab_$name.log" 2>&1
  echo "== $name ($flags)"
  grep -E "^\| [0-9]" "$OUT/ab_$name.md" | cut -d'|' -f2-6 | sed -E 's/\[[^]]*\]//g'
done
