#!/usr/bin/env bash
# Device script for issue 16: the sampler benchmark (bench/bench_sampler.py, fresh processes),
# the public API's `auto` on the causal shape (tests/gpu/auto_causal.py) and the node's host
# cost (CPU). Tables and logs go to $OUT.
#
#   carry: .comfyui (a ComfyUI source tree), .whl (torchsde, trampoline, einops wheels)
#   SLICES=flux,wan14b,hunyuan,sdxl PROCESSES=5 ROUNDS=2 LEVELS=int8+fp8 PROFILE=1 bash tests/gpu/run_sampler.sh
#   (LEVELS empty: every level that is a distinct kernel on this GPU; BUILD=skip|auto|force as
#   in tests/comfy/run_device.sh; CHECKS=0 skips the API auto check and the host-cost table)
#   BUDGET: seconds for the whole script (default 540). The benchmark gets what is left after
#   the build and checks; it starts no process that would end past it (judged by the last one)
#   and is killed 30 s after it. A process (fresh ComfyUI, model build, 1 warm-up round, the
#   timed rounds, forward-only pairs) took on an H100 (torch 2.11): flux+sdxl 5 rounds ~34 s
#   (+14 s with PROFILE=1), wan14b+hunyuan 2 rounds ~50 s; about 8 s of each is start-up.
#   Hence, with kernels built and CHECKS=0:
#     BUILD=skip CHECKS=0 BUDGET=150 SLICES=flux,sdxl PROCESSES=5 ROUNDS=3   (~28 s a process)
#     BUILD=skip CHECKS=0 BUDGET=150 SLICES=hunyuan PROCESSES=3 ROUNDS=2     (~35 s a process)
set -uo pipefail
start_all=$(date +%s)
BUDGET=${BUDGET:-540}
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.comfyui}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torchsde" || { echo "torchsde is missing: carry .whl"; exit 2; }
[ -d "$COMFYUI_PATH/comfy" ] || { echo "no ComfyUI tree at $COMFYUI_PATH"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/device.txt"

have_kernels() {
  python3 -c 'import sys, torch; from sageattn2 import loader; dk, why = loader.kernels_for_device(torch.device("cuda")); print(why or f"{dk.tag}: {dk.families}"); sys.exit(dk is None)'
}
BUILD=${BUILD:-auto}
if [ "$BUILD" = force ] || { [ "$BUILD" = auto ] && ! have_kernels; }; then
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 install.py -j 16 --no-selfcheck > "$OUT/install.log" 2>&1 \
    || { tail -30 "$OUT/install.log"; echo "BUILD FAILED"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi
have_kernels || { echo "no kernels for this GPU"; exit 1; }

status=0
if [ "${CHECKS:-1}" = 1 ]; then
  timeout 120 python3 tests/gpu/auto_causal.py --out "$OUT/auto_causal.md" > "$OUT/auto_causal.log" 2>&1
  rc=$?; echo "auto_causal: rc=$rc"; [ $rc = 0 ] || status=1
  python3 bench/bench_sampler.py --host-cost --out "$OUT/host_cost.md" > /dev/null 2>&1 || echo "host cost: failed"
fi
args=(--slices "${SLICES:-flux,wan14b,hunyuan,sdxl}" --processes "${PROCESSES:-5}" --rounds "${ROUNDS:-2}" --out "$OUT/sampler.md")
[ -n "${LEVELS-int8+fp8}" ] && args+=(--levels "${LEVELS-int8+fp8}")
[ "${PROFILE:-0}" = 1 ] && args+=(--profile "$OUT/profile")
left=$(( BUDGET - ($(date +%s) - start_all) ))
[ $left -gt 20 ] || { echo "no time left for the benchmark (BUDGET=$BUDGET s)"; exit 1; }
echo "benchmark budget: $left s"
timeout $(( left + 30 )) python3 bench/bench_sampler.py "${args[@]}" --budget $left > "$OUT/sampler.log" 2>&1
rc=$?; echo "bench_sampler: rc=$rc, $(( $(date +%s) - start_all )) s in all"; [ $rc = 0 ] || status=1
grep -h "\[bench_sampler\]" "$OUT/sampler.log"

echo "================ summary"
cat "$OUT/device.txt"
cat "$OUT/auto_causal.md" 2>/dev/null || tail -20 "$OUT/auto_causal.log"
cat "$OUT/host_cost.md" 2>/dev/null
cat "$OUT/sampler.md" 2>/dev/null || tail -40 "$OUT/sampler.log"
cat "$OUT"/profile/*_summary.md 2>/dev/null
grep -h "auto, model input\|auto timing failed\|redone" "$OUT/sampler.log" | sort | uniq -c | head -20
exit $status
