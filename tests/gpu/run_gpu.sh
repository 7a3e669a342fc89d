#!/usr/bin/env bash
# Device script for the mma.sync family (csrc/include/sa2/quant_kernels.cuh, attn_mma.cuh).
#
#   tests/gpu/run_gpu.sh                  build sm_90a, GPU tests, benchmark, memcheck (device)
#   tests/gpu/run_gpu.sh compile [archs]  compile-only check here, default "80 86 89 90 120",
#                                         printing ptxas registers/spills per kernel
#
# The kernels are built by install.py through NVRTC (ptxas -v added through SAGEATTN2_NVRTC_FLAGS)
# into their own SAGEATTN2_CACHE_DIR. Logs go under $OUT (default ./mma_out).
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-device}
OUT=${OUT:-$PWD/mma_out}
export PYTHONUNBUFFERED=1

# build ARCH BUILD_DIR LOG [install.py args]: install.py for one arch ("90" -> 9.0), ptxas -v
# output in LOG. Prints the compiler's messages and returns non-zero on failure.
build() {
  local arch=$1 dir=$2 log=$3
  shift 3
  TORCH_CUDA_ARCH_LIST="${arch%?}.${arch: -1}" SAGEATTN2_CACHE_DIR=$dir \
    SAGEATTN2_NVRTC_FLAGS="${SAGEATTN2_NVRTC_FLAGS:-} -Xptxas -v" python3 install.py --all -j "$JOBS" "$@" > "$log" 2>&1 \
    || { grep -v "ptxas info" "$log" | tail -30; echo "FAILED sm_$arch"; return 1; }
}

# ptxas summary: kernel, registers, spill bytes.
ptxas_table() {
  awk '
    /Compiling entry function/ { match($0, /_Z[^'"'"']*/); fn = substr($0, RSTART, RLENGTH) }
    /spill stores/ { split($0, a, /[ ,]+/); for (i = 1; i <= length(a); i++) { if (a[i] == "stores") st = a[i-3]; if (a[i] == "loads") ld = a[i-3] } }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); printf "%s regs %s spill st/ld %s/%s\n", fn, substr($0, RSTART + 5, RLENGTH - 5), st, ld }' "$1" |
    sed -E -e 's/_ZN3sa215attn_mma_kernelINS_13AttnMmaTraitsILi([0-9]+)ELNS_6QKTypeE([0-9])ELNS_6PVTypeE([0-9])EEEEEvNS_13MmaAttnParamsE/attn_mma D=\1 qk(0=int8,1=int4)=\2 pv(0=f16,1=bf16,2=fp8)=\3/' -e 's/_ZN3sa28quantize[0-9]+([a-z_0-9]+kernel)INS_[0-9]+([a-z0-9]+)E(Li([0-9]+)ELi([0-9]+)E)?.*( regs)/quant \1 \2 D=\4 kinds=\5\6/' | sort
  grep -h "warning" "$1" | sort | uniq -c | head
}

if [ "$MODE" = compile ]; then
  shift
  status=0
  for arch in ${*:-80 86 89 90 120}; do
    start=$(date +%s)
    rm -rf "/tmp/sa2_mma_obj/sm_$arch"  # an up-to-date build would print no ptxas lines
    mkdir -p /tmp/sa2_mma_obj
    build "$arch" "/tmp/sa2_mma_obj/sm_$arch" "/tmp/sa2_mma_obj/sm_$arch.log" --compile-only || status=1
    echo "== sm_$arch: $(( $(date +%s) - start )) s with $JOBS jobs"
    ptxas_table "/tmp/sa2_mma_obj/sm_$arch.log"
  done
  exit $status
fi

mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
echo "== device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
nvcc --version | tail -1

echo "== build sm_90a (install.py)"
export SAGEATTN2_CACHE_DIR=/tmp/sa2_mma_build
rm -rf "$SAGEATTN2_CACHE_DIR"
start=$(date +%s)
build 90 "$SAGEATTN2_CACHE_DIR" "$OUT/build.log" --no-selfcheck || { echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
ptxas_table "$OUT/build.log" | tee "$OUT/ptxas.txt"

echo "== tests"
export SA2_TEST_LOG=$OUT/metrics.jsonl
rm -f "$SA2_TEST_LOG"
# --maxfail instead of -x: one device run must report every broken combination at once.
timeout 240 python3 -m pytest tests/gpu/test_mma_kernels.py -q -rfEs --maxfail=40 -p no:cacheprovider 2>&1 | tail -80 | tee "$OUT/pytest.txt"

echo "== bench"
timeout 90 python3 tests/gpu/bench_mma.py 2>&1 | tee "$OUT/bench.txt"
timeout 60 python3 tests/gpu/bench_mma.py --profile 2>&1 | grep "^profile" | tee "$OUT/profile.txt"

echo "== compute-sanitizer memcheck (tiny cases)"
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 python3 tests/gpu/bench_mma.py --sanitize 2>&1 | tail -25 | tee "$OUT/memcheck.txt"

echo "== summary"
grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -3
python3 - <<'PY'
import json, os
path = os.environ["SA2_TEST_LOG"]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
acc = [r for r in rows if r.get("kind") == "accuracy"]
for r in acc:
    print(f"accuracy {r['precision']:10s} {r['shape']}: vs exact cos {r['cos']:.6f} relL1 {r['rel_l1']:.4f}; ref vs exact cos {r['ref_cos']:.6f} relL1 {r['ref_rel_l1']:.4f}")
cmp = [r for r in rows if r.get("kind") == "vs_reference"]
for key in ("rel_l1", "vs_ref_rel_l1", "lse_err", "lse_err_ref"):
    have = [r for r in cmp if key in r]
    if have:
        worst = max(have, key=lambda r: r[key])
        print(f"{len(have)} cases: worst {key} {worst[key]:.2e} ({worst['case']})")
mis = [r for r in rows if r.get("kind") == "quant_mismatch" and r["count"]]
for r in mis:
    print(f"quantizer one-step differences: {r['what']} {r['count']} of {r['of']}")
PY
grep -E "^(TOPS|level)" "$OUT/bench.txt"
grep -E "ERROR SUMMARY" "$OUT/memcheck.txt"
