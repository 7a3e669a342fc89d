"""Self-check after a build: accuracy and speed of each precision level against SDPA on a
few model shapes, on this GPU, and of the INT8 levels with the Hadamard rotation (`hadamard=True`:
the rotating quantizers). `python -m sageattn2.selfcheck` (install.py runs it).

Exit status 1 if any level that a kernel serves misses its accuracy floor: a broken build
must not go unnoticed.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import autotune, dispatch
from .api import sageattn
from .config import QUANTIZED_PRECISIONS

# (label, B, H, N, D)
SHAPES = [
    ("Flux 1024²", 1, 24, 4608, 128),
    ("SDXL 1024² stage 1", 2, 10, 4096, 64),
    ("WAN 1.3B 480p (1/4 of the frames)", 1, 12, 8192, 128),
]
# Worst cosine against exact attention each level must reach on these inputs.
COSINE_FLOOR = {"int8+fp16": 0.9995, "int8+fp8": 0.998, "int4+fp16": 0.99, "int4+fp8": 0.99}


def make_inputs(b, h, n, d, device, dtype=torch.bfloat16):
    """Random q/k/v with the per-channel K bias real diffusion models show."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    k += 3 * torch.randn(1, h, 1, d, device=device, dtype=dtype, generator=g)
    return q, k, v


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def time_ms(fn, iters=30) -> tuple[float, float]:
    """(GPU ms per call over back-to-back calls, host ms per call to enqueue one).

    Back to back is how a model issues attention; the host time shows whether the Python
    path could starve the GPU (it does when host time exceeds GPU time).
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters, host


def run(device="cuda") -> tuple[list[list[str]], bool]:
    rows, ok = [], True
    for label, b, h, n, d in SHAPES:
        q, k, v = make_inputs(b, h, n, d, device)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        t_sdpa, host_sdpa = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        flops = 4 * b * h * n * n * d
        rows.append([label, "SDPA (exact)", "torch", f"{flops / t_sdpa / 1e9:.0f}", "1.00x",
                     f"{host_sdpa * 1e3:.0f}", f"{cosine(F.scaled_dot_product_attention(q, k, v), ref):.6f}", ""])
        # Without outlier channels the rotation moves INT8's cosine by under 1e-4 (CPU reference).
        levels = [(p, False) for p in QUANTIZED_PRECISIONS] + [(p, True) for p in QUANTIZED_PRECISIONS
                                                               if p.startswith("int8")]
        for precision, rotate in levels:
            plan = dispatch.plan(q, k, v, layout="HND", precision=precision, granularity="per_thread",
                                 smooth_k=True, smooth_q=None, smooth_v=False, is_causal=False, hadamard=rotate)
            requested = precision + ("+hadamard" if rotate else "")
            if plan.backend == "exact":
                rows.append([label, requested, "not served", "", "", "", "", plan.note or ""])
                continue
            served = f"{plan.backend} {plan.cfg.precision}" + (" rotated" if plan.cfg.hadamard else "")
            out = sageattn(q, k, v, precision=precision, hadamard=rotate)
            cos = cosine(out, ref)
            t, host = time_ms(lambda: sageattn(q, k, v, precision=precision, hadamard=rotate))
            floor = COSINE_FLOOR[plan.cfg.precision]
            status = "ok" if cos >= floor and torch.isfinite(out).all() else f"FAIL (< {floor})"
            ok &= status == "ok"
            rows.append([label, requested, served, f"{flops / t / 1e9:.0f}", f"{t_sdpa / t:.2f}x",
                         f"{host * 1e3:.0f}", f"{cos:.6f}", status])
        # auto: whatever it decided for this shape (timed once), never slower than SDPA.
        out = sageattn(q, k, v)
        t, host = time_ms(lambda: sageattn(q, k, v))
        plan = dispatch.plan(q, k, v, layout="HND", precision="auto", granularity="per_thread",
                             smooth_k=True, smooth_q=None, smooth_v=False, is_causal=False)
        pays = autotune._decisions.get(autotune.shape_key(q, k, "HND", False))
        served = "exact (SDPA)" if plan.backend == "exact" or pays is False else f"{plan.backend} {plan.cfg.precision}"
        rows.append([label, "auto", served, f"{flops / t / 1e9:.0f}", f"{t_sdpa / t:.2f}x", f"{host * 1e3:.0f}",
                     f"{cosine(out, ref):.6f}", ""])
    return rows, ok


def format_table(rows) -> str:
    head = ["shape", "requested", "served by", "TOPS", "vs SDPA", "host µs/call", "cosine", "check"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    if not torch.cuda.is_available():
        print("[sageattn2 selfcheck] no CUDA GPU visible: nothing to check")
        return 0
    t0 = time.time()
    rows, ok = run()
    print(f"[sageattn2 selfcheck] {torch.cuda.get_device_name()} ({time.time() - t0:.0f} s; "
          "TOPS = 4*B*H*N^2*D / time, end to end including quantization)")
    print(format_table(rows))
    print("[sageattn2 selfcheck] " + ("all served levels pass" if ok else "SOME LEVELS FAILED: please report"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
