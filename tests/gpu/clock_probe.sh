#!/usr/bin/env bash
# SM clock and board power while one attention runs back to back for a while (WAN 14B's shape by
# default): does a long run of our kernel, or of cuDNN, hold the clock the short benchmark sees?
# Prints per phase the TOPS over the phase and the median clock / power sampled by nvidia-smi.
#
#   SHAPE=1x40x32760x128 SECONDS_PER_PHASE=15 bash tests/gpu/clock_probe.sh   (after install.py)
set -uo pipefail
cd "$(dirname "$0")/../.."
log=$(mktemp)
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits \
  -lms 250 > "$log" &
smi=$!
SHAPE=${SHAPE:-1x40x32760x128} SECS=${SECONDS_PER_PHASE:-15} LOG=$log python3 - <<'PY'
import os, statistics, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import sageattn2

b, h, n, d = (int(x) for x in os.environ["SHAPE"].split("x"))
secs = float(os.environ["SECS"])
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
k += 3 * torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
def cudnn():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)
phases = [("cuDNN", cudnn),
          ("ours int8+fp8", lambda: sageattn2.sageattn(q, k, v, tensor_layout="HND", precision="int8+fp8")),
          ("cuDNN again", cudnn)]

def samples(t0, t1):
    out = []
    for line in open(os.environ["LOG"]):
        parts = [p.strip() for p in line.split(",")]
        try:
            ts = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
            if t0 <= ts <= t1:
                out.append((float(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            pass
    return out

print(f"{'phase':<16} {'TOPS':>6} {'calls':>6} {'SM MHz (median)':>16} {'W (median)':>11} {'temp C':>7}")
for name, fn in phases:
    fn(); torch.cuda.synchronize()
    t0 = time.time(); calls = 0
    while time.time() - t0 < secs:
        for _ in range(4):
            fn()
        torch.cuda.synchronize()
        calls += 4
    t1 = time.time()
    tops = 4 * b * h * n * n * d * calls / (t1 - t0) / 1e12
    s = samples(t0 + 2, t1)  # the first seconds ramp up
    med = lambda i: statistics.median(x[i] for x in s) if s else float("nan")
    print(f"{name:<16} {tops:6.0f} {calls:6d} {med(0):16.0f} {med(1):11.0f} {med(2):7.0f}")
PY
kill $smi 2>/dev/null
rm -f "$log"
