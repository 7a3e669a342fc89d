#!/usr/bin/env bash
# Device script: the real-ComfyUI integration tests (tests/comfy) on a GPU, with the real
# kernels serving every attention call of tiny WAN 2.1 and Flux models.
#
#   COMFYUI_PATH=.comfyui tests/comfy/run_device.sh        (from the repo root; default ./.comfyui)
#
# Needs on the device machine:
# - the ComfyUI source tree at $COMFYUI_PATH;
# - torchsde and trampoline (ComfyUI's samplers import them; the device image lacks them),
#   as wheels in ./.whl, fetched here with
#       python3 -m pip download --no-deps -d .whl torchsde==0.2.6 trampoline==0.1.2
# - kernels for the GPU: sageattn2/_build (carried) or built here by install.py (BUILD=skip
#   to forbid building, BUILD=force to always build).
# Logs go to $OUT (default ./comfy_out).
set -uo pipefail
cd "$(dirname "$0")/../.."
export COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.comfyui}
OUT=${OUT:-$PWD/comfy_out}
BUILD=${BUILD:-auto}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SAGEATTN2_TEST_DEVICE=cuda
exec > >(tee -a "$OUT/run.log") 2>&1

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torchsde" || { echo "torchsde is missing: carry its wheel in .whl (see this script's header)"; exit 2; }
[ -d "$COMFYUI_PATH/comfy" ] || { echo "no ComfyUI tree at $COMFYUI_PATH"; exit 2; }

echo "== device"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
git -C "$COMFYUI_PATH" log -1 --format='ComfyUI %h %cs' 2>/dev/null || echo "ComfyUI tree: $COMFYUI_PATH"

echo "== kernels"
have_kernels() {
  python3 -c 'import sys, torch; from sageattn2 import loader; dk, why = loader.kernels_for_device(torch.device("cuda")); print(why or f"{dk.tag}: {dk.families}"); sys.exit(dk is None)'
}
if [ "$BUILD" = force ] || { [ "$BUILD" = auto ] && ! have_kernels; }; then
  start=$(date +%s)
  python3 install.py --no-selfcheck || { echo "BUILD FAILED"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi
have_kernels || { echo "no kernels for this GPU"; exit 1; }

echo "== tests"
timeout 480 python3 -m pytest tests/comfy -q -s -rfEs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt"
status=${PIPESTATUS[0]}
echo "== summary"
grep -E "cosine to stock run" "$OUT/pytest.txt"
tail -1 "$OUT/pytest.txt"
exit "$status"
