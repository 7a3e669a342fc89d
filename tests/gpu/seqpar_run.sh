#!/usr/bin/env bash
# Multi-GPU run: yunchang's ring, Ulysses and USP with our kernels at 2 and 4 ranks (NCCL), on
# the WAN 14B 720p shape and a causal shape, checked against our single-GPU output and exact
# attention, timed against yunchang's exact attention (PyTorch flash; cuDNN for Ulysses) in the
# same run. Needs a machine with 4 GPUs (2 are enough for the 2-rank half) and the yunchang
# wheel carried in .whl/ (pure Python: yunchang-0.6.4-py3-none-any.whl; no other dependency
# than torch). Logs, seqpar.jsonl and the table seqpar.md go to $OUT.
#
#   bash tests/gpu/seqpar_run.sh                 build (sm_90a), 2 ranks, then 4 ranks
#   WORLDS="2" SHAPES=wan720 bash tests/gpu/seqpar_run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/seqpar_out}
WORLDS=${WORLDS:-2 4}
SHAPES=${SHAPES:-wan720,causal}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1

if ! python3 -c "import yunchang" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/seqpar_site .whl/yunchang-*.whl \
    && export PYTHONPATH=/tmp/seqpar_site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import yunchang; print('yunchang', yunchang.__version__)" || { echo "FAILED: no yunchang (carry .whl/yunchang-*.whl)"; exit 1; }
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm --format=csv,noheader
nvidia-smi topo -m | head -12

if [ "${BUILD:-1}" != skip ]; then
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 install.py -j 16 > "$OUT/install.log" 2>&1 \
    || { tail -30 "$OUT/install.log"; echo "FAILED: build"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi

gpus=$(nvidia-smi -L | wc -l)
status=0
for world in $WORLDS; do
  if [ "$world" -gt "$gpus" ]; then
    echo "NOT RUN: $world ranks need $world GPUs, this machine has $gpus"
    status=1
    continue
  fi
  echo "== $world ranks"
  timeout "${RANK_TIMEOUT:-280}" torchrun --standalone --nproc-per-node "$world" tests/gpu/seqpar_yunchang.py \
    --shapes "$SHAPES" --bench --out "$OUT" || { echo "FAILED: $world ranks (rc=$?)"; status=1; }
done
echo "================ summary"
cat "$OUT/seqpar.md" 2> /dev/null
grep -h "FAILED\|NOT RUN" "$OUT/run.log" | grep -v "^grep" || echo "all checks passed"
exit $status
