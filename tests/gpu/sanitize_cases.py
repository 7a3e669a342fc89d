"""Every product kernel once on small shapes, for compute-sanitizer (tests/gpu/sanitize.sh).

mma family: padded head dims 64/128/256 (+ d=36: padding and the 16-bit V copy), INT8 and
INT4 QK (INT4 forced where it is emulated), PV fp16 / bf16 / FP8, causal or not, every
granularity, Q/V smoothing, HND and NHD. wgmma family (Hopper): head dims 64/128 (+ d=100),
PV FP8 / fp16 / bf16, every schedule of each head dim, causal or not. All with ragged tails
(token counts that are not tile multiples), GQA (4 query heads on 2 kv heads) and the lse.
The fused quantizer and the 16-bit V copy kernel run as part of each call.

Prints one line per case and "CASES n ok m"; exit 1 when a call raised or gave non-finite
output. The numbers themselves are the kernel tests' business (test_*_kernels.py).
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sageattn2 import loader  # noqa: E402
from sageattn2.backends import mma  # noqa: E402
from sageattn2.config import AttnConfig  # noqa: E402

DEV = torch.device("cuda", 0)
GRANULARITIES = ("per_thread", "per_warp", "per_block")


def inputs(d, dtype, layout, causal, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    nq, nk = (129, 129) if causal else (77, 130)
    shape = lambda h, n: (2, h, n, d) if layout == "HND" else (2, n, h, d)
    q = torch.randn(shape(4, nq), device=DEV, generator=g, dtype=dtype)
    k = torch.randn(shape(2, nk), device=DEV, generator=g, dtype=dtype)
    v = torch.randn(shape(2, nk), device=DEV, generator=g, dtype=dtype)
    return q, k, v


def mma_cases():
    pv_types = ((torch.float16, "fp16"), (torch.bfloat16, "fp16"), (torch.bfloat16, "fp8"), (torch.float16, "fp8"))
    has_fp8 = LIB.arch.fp8_mma
    for n, (d, qk, (dtype, pv), causal) in enumerate(
            itertools.product((64, 128, 256, 36), ("int8", "int4"), pv_types, (False, True))):
        if pv == "fp8" and not has_fp8:
            continue
        smooth_v = n % 7 == 3
        cfg = AttnConfig(qk, pv, GRANULARITIES[n % 3], smooth_k=n % 5 != 4, smooth_q=qk == "int4" or n % 6 == 1,
                         smooth_v=smooth_v)
        layout = "NHD" if n % 4 == 2 else "HND"
        yield f"mma d={d} {cfg.uri} {dtype} causal={causal} {layout}", lambda d=d, cfg=cfg, dtype=dtype, causal=causal, \
            layout=layout, n=n: run_mma(d, cfg, dtype, causal, layout, n)


def run_mma(d, cfg, dtype, causal, layout, seed):
    q, k, v = inputs(d, dtype, layout, causal, seed)
    o, lse = mma.attention(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=d ** -0.5, return_lse=True,
                           force_int4_emulation=True)
    return o, lse


def wgmma_cases():
    from sageattn2.backends import wgmma

    pv_types = ((torch.bfloat16, "fp8"), (torch.float16, "fp16"), (torch.bfloat16, "fp16"))
    n = 0
    for d in (64, 128, 100):
        for (dtype, pv), causal in itertools.product(pv_types, (False, True)):
            cfg = AttnConfig("int8", pv, "per_thread", smooth_k=n % 3 != 2, family="wgmma")
            schedules = wgmma.schedules_for(d) if d in (64, 128) else (None,)
            for schedule in schedules:
                layout = "NHD" if n % 4 == 1 else "HND"
                yield (f"wgmma d={d} {cfg.uri} {dtype} causal={causal} schedule={schedule or 'default'} {layout}",
                       lambda d=d, cfg=cfg, dtype=dtype, causal=causal, schedule=schedule, layout=layout, n=n:
                       run_wgmma(wgmma, d, cfg, dtype, causal, schedule, layout, n))
                n += 1


def run_wgmma(wgmma, d, cfg, dtype, causal, schedule, layout, seed):
    q, k, v = inputs(d, dtype, layout, causal, seed)
    if schedule is None:  # the product path: cached plan, fused quantizer, default schedule
        return wgmma.attention(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=d ** -0.5, return_lse=True)
    prep = wgmma.prepare(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=d ** -0.5, return_lse=True)
    return wgmma.run(prep, return_lse=True, schedule=schedule)


def main() -> int:
    global LIB
    LIB, why = loader.kernels_for_device(DEV)
    if LIB is None:
        print(f"no kernel library: {why}")
        return 2
    families = set(LIB.families)
    cases = list(mma_cases()) if "mma" in families else []
    if "wgmma" in families and torch.cuda.get_device_capability(DEV) == (9, 0):
        cases += list(wgmma_cases())
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    ok = 0
    run = [(name, fn) for name, fn in cases if only in name]
    for name, fn in run:
        try:
            o, lse = fn()
            torch.cuda.synchronize()
            finite = bool(torch.isfinite(o).all()) and bool(torch.isfinite(lse).all())
            status = "ok" if finite else "NON-FINITE"
        except Exception as e:  # keep going: the sanitizer's report is the point
            status = f"RAISED {type(e).__name__}: {str(e)[:200]}"
        ok += status == "ok"
        print(f"{status:6s} {name}", flush=True)
    print(f"CASES {len(run)} ok {ok}", flush=True)
    return 0 if ok == len(run) else 1


if __name__ == "__main__":
    sys.exit(main())
