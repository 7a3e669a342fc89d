#!/usr/bin/env bash
# One device call for the whole pack: build with install.py (+ self-check table), the
# real-ComfyUI integration tests with the real kernels, the end-to-end ComfyUI benchmark,
# then the kernel suites. Logs and tables go to $OUT.
#
#   carry: .comfyui (a ComfyUI source tree) and .whl (torchsde, trampoline, einops wheels)
#   STEPS="build sass comfy e2e mma wgmma bench" (default: all but sass and bench),
#   E2E_MODELS=wan14b,wan1.3b,flux,sdxl,hunyuan, BENCH_ARGS (bench_attention.py arguments)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
STEPS=${STEPS:-build comfy e2e mma wgmma}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COMFYUI_PATH=$PWD/.comfyui
want() { [[ " $STEPS " == *" $1 "* ]]; }
summary=()

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/device.txt"

if want build; then
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST=9.0 python3 install.py -j 16 2>&1 | tee "$OUT/install.log"
  summary+=("install.py + selfcheck: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s")
  grep -E "C7515|C7511|C7508|spill" "$OUT/install.log" | sort | uniq -c | head -20 > "$OUT/ptxas_warnings.txt"
fi
if want sass; then
  # Spills per kernel in the built library (STL/LDL in the SASS), and the wgmma count as a sanity check.
  lib=$(ls sageattn2/_build/sm_90*/libsageattn2.so | head -1)
  cuobjdump -sass "$lib" > /tmp/sass.txt 2>/dev/null
  awk '/Function :/{f=$3} /GMMA|STL|LDL/{n=split($0,a,/[ ;]+/); for(i=1;i<=n;i++) if(a[i] ~ /GMMA|^STL|^LDL/) c[f" "a[i]]++} END{for(k in c) print c[k], k}' /tmp/sass.txt \
    | grep attention | sed -E 's/_ZN3sa210wgmma_attn16attention_kernelINS0_6TraitsIL//; s/EEEEEv14CUtensorMap.*NS0_6ParamsE//' \
    | sort -k2 > "$OUT/sass_counts.txt"
  summary+=("sass: $(grep -c -E 'STL|LDL' "$OUT/sass_counts.txt") kernel/spill-op lines (sass_counts.txt)")
fi
if want comfy; then
  OUT=$OUT/comfy BUILD=skip timeout 400 bash tests/comfy/run_device.sh > /dev/null 2>&1
  summary+=("ComfyUI integration (H100, real kernels): rc=$? $(tail -1 "$OUT/comfy/pytest.txt" 2>/dev/null)")
fi
if want e2e; then
  timeout 420 python3 bench/bench_e2e.py --models "${E2E_MODELS:-wan14b,wan1.3b,flux,sdxl,hunyuan}" \
    --out "$OUT/e2e.md" > "$OUT/e2e.log" 2>&1
  summary+=("e2e bench: rc=$?")
fi
if want mma; then
  timeout 300 python3 -m pytest tests/gpu/test_mma_kernels.py -x -q -p no:cacheprovider > "$OUT/mma_tests.txt" 2>&1
  summary+=("mma GPU tests: rc=$? $(tail -1 "$OUT/mma_tests.txt")")
fi
if want wgmma; then
  timeout 300 python3 -m pytest tests/gpu/test_wgmma_kernels.py -x -q -p no:cacheprovider > "$OUT/wgmma_tests.txt" 2>&1
  summary+=("wgmma GPU tests: rc=$? $(tail -1 "$OUT/wgmma_tests.txt")")
fi

if want bench; then
  timeout 420 python3 bench/bench_attention.py ${BENCH_ARGS:-} --out "$OUT/bench_attention.md" > "$OUT/bench.log" 2>&1
  summary+=("kernel bench: rc=$?")
fi

echo "================ summary"
cat "$OUT/device.txt"
[ -f "$OUT/install.log" ] && sed -n '/selfcheck\]/,$p' "$OUT/install.log" | head -30
[ -f "$OUT/e2e.md" ] && cat "$OUT/e2e.md"
[ -f "$OUT/bench_attention.md" ] && cut -c1-400 "$OUT/bench_attention.md"
grep -hE "cosine to stock run" "$OUT/comfy/pytest.txt" 2>/dev/null
printf '%s\n' "${summary[@]}"
