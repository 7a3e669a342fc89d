"""Per-CTA fixed cost of the Hopper kernel: device time of one wave of CTAs (132 on an H100
SXM) against the number of key tiles, fitted as t = fixed + tiles * per_tile (torch.profiler
device times, so host overhead is not counted). What a CTA spends outside its steady-state
tile loop (launch, Q and first K/V loads, pipeline fill, the slowest warpgroup's tail,
epilogue) is `fixed`; at N = 4096 a CTA runs 32 tiles.

    python3 tests/gpu/fixed_cost.py [pv:schedule:rows_per_cta:head_dim ...]   (after install.py)
"""
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sageattn2.backends import wgmma  # noqa: E402
from sageattn2.config import AttnConfig, Family, PVDType  # noqa: E402

SMS = torch.cuda.get_device_properties(0).multi_processor_count


def device_us(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = [e.device_time for e in prof.events() if "attention_kernel" in e.name]
    return statistics.median(times)


def prepared(pv, heads, nq, nk, d):
    """Quantized random operands (1, heads, n, d) for one kernel launch."""
    q = torch.randn(1, heads, nq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, heads, nk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cfg = AttnConfig(pv_dtype=PVDType(pv), family=Family.WGMMA)
    return wgmma.prepare(q, k, v, layout="HND", cfg=cfg, is_causal=False)


def sweep(pv, schedule, rows_per_cta, d=128, nq=4096):
    heads = max(1, SMS // (nq // rows_per_cta))  # one wave (or just under)
    ctas = heads * -(-nq // rows_per_cta)
    print(f"== {pv} {schedule} d{d}: 1x{heads}x{nq} queries, {ctas} CTAs on {SMS} SMs")
    xs, ys = [], []
    for nk in (128, 512, 1024, 2048, 4096, 8192, 16384):
        prep = prepared(pv, heads, nq, nk, d)
        t = device_us(lambda: wgmma.run(prep, schedule=schedule))
        tiles = nk // 128
        xs.append(tiles)
        ys.append(t)
        print(f"  {tiles:4d} key tiles: {t:9.1f} us")
    fit = [(x, y) for x, y in zip(xs, ys) if x >= 8]
    mx, my = statistics.mean(x for x, _ in fit), statistics.mean(y for _, y in fit)
    per_tile = sum((x - mx) * (y - my) for x, y in fit) / sum((x - mx) ** 2 for x, _ in fit)
    fixed = my - per_tile * mx
    print(f"  fit over >= 8 tiles: fixed {fixed:.2f} us + {per_tile * 1000:.0f} ns per tile; "
          f"fixed = {fixed / per_tile:.1f} tiles; share of a 32-tile CTA {100 * fixed / (fixed + 32 * per_tile):.1f} %, "
          f"of a 256-tile CTA {100 * fixed / (fixed + 256 * per_tile):.1f} %")


def waves(pv, schedule, rows_per_cta, d=128, nq=4096):
    """Same key tiles, more waves: t = launch + waves * (per_cta + tiles * per_tile) separates
    what a launch pays once (first-wave cold caches, launch) from what every CTA pays."""
    per_head = -(-nq // rows_per_cta)
    base_heads = max(1, SMS // per_head)
    print(f"== {pv} {schedule} d{d}: waves of {base_heads * per_head} CTAs")
    for nk in (512, 4096):
        pts = []
        for w in (1, 2, 4, 8):
            heads = base_heads * w
            prep = prepared(pv, heads, nq, nk, d)
            pts.append((w, device_us(lambda: wgmma.run(prep, schedule=schedule))))
        mx, my = statistics.mean(w for w, _ in pts), statistics.mean(t for _, t in pts)
        slope = sum((w - mx) * (t - my) for w, t in pts) / sum((w - mx) ** 2 for w, _ in pts)
        print(f"  {nk // 128:3d} tiles: " + ", ".join(f"{w} waves {t:.1f} us" for w, t in pts)
              + f" -> {slope:.2f} us per wave, {my - slope * mx:.2f} us once per launch")


if __name__ == "__main__":
    # Cases as pv:schedule:rows_per_cta:head_dim (default: the default schedules and a wave sweep).
    if len(sys.argv) > 1:
        for case in sys.argv[1:]:
            pv, schedule, rows, d = case.split(":")
            sweep(pv, schedule, int(rows), d=int(d))
    else:
        waves("fp8", "sequential3wg", 192)
        sweep("fp8", "sequential3wg", 192)
        sweep("fp8", "sequential3wg", 192, d=64)
        sweep("fp16", "overlap", 128)
