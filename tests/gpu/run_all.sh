#!/usr/bin/env bash
# One device call for the whole pack: build with install.py (+ self-check table), the
# real-ComfyUI integration tests with the real kernels, the end-to-end ComfyUI benchmark,
# then the kernel suites. Logs and tables go to $OUT.
#
#   carry: .comfyui (a ComfyUI source tree) and .whl (torchsde, trampoline, einops wheels);
#          .thirdparty/SageAttention (thu-ml's source, fetched) for the thu-ml columns
#   STEPS="thuml build bench comfy e2e mma wgmma fuzz sanitize" (default: all but thuml and bench),
#   E2E_MODELS=wan14b,wan1.3b,flux,sdxl,hunyuan, FUZZ_CASES=1000 FUZZ_SEED=1 (tests/gpu/fuzz_attention.py)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
STEPS=${STEPS:-build comfy e2e mma wgmma fuzz sanitize}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COMFYUI_PATH=$PWD/.comfyui
want() { [[ " $STEPS " == *" $1 "* ]]; }
summary=()

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/device.txt"

# thu-ml's build (minutes) runs beside ours; the steps that time it wait for it.
thuml_pid=
if want thuml && [ -d .thirdparty/SageAttention ]; then
  thuml_start=$(date +%s)
  ( timeout 300 bash tests/gpu/build_thuml.sh .thirdparty/SageAttention > "$OUT/thuml_build.log" 2>&1
    echo $? > /tmp/thuml_rc ) &
  thuml_pid=$!
fi
wait_thuml() {
  [ -n "$thuml_pid" ] || return 0
  wait "$thuml_pid"
  thuml_pid=
  local rc
  rc=$(cat /tmp/thuml_rc 2>/dev/null || echo 1)
  summary+=("thu-ml sageattention build: rc=$rc in $(( $(date +%s) - thuml_start )) s")
  [ "$rc" = 0 ] && export PYTHONPATH=$PWD/.thirdparty/SageAttention${PYTHONPATH:+:$PYTHONPATH}
  return 0
}

if want build; then
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST=9.0 python3 install.py -j 16 2>&1 | tee "$OUT/install.log"
  summary+=("install.py + selfcheck: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s")
  # The kernels only the GPU suites and benchmarks use (every wgmma schedule, emulated INT4).
  python3 install.py --all --no-selfcheck -j 16 > "$OUT/install_all.log" 2>&1
  summary+=("install.py --all: rc=$? in $(( $(date +%s) - start )) s total")
fi
if want bench; then
  wait_thuml
  timeout 300 python3 bench/bench_attention.py --no-mma --breakdown 1x24x4608x128,1x40x32760x128 \
    --out "$OUT/bench_attention.md" > "$OUT/bench.log" 2>&1
  summary+=("attention bench: rc=$?")
fi
if want comfy; then
  OUT=$OUT/comfy BUILD=skip timeout 400 bash tests/comfy/run_device.sh > /dev/null 2>&1
  summary+=("ComfyUI integration (H100, real kernels): rc=$? $(tail -1 "$OUT/comfy/pytest.txt" 2>/dev/null)")
fi
if want e2e; then
  wait_thuml
  timeout 460 python3 bench/bench_e2e.py --models "${E2E_MODELS:-wan14b,wan1.3b,flux,sdxl,hunyuan}" \
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

if want fuzz; then
  timeout 560 python3 tests/gpu/fuzz_attention.py --device cuda --cases "${FUZZ_CASES:-1000}" --seed "${FUZZ_SEED:-1}" \
    --time-budget 400 --out "$OUT/fuzz" > "$OUT/fuzz.log" 2>&1
  summary+=("fuzz (random API cases + child-process bad inputs): rc=$? $(grep -h '^SUMMARY' "$OUT/fuzz.log" | cut -c9-)")
fi
if want sanitize; then
  OUT=$OUT/sanitize SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-480} bash tests/gpu/sanitize.sh > "$OUT/sanitize.log" 2>&1
  summary+=("compute-sanitizer: rc=$? $(grep -E '^(status|[a-z]+check):' "$OUT/sanitize.log" | tr '\n' ' ')")
fi

echo "================ summary"
cat "$OUT/device.txt"
[ -f "$OUT/install.log" ] && sed -n '/selfcheck\]/,$p' "$OUT/install.log" | head -30
[ -f "$OUT/bench_attention.md" ] && cut -c1-400 "$OUT/bench_attention.md"
[ -f "$OUT/e2e.md" ] && cat "$OUT/e2e.md"
grep -hE "cosine to stock run" "$OUT/comfy/pytest.txt" 2>/dev/null
[ -f "$OUT/sanitize/sanitize_summary.md" ] && cat "$OUT/sanitize/sanitize_summary.md"
grep -hE "^FAIL" "$OUT/fuzz.log" 2>/dev/null | head -20
printf '%s\n' "${summary[@]}"
