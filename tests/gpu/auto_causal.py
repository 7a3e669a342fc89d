"""The public API's `auto` on one shape (default 1x32x8192x128 causal): what it decides in fresh
decisions after idle time, against block-wise timing (all quantized calls, then all exact ones,
5 each after one warm-up: the timing `auto` used before), and the throughput of what it then
runs against int8+fp8, SDPA (default backend) and SDPA cuDNN.

    python tests/gpu/auto_causal.py [--shape 1x32x8192x128] [--causal 1] [--trials 6] [--out FILE]

Exit status 1 when `auto` runs more than 2 % below the faster of int8+fp8 and the exact path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sageattn2  # noqa: E402
from sageattn2 import autotune  # noqa: E402
from sageattn2.api import exact_sdpa  # noqa: E402


def blockwise(run_q, run_e, iters=5):
    """The former timing: one warm-up, then `iters` calls of one path, then of the other."""
    out = []
    for fn in (run_q, run_e):
        fn()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        out.append(sorted(s.elapsed_time(e) for s, e in ev)[iters // 2])
    return tuple(out)


def tops(fn, flops, iters=20):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    return flops / (s.elapsed_time(e) / iters * 1e-3) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1x32x8192x128")
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--idle", type=float, default=1.0, help="seconds idle before each decision")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    b, h, n, d = (int(x) for x in args.shape.split("x"))
    causal = bool(args.causal)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    k += 3 * torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    flops = 4 * b * h * n * n * d / (2 if causal else 1)
    quant = lambda: sageattn2.sageattn(q, k, v, is_causal=causal, precision="int8+fp8")
    exact = lambda: exact_sdpa(q, k, v, "HND", causal, d ** -0.5, False)

    lines = [f"# `auto` at {args.shape}{' causal' if causal else ''}: {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}", "",
             "| trial | interleaved: quantized / exact ms | decision | block-wise: quantized / exact ms | would decide |",
             "|---|---|---|---|---|"]
    decisions = []
    for t in range(args.trials):
        autotune._decisions.clear()
        torch.cuda.synchronize()
        time.sleep(args.idle)
        sageattn2.sageattn(q, k, v, is_causal=causal)  # decides
        key = autotune.shape_key(q, k, "HND", causal)
        tq, te = autotune.timings[key]
        decisions.append(autotune._decisions[key])
        torch.cuda.synchronize()
        time.sleep(args.idle)
        bq, be = blockwise(quant, exact)
        lines.append(f"| {t + 1} | {tq:.3f} / {te:.3f} | {'quantized' if decisions[-1] else 'exact'} | "
                     f"{bq:.3f} / {be:.3f} | {'quantized' if bq < be else 'exact'} |")

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    rates = {"auto": tops(lambda: sageattn2.sageattn(q, k, v, is_causal=causal), flops),
             "int8+fp8": tops(quant, flops), "exact (api)": tops(exact, flops), "SDPA cuDNN": tops(cudnn, flops)}
    lines += ["", "| path | TOPS |", "|---|---|"] + [f"| {p} | {r:.0f} |" for p, r in rates.items()]
    best = max(rates["int8+fp8"], rates["exact (api)"])
    ok = rates["auto"] >= 0.98 * best
    lines += ["", f"auto {'OK' if ok else 'SLOWER THAN IT SHOULD BE'}: {rates['auto']:.0f} TOPS against the "
              f"faster of int8+fp8 and exact, {best:.0f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
