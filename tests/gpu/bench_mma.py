"""Speed of the mma.sync family per precision level (device script, run by run_gpu.sh).

    python3 tests/gpu/bench_mma.py             # table: TOPS with and without quantization
    python3 tests/gpu/bench_mma.py --sanitize  # a few tiny calls, for compute-sanitizer

TOPS = 4 * B * H * N^2 * D / time (non-causal), time = median of CUDA-event timings over
rotating input sets. On Hopper INT4 and FP8 mma.sync are emulated: those rows say nothing
about Ada/Ampere speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_qkv  # noqa: E402
from sageattn2.backends import mma  # noqa: E402
from sageattn2.config import AttnConfig  # noqa: E402
from sageattn2.loader import kernels_for_device  # noqa: E402

LEVELS = ("int8+fp16", "int8+fp8", "int4+fp16", "int4+fp8")
SHAPES = ((1, 24, 4096, 128), (1, 24, 8192, 64))


def cfg_of(level: str) -> AttnConfig:
    qk, pv = level.split("+")
    return AttnConfig(qk_dtype=qk, pv_dtype=pv, smooth_q=qk == "int4")


def time_ms(fn, sets, reps=30) -> float:
    for s in sets:
        fn(*s)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*sets[i % len(sets)])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench() -> None:
    lib, why = kernels_for_device(torch.device("cuda"))
    assert lib is not None, why
    print(f"card: {torch.cuda.get_device_name()}  (INT4/FP8 mma.sync emulated on sm_90)")
    print("level      shape              total ms  TOPS   kernel ms  TOPS   (quantize = total - kernel)")
    for B, H, N, D in SHAPES:
        flops = 4 * B * H * N * N * D
        sets = [make_qkv(B, H, H, N, N, D, dtype=torch.bfloat16, device="cuda", seed=s) for s in range(3)]
        sdpa = time_ms(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), sets)
        print(f"TOPS sdpa(default)  {B}x{H}x{N}x{D}  {sdpa:8.3f}  {flops / sdpa / 1e9:5.0f}")
        for level in LEVELS:
            cfg = cfg_of(level)
            full = lambda q, k, v: mma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=False, sm_scale=None,
                                                 return_lse=False, force_int4_emulation=True)
            qsets = [(mma.quantize(*s, layout="HND", cfg=cfg, dk=lib), s[0], s[1]) for s in sets]
            kern = lambda qz, q, k: mma.launch(lib, qz, q, k, layout="HND", cfg=cfg, is_causal=False,
                                               sm_scale=0.1, return_lse=False)
            t_full, t_kern = time_ms(full, sets), time_ms(kern, qsets)
            print(f"level {level:10s} {B}x{H}x{N}x{D}  {t_full:8.3f}  {flops / t_full / 1e9:5.0f}  "
                  f"{t_kern:9.3f}  {flops / t_kern / 1e9:5.0f}")


def profile() -> None:
    """GPU time of each kernel of one attention call (quantizers included), per level."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    B, H, N, D = SHAPES[0]
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=torch.bfloat16, device="cuda", seed=0)
    for level in LEVELS[:2]:
        cfg = cfg_of(level)
        call = lambda: mma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=False, sm_scale=None, return_lse=True)
        call()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        print(f"profile {level} {B}x{H}x{N}x{D} (us per call)")
        for e in prof.key_averages():
            if e.device_type.name == "CUDA":
                print(f"profile   {e.key[:60]:60s} {e.device_time_total / 5:8.1f}")


def sanitize() -> None:
    """Tails, padding, GQA, strides and every PV path on tiny shapes."""
    cases = [("int8+fp8", 128, 65, 33, "HND", True), ("int4+fp16", 80, 1, 70, "NHD", False),
             ("int8+fp16", 256, 70, 129, "HND", True), ("int4+fp8", 64, 130, 64, "NHD", True)]
    for level, d, nq, nk, layout, causal in cases:
        qk, pv = level.split("+")
        cfg = AttnConfig(qk_dtype=qk, pv_dtype=pv, smooth_q=True, smooth_v=pv == "fp16")
        q, k, v = make_qkv(1, 4, 2, nq, nk, d, dtype=torch.float16, device="cuda", layout=layout, seed=1)
        o, lse = mma.attention(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=None,
                               return_lse=True, force_int4_emulation=True)
        torch.cuda.synchronize()
        print(level, d, nq, nk, layout, "finite" if torch.isfinite(o).all() and torch.isfinite(lse).all() else "NaN")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    sanitize() if args.sanitize else profile() if args.profile else bench()
