#!/usr/bin/env bash
# Where the Hopper kernel's warps wait: one Nsight Compute pass over the default fp8 kernels
# (three consumer warpgroups, 1x24x8192, head dims 128 and 64) with warp-stall sampling per
# SASS instruction. Prints the stall reasons per issued instruction, the pipe utilisation, and
# the stall samples summed per opcode and per instruction; raw CSVs go to $OUT.
#
#   OUT=/tmp/x [HEAD_DIMS=128] bash tests/gpu/ncu_stalls.sh   (after install.py built the library)
# $OUT keeps the summary (stalls.txt) and the gzipped per-instruction CSV only.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/ncu_out}
mkdir -p "$OUT"
cat > /tmp/ncu_stalls_target.py <<'PY'
import os
import torch
from sageattn2.backends import wgmma
from sageattn2.config import AttnConfig, Family, PVDType
for d in [int(x) for x in os.environ.get("HEAD_DIMS", "128,64").split(",")]:
    q, k, v = (torch.randn(1, 24, 8192, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k += 3 * torch.randn(1, 24, 1, d, device="cuda", dtype=torch.bfloat16)
    prep = wgmma.prepare(q, k, v, layout="HND", cfg=AttnConfig(pv_dtype=PVDType.FP8, family=Family.WGMMA),
                         is_causal=False)
    wgmma.run(prep, schedule="sequential3wg")
torch.cuda.synchronize()
PY
PYTHONPATH=$PWD timeout 300 ncu -k regex:attention_kernel -f -o "$OUT/stalls" \
  --section WarpStateStats --section SourceCounters --section SchedulerStats \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
  python3 /tmp/ncu_stalls_target.py > "$OUT/ncu_run.log" 2>&1 || { tail -20 "$OUT/ncu_run.log"; exit 1; }
ncu -i "$OUT/stalls.ncu-rep" --page raw --csv > "$OUT/raw.csv" 2>/dev/null
ncu -i "$OUT/stalls.ncu-rep" --page source --print-source sass --csv > "$OUT/sass.csv" 2>"$OUT/sass.err"
python3 - "$OUT" <<'PY' | tee "$OUT/stalls.txt"
import csv, re, sys
from collections import Counter
out = sys.argv[1]
rows = list(csv.reader(open(f"{out}/raw.csv")))
head, units, data = rows[0], rows[1], rows[2:]
for r in data:
    name = next((v for h, v in zip(head, r) if h == "Kernel Name"), "?")
    print("==", re.sub(r"\(CUtensorMap.*", "", name))
    stalls = sorted(((float(v), h.split("stalled_")[1].split("_per_issue")[0]) for h, v in zip(head, r)
                     if h.endswith("_per_issue_active.ratio") and "issue_stalled_" in h
                     and v not in ("", "n/a")), reverse=True)
    print("  stall cycles per issued instruction:", ", ".join(f"{n} {v:.2f}" for v, n in stalls if v >= 0.05))
    pipes = sorted(((float(v.replace(",", "")), h) for h, v in zip(head, r)
                    if (h.startswith("sm__inst_executed_pipe_") or h.startswith("sm__pipe_")) and v not in ("", "n/a")),
                   reverse=True)
    print("  pipes (% of peak, active):", ", ".join(f"{h.split('__')[1].split('.avg')[0]} {v:.1f}" for v, h in pipes[:14]))
# Per-instruction stall samples (the source page lists every kernel's SASS one after another).
text = open(f"{out}/sass.csv").read().splitlines()
kernels, cur = [], None
for line in text:
    if line.startswith('"#') or line.startswith('"Address"') or line.startswith('"# Address"'):
        cur = [line]
        kernels.append(cur)
    elif cur is not None:
        cur.append(line)
for lines in kernels[:2]:
    reader = list(csv.reader(lines))
    h = reader[0]
    try:
        i_src = next(i for i, c in enumerate(h) if c.lower() == "source")
        i_smp = next(i for i, c in enumerate(h) if "Warp Stall Sampling (All" in c)
    except StopIteration:
        print("source page columns:", h[:12])
        continue
    samples = [(float(r[i_smp] or 0), r[i_src].strip()) for r in reader[1:] if len(r) > i_smp]
    total = sum(s for s, _ in samples) or 1.0
    by_op = Counter()
    for s, src in samples:
        op = re.sub(r"^@!?U?P\w+\s+", "", src).split(" ")[0]
        by_op[op] += s
    print(f"-- stall samples by opcode ({int(total)} samples)")
    print("  " + ", ".join(f"{op} {100 * s / total:.1f}%" for op, s in by_op.most_common(18)))
    print("-- top instructions (a branch shows the instruction before it: what it loops on)")
    for i in sorted(range(len(samples)), key=lambda i: -samples[i][0])[:25]:
        s, src = samples[i]
        before = f"   <- {samples[i - 1][1][:70]}" if " BRA " in f" {src} " and i else ""
        print(f"  {100 * s / total:5.1f}%  {src[:100]}{before}")
PY
gzip -f "$OUT/sass.csv"
rm -f "$OUT/stalls.ncu-rep" "$OUT/raw.csv" "$OUT/sass.err"