#!/usr/bin/env bash
# One device round for the mma.sync family against thu-ml's sm80 kernel (issue 15), on H100:
#
#   bash tests/gpu/rtx_round.sh [build] [test] [bench] [ncu]     (default: all four, in order)
#
#   build  our kernels for this GPU with NVRTC (install.py --all: the accumulator variants dispatch
#          does not pick too; registers and spills from the cubins) and thu-ml's fused
#          quantizers + sm80 kernel (tests/gpu/build_thuml.sh, from .thirdparty/SageAttention,
#          carried), in parallel
#   test   the mma GPU suite (tests/gpu/test_mma_kernels.py: FP16 accumulation included); with
#          TEST_VARIANT=name:flags (an MMA_VARIANTS entry) on that variant's build
#   bench  bench/bench_attention.py at hd64/hd128, 4K-32K and causal: our mma int8+fp16 whole
#          call vs thu-ml `sageattn_qk_int8_pv_fp16_cuda`, same run; then the A/B of kernel
#          switches (MMA_VARIANTS, tests/gpu/mma_ab.py: base, variants, base again); then fp16
#          inputs (our fp16-accumulated 16-bit PV)
#   ncu    one shape (NCU_SHAPE, default 1x24x8192x128): our int8+fp16 kernel and thu-ml's, key
#          sections and per-instruction stall samples (ncu_<who>_sass.csv; NCU_SECTIONS overrides
#          the ncu --section list)
#
# The stages can run in separate calls on the same warm machine (the library stays in
# the kernel cache, thu-ml in place). The whole round fits one 10-minute device call: optional
# parts (A/B, fp16 table, ncu) are skipped with a note once RTX_BUDGET_S (default 540) seconds
# are near. $OUT (default ./rtx_out) receives at most 8 files: rtx_round.log (everything
# printed, the tables included), pytest.txt, bench_bf16.md, bench_fp16.md, mma_ab.md,
# resources.txt and rtx_raw.tgz (logs, metrics.jsonl, ncu reports). A failed stage prints
# FAILED and the script exits non-zero at the end.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/rtx_out}
RAW=$OUT/raw
mkdir -p "$RAW"
exec > >(tee -a "$OUT/rtx_round.log") 2>&1
T0=$(date +%s)
BUDGET=${RTX_BUDGET_S:-540}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# A timeout of at most $1 seconds that ends before the budget does (never below 10 s).
cap() { local l; l=$(left); l=$(( l < $1 ? l : $1 )); echo $(( l < 10 ? 10 : l )); }
# Kernel switches to A/B (name:flags, flags comma-separated; the -D guards in attn_mma.cuh).
# In order of priority: variants past the time budget are skipped.
MMA_VARIANTS=${MMA_VARIANTS-"imax:-DSA2_MMA_INT_ROW_MAX=1 u2:-DSA2_MMA_TILE_UNROLL=2 imax_u2:-DSA2_MMA_INT_ROW_MAX=1,-DSA2_MMA_TILE_UNROLL=2 ka:-DSA2_MMA_KSCALE_AHEAD=1 one_v_stage:-DSA2_SMEM_PER_SM_KB=100 one_v_stage_two_barriers:-DSA2_SMEM_PER_SM_KB=100,-DSA2_MMA_TWO_BARRIERS=1"}
AB_SHAPES=${AB_SHAPES:-1x24x16384x128,1x40x32760x128,1x24x8192x64,1x24x16384x64,1x24x8192x64c}
# A variant builds into its own kernel cache (the default one stays the product build).
in_variant() { local v=$1; shift; SAGEATTN2_CACHE_DIR=/tmp/sa2_ab/${v%%:*} SAGEATTN2_NVRTC_FLAGS="$(echo "${v#*:}" | tr , ' ')" "$@"; }
pack() { tar czf "$OUT/rtx_raw.tgz" -C "$OUT" raw && rm -rf "$RAW"; }
export PYTHONUNBUFFERED=1 SAGEATTN2_COMMIT=${SAGEATTN2_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
THUML=.thirdparty/SageAttention
# The ncu case runs from /tmp: the pack is importable by path, not by the working directory.
export PYTHONPATH=$PWD:$PWD/$THUML${PYTHONPATH:+:$PYTHONPATH}
STAGES=${*:-build test bench ncu}
failed=()
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

echo "== device $(date -u +%FT%TZ) commit $SAGEATTN2_COMMIT stages: $STAGES"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

if has build; then
  echo "== build (ours, NVRTC || thu-ml fused + sm80)"
  start=$(date +%s)
  [ -d "$THUML/csrc" ] || { echo "FAILED: $THUML not carried"; exit 1; }
  (THUML_EXTS="fused sm80" MAX_JOBS=8 bash tests/gpu/build_thuml.sh "$THUML" > "$RAW/build_thuml.log" 2>&1; echo $? > "$RAW/build_thuml.rc") &
  pids=($!)
  python3 install.py --all --no-selfcheck -j 8 > "$RAW/build.log" 2>&1 || { tail -30 "$RAW/build.log"; failed+=(build); }
  echo "ours built in $(( $(date +%s) - start )) s"
  # The A/B variants' kernels compile on first use: do it now, beside thu-ml's build.
  for v in $MMA_VARIANTS; do
    in_variant "$v" timeout 200 python3 tests/gpu/mma_ab.py --name "${v%%:*}" \
      --shapes 1x1x128x128,1x1x128x64 --warm > "$RAW/ab_warm_${v%%:*}.log" 2>&1 &
    pids+=($!)
  done
  # The suite on a variant needs every test kernel of that build: compile them now, in parallel,
  # not one by one inside pytest's time cap.
  if [ -n "${TEST_VARIANT:-}" ] && has test; then
    in_variant "$TEST_VARIANT" python3 install.py --all --no-selfcheck -j 8 > "$RAW/build_${TEST_VARIANT%%:*}.log" 2>&1 &
    pids+=($!)
  fi
  rm -rf /tmp/rtx_cubins && python3 -m sageattn2.build extract /tmp/rtx_cubins > /dev/null
  for f in /tmp/rtx_cubins/*/mma-*.cubin; do
    cuobjdump --dump-resource-usage "$f" 2>/dev/null | grep -m1 -o "REG:[0-9]*.*" | sed "s|^|$(basename "$(dirname "$f")")/$(basename "$f" .cubin) |"
  done | tee "$OUT/resources.txt"
  [ -s "$OUT/resources.txt" ] || { echo "FAILED: no mma cubin in the cache"; failed+=(build); }
  wait "${pids[@]}"
  echo "thu-ml built in $(( $(date +%s) - start )) s, rc $(cat "$RAW/build_thuml.rc")"
  tail -4 "$RAW/build_thuml.log"
  [ "$(cat "$RAW/build_thuml.rc")" = 0 ] || failed+=(build_thuml)
  for v in $MMA_VARIANTS; do tail -1 "$RAW/ab_warm_${v%%:*}.log"; done
fi

if has test; then
  echo "== mma GPU suite${TEST_VARIANT:+ (build ${TEST_VARIANT%%:*})}"
  export SA2_TEST_LOG=$RAW/metrics.jsonl
  rm -f "$SA2_TEST_LOG"
  suite=(timeout "$(cap 420)" python3 -m pytest tests/gpu/test_mma_kernels.py -q -rfEs --maxfail=60 -p no:cacheprovider)
  if [ -n "${TEST_VARIANT:-}" ]; then in_variant "$TEST_VARIANT" "${suite[@]}"; else "${suite[@]}"; fi \
    > "$OUT/pytest.txt" 2>&1 || failed+=(test)
  tail -60 "$OUT/pytest.txt"
  python3 - <<'PY'
import json, os
path = os.environ["SA2_TEST_LOG"]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
for r in (r for r in rows if r.get("kind") == "accuracy"):
    print(f"accuracy {r['precision']:16s} {r['shape']}: vs exact cos {r['cos']:.6f} relL1 {r['rel_l1']:.4f}; "
          f"reference cos {r['ref_cos']:.6f} relL1 {r['ref_rel_l1']:.4f}")
cmp = [r for r in rows if r.get("kind") == "vs_reference"]
for group, sel in (("fp32 acc", lambda r: not r["case"].startswith("acc16")), ("fp16 acc", lambda r: r["case"].startswith("acc16"))):
    have = [r for r in cmp if sel(r)]
    for key in ("rel_l1", "vs_ref_rel_l1", "lse_err"):
        vals = [r for r in have if key in r]
        if vals:
            worst = max(vals, key=lambda r: r[key])
            print(f"{group}: {len(vals)} cases, worst {key} {worst[key]:.2e} ({worst['case']})")
PY
fi

if has bench; then
  echo "== bench (whole calls; ours vs thu-ml sm80, same run)"
  SHAPES=1x24x4096x128,1x24x8192x128,1x24x16384x128,1x40x32760x128,1x24x8192x64,1x24x16384x64,1x32x8192x128c
  timeout "$(cap 300)" python3 bench/bench_attention.py --shapes "$SHAPES" \
    --out "$OUT/bench_bf16.md" > "$RAW/bench_bf16.log" 2>&1 || failed+=(bench)
  cat "$OUT/bench_bf16.md"
  if [ -n "$MMA_VARIANTS" ] && [ "$(left)" -gt 110 ]; then
    echo "== A/B of kernel switches (whole calls, bf16; thu-ml re-timed in every process)"
    timeout 60 python3 tests/gpu/mma_ab.py --name base --shapes "$AB_SHAPES" --header > "$OUT/mma_ab.md" 2> "$RAW/ab_base.log"
    for v in $MMA_VARIANTS; do
      [ "$(left)" -gt 60 ] || { echo "A/B: ${v%%:*} skipped (time)"; continue; }
      in_variant "$v" timeout 60 python3 tests/gpu/mma_ab.py --name "${v%%:*}" \
        --shapes "$AB_SHAPES" >> "$OUT/mma_ab.md" 2> "$RAW/ab_${v%%:*}.log" || echo "A/B: ${v%%:*} FAILED"
    done
    [ "$(left)" -gt 40 ] && timeout 40 python3 tests/gpu/mma_ab.py --name base --shapes "$AB_SHAPES" >> "$OUT/mma_ab.md" 2>> "$RAW/ab_base.log"
    cat "$OUT/mma_ab.md"
  else
    echo "A/B skipped ($(left) s left)"
  fi
  if [ "$(left)" -gt 200 ]; then
    timeout 90 python3 bench/bench_attention.py --dtype fp16 --shapes 1x24x8192x128,1x24x8192x64 \
      --out "$OUT/bench_fp16.md" > "$RAW/bench_fp16.log" 2>&1 || failed+=(bench_fp16)
    cat "$OUT/bench_fp16.md"
  else
    echo "fp16 table skipped ($(left) s left)"
  fi
fi

if has ncu; then
  NCU_SHAPE=${NCU_SHAPE:-1x24x8192x128}
  echo "== ncu $NCU_SHAPE int8+fp16 (ours, thu-ml sm80)"
  cat > /tmp/rtx_ncu_case.py <<'PY'
import sys, torch
from sageattn2.backends import mma
from sageattn2.config import AttnConfig
b, h, n, d = map(int, sys.argv[2].split("x"))
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
k = k + 3 * torch.randn(b, h, 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
if sys.argv[1] == "ours":
    fn = lambda: mma.attention(q, k, v, layout="HND", cfg=AttnConfig(pv_dtype="fp16"), is_causal=False,
                               sm_scale=None, return_lse=False)
else:
    from sageattention import sageattn_qk_int8_pv_fp16_cuda
    fn = lambda: sageattn_qk_int8_pv_fp16_cuda(q, k, v, tensor_layout="HND", pv_accum_dtype="fp32")
for _ in range(3):
    fn()
torch.cuda.synchronize()
PY
  SECTIONS=${NCU_SECTIONS:-"--section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats --section InstructionStats --section ComputeWorkloadAnalysis --section SourceCounters"}
  for who in ours thuml; do
    [ "$(left)" -gt 40 ] || { echo "ncu $who skipped ($(left) s left)"; continue; }
    kernel=$([ $who = ours ] && echo "regex:attn_mma_kernel" || echo "regex:qk_int_sv_f16_attn_kernel")
    timeout "$(cap 150)" ncu $SECTIONS -k "$kernel" --launch-skip 2 --launch-count 1 \
      -o "$RAW/ncu_$who" -f python3 /tmp/rtx_ncu_case.py $who "$NCU_SHAPE" > "$RAW/ncu_$who.log" 2>&1 || failed+=(ncu_$who)
    ncu -i "$RAW/ncu_$who.ncu-rep" --page details --print-units base > "$RAW/ncu_$who.txt" 2>&1
    ncu -i "$RAW/ncu_$who.ncu-rep" --page source --csv --print-source sass > "$RAW/ncu_${who}_sass.csv" 2>&1
    grep -E "Duration|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Executed Ipc Active|No Eligible|Warp Cycles Per Issued|Block Limit (Registers|Shared Mem)|Dynamic Shared|Stall" "$RAW/ncu_$who.txt" | sed "s/^/$who: /"
  done
fi

echo "== summary ($(( $(date +%s) - T0 )) s)"
grep -E "passed|failed" "$OUT/pytest.txt" 2>/dev/null | tail -1
pack
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed"
