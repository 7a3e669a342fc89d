#!/usr/bin/env bash
# Device script for the Hopper wgmma kernels: build the sm_90a library, check ptxas output,
# run the GPU tests, run the benchmark. Everything is logged under $OUT (default ./wgmma_out).
#   tests/gpu/run_wgmma.sh [quick|full|tests|bench|profile|all] [extra pytest args...]
#   quick: tests + benchmark of 4 shapes with every schedule; full: tests + all shapes with
#   every schedule (kernel-only and end to end) + quantization breakdown at 4.6K and 32K;
#   profile: tests + ncu of the main kernels (Nsight Compute locks clocks: compare ratios);
#   all: tests + ncu + the full benchmark. BENCH_SHAPES overrides the benchmark's shapes.
# Builds every sm_90a kernel with install.py --all through NVRTC (ptxas -v through SAGEATTN2_NVRTC_FLAGS).
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-quick}
shift || true
OUT=${OUT:-$PWD/wgmma_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/run.log
exec > >(tee -a "$LOG") 2>&1

echo "== device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
nvcc --version | tail -1

echo "== build (install.py through NVRTC, every schedule, ptxas -v)"
export SAGEATTN2_CACHE_DIR=${SAGEATTN2_CACHE_DIR:-/tmp/sa2_wgmma_cache}
rm -rf "$SAGEATTN2_CACHE_DIR"  # a cache hit would print no ptxas lines
TORCH_CUDA_ARCH_LIST=9.0 SAGEATTN2_NVRTC_FLAGS="${SAGEATTN2_NVRTC_FLAGS:-} -Xptxas -v" \
  python3 install.py --all -j 16 --no-selfcheck > "$OUT/ptxas.log" 2>&1 \
  || { grep -v "ptxas info" "$OUT/ptxas.log" | tail -30; echo "BUILD FAILED"; exit 1; }
echo "-- ptxas (wgmma kernels): spills per kernel <D, PV, Schedule, WGs>"
awk '/Compiling entry/{k = ""; if ($0 ~ /wgmma_attn/) {k = $0; sub(/.*TraitsIL/, "", k); sub(/EEEEEvNS.*/, "", k)}}
     /spill stores/{if (k != "") print k": "$0}' "$OUT/ptxas.log" | sed -E 's/ELNS_6PVTypeE/ pv/; s/ELNS0_8ScheduleE/ sched/; s/ELi/ wgs/' | sort | uniq
grep -hE "C7515|C7511|C7508|warning|error" "$OUT/ptxas.log" | sort | uniq -c | head -20
python3 -m sageattn2.build extract /tmp/sa2_cubins "$SAGEATTN2_CACHE_DIR"
for f in /tmp/sa2_cubins/sm_90a/wgmma-*.cubin; do
  echo "Function : $(basename "$f" .cubin)"; cuobjdump -sass "$f" 2>/dev/null | grep -v "Function :"
done > /tmp/sass.txt
for k in wgmma-d128-fp8-sequential3wg wgmma-d128-fp8-sequential; do
  awk -v k="$k" '/^Function :/{f = ($3 == k)} f' /tmp/sass.txt > "/tmp/sass_$k.txt"
  echo "-- SASS opcode histogram $k (whole kernel)"
  grep -oP '^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?\K[A-Z0-9_.]+' "/tmp/sass_$k.txt" | sort | uniq -c | sort -rn | head -40 | tr '\n' ';'; echo
done
awk '/^Function :/{f=$3} /GMMA|STL|LDL/{split($0,a,/[ ;]+/); for(i in a) if(a[i] ~ /GMMA|^STL|^LDL/) c[f" "a[i]]++} END{for(k in c) print c[k], k}' /tmp/sass.txt | sort -k2 | head -60

if [ "$MODE" != bench ]; then
  echo "== tests"
  rm -f "$OUT/test_metrics.jsonl"
  export SA2_TEST_LOG=$OUT/test_metrics.jsonl
  T=tests/gpu/test_wgmma_kernels.py::test_lengths_and_head_dims
  echo "-- smoke (one case per kernel family at hd128)"
  timeout 90 python3 -m pytest -q "$T[128-sequential3wg-4173-full-fp8]" "$T[128-overlap-4173-full-fp8]" \
    "$T[128-overlap-4173-full-fp16]" "$T[64-sequential3wg-4173-full-fp8]" \
    tests/gpu/test_wgmma_kernels.py::test_fused_quantizers_match_torch_oracle 2>&1 | tail -15
  echo "-- full suite"
  timeout 150 python3 -m pytest tests/gpu/test_wgmma_kernels.py -q --tb=short "$@" > "$OUT/pytest.log" 2>&1
  grep -E "^(FAILED|ERROR)|^E  " "$OUT/pytest.log" | head -30; tail -1 "$OUT/pytest.log"
  python3 - <<'PY'
import json, os
path = os.environ["SA2_TEST_LOG"]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
print(f"{len(rows)} cases logged")
for key in ("fp8", "fp16"):
    r = [x for x in rows if x.get("pv") == key and "lse_ref" in x]
    if r:
        print(key, "; ".join(f"worst vs {n}: cos {min(x['cos_' + n] for x in r):.6f} relL1 {max(x['rel_l1_' + n] for x in r):.5f} lse {max(x['lse_' + n] for x in r):.2e}" for n in ("ref", "deq", "exact")))
for x in rows:
    if x.get("case") == "long":
        print("long", x)
PY
fi

if [ "$MODE" = profile ] || [ "$MODE" = all ]; then
  echo "== ncu (fp8/fp16 schedules, 1x24x8192 hd128 and hd64)"
  cat > /tmp/prof_wgmma.py <<'PY'
import torch
from sageattn2.backends import wgmma
from sageattn2.config import AttnConfig, Family, PVDType
for d, pv, schedules in ((128, PVDType.FP8, ("sequential3wg", "sequential")),
                         (128, PVDType.FP16, ("overlap",)), (64, PVDType.FP8, ("sequential3wg",))):
    q, k, v = (torch.randn(1, 24, 8192, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    prep = wgmma.prepare(q, k, v, layout="HND", cfg=AttnConfig(pv_dtype=pv, family=Family.WGMMA), is_causal=False)
    for schedule in schedules:
        wgmma.run(prep, schedule=schedule)
torch.cuda.synchronize()
PY
  PYTHONPATH=$PWD timeout 240 ncu -k regex:attention_kernel --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section InstructionStats python3 /tmp/prof_wgmma.py > "$OUT/ncu.txt" 2>&1
  grep -E "attention_kernel|Duration|SM Frequency|Issue Slots Busy|Compute \(SM\) Throughput|Executed Ipc A|Warp Cycles Per Issued|No Eligible|Active Warps Per" "$OUT/ncu.txt" | cut -c1-150 | head -80
fi

if [ "$MODE" != tests ] && [ "$MODE" != profile ]; then
  echo "== bench"
  if [ "$MODE" = full ] || [ "$MODE" = bench ] || [ "$MODE" = all ]; then BARGS="--breakdown 1x24x4608x128,1x40x32760x128"; else BARGS="--quick"; fi
  [ -n "${BENCH_SHAPES:-}" ] && BARGS="$BARGS --shapes $BENCH_SHAPES"
  BARGS="$BARGS --all-schedules"
  timeout 400 python3 bench/bench_attention.py $BARGS --out "$OUT/bench_attention.md" > "$OUT/bench.log" 2>&1
  cat "$OUT/bench_attention.md" 2>/dev/null || tail -30 "$OUT/bench.log"
fi
