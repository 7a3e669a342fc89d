#!/usr/bin/env bash
# Where the Hopper kernel's warps wait: one Nsight Compute pass over Hopper kernels with
# warp-stall sampling per SASS instruction. Prints per kernel the clock, issue activity,
# instructions per consumer warp and key tile, the stall reasons per issued instruction, the
# pipe utilisation, and the stall samples summed per opcode and per instruction.
#
#   OUT=/tmp/x [CASES="fp8:sequential3wg:128:8192 fp16:overlap:128:8192"] bash tests/gpu/ncu_stalls.sh
#   (after install.py built the library; a case is pv:schedule:head_dim:tokens, B=1, H=24)
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
cases = os.environ.get("CASES", "fp8:sequential3wg:128:8192 fp8:sequential3wg:64:8192").split()
for case in cases:
    pv, schedule, d, n = case.split(":")
    q, k, v = (torch.randn(1, 24, int(n), int(d), device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k += 3 * torch.randn(1, 24, 1, int(d), device="cuda", dtype=torch.bfloat16)
    prep = wgmma.prepare(q, k, v, layout="HND", cfg=AttnConfig(pv_dtype=PVDType(pv), family=Family.WGMMA),
                         is_causal=False)
    wgmma.run(prep, schedule=schedule)
torch.cuda.synchronize()
PY
PYTHONPATH=$PWD timeout 300 ncu -k regex:attention_kernel -f -o "$OUT/stalls" \
  --section WarpStateStats --section SourceCounters --section SchedulerStats \
  --metrics "sm__cycles_elapsed.avg,sm__cycles_elapsed.avg.per_second,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
  python3 /tmp/ncu_stalls_target.py > "$OUT/ncu_run.log" 2>&1 || { tail -20 "$OUT/ncu_run.log"; exit 1; }
ncu -i "$OUT/stalls.ncu-rep" --page raw --csv > "$OUT/raw.csv" 2>/dev/null
ncu -i "$OUT/stalls.ncu-rep" --page source --print-source sass --csv > "$OUT/sass.csv" 2>"$OUT/sass.err"
CASES=${CASES:-fp8:sequential3wg:128:8192 fp8:sequential3wg:64:8192} python3 - "$OUT" <<'PY' | tee "$OUT/stalls.txt"
import csv, os, re, sys
from collections import Counter
out = sys.argv[1]
cases = os.environ["CASES"].split()
rows = list(csv.reader(open(f"{out}/raw.csv")))
head, units, data = rows[0], rows[1], rows[2:]
for case, r in zip(cases, data):
    name = next((v for h, v in zip(head, r) if h == "Kernel Name"), "?")
    print("==", case, re.sub(r"\(CUtensorMap.*", "", name))
    val = lambda key: float(next(v for h, v in zip(head, r) if h == key).replace(",", ""))
    try:
        # Instructions per consumer warp per 128-key tile: the softmax stream's length (the
        # producer's few instructions included).
        pv, schedule, d, n = case.split(":")
        wgs = 3 if schedule.endswith("3wg") else 2
        warps, tiles = val("launch__grid_size") * 4 * wgs, -(-int(n) // 128)
        cycles = val("sm__cycles_elapsed.avg")
        print(f"  clock {val('sm__cycles_elapsed.avg.per_second') / 1e9:.2f} GHz, {cycles / 1e6:.2f} M cycles, "
              f"registers {val('launch__registers_per_thread'):.0f}, issue active "
              f"{val('smsp__issue_active.avg.pct_of_peak_sustained_active'):.1f} %, "
              f"{val('smsp__inst_executed.sum') / warps / tiles:.0f} instructions per consumer warp per tile, "
              f"{cycles / (val('launch__grid_size') / 132) / tiles:.0f} cycles per CTA tile")
    except (StopIteration, ValueError) as e:
        print("  (totals missing:", e, ")")
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
# The source page can list one kernel's SASS twice in a row: skip the repeat.
body = lambda k: [l for l in k[1:] if not l.startswith("\"Kernel Name\"")]
kernels = [k for i, k in enumerate(kernels) if i == 0 or body(k) != body(kernels[i - 1])]
for lines in kernels:
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
    for i in sorted(range(len(samples)), key=lambda i: -samples[i][0])[:15]:
        s, src = samples[i]
        before = f"   <- {samples[i - 1][1][:70]}" if " BRA " in f" {src} " and i else ""
        print(f"  {100 * s / total:5.1f}%  {src[:100]}{before}")
PY
gzip -f "$OUT/sass.csv"
rm -f "$OUT/stalls.ncu-rep" "$OUT/raw.csv" "$OUT/sass.err"