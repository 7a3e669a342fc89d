"""What the Hadamard rotation (numerics.md §1.6) costs in the fused quantizers (device script,
run by tests/gpu/run_hadamard.sh).

    python3 bench/bench_hadamard.py             # quantizer and whole-call ms, without / with it
    python3 bench/bench_hadamard.py --sanitize  # a few tiny rotating calls, for compute-sanitizer

Times are medians of CUDA-event timings over rotating input sets (mma family; on Hopper INT4
mma.sync is emulated, so only the quantizer column says anything there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))

from bench_mma import cfg_of, time_ms  # noqa: E402
from conftest import make_qkv  # noqa: E402
from sageattn2.backends import mma  # noqa: E402
from sageattn2.loader import kernels_for_device  # noqa: E402

LEVELS = ("int8+fp16", "int8+fp8", "int4+fp8")
SHAPES = ((1, 24, 4096, 128), (1, 24, 8192, 64))


def bench() -> None:
    lib, why = kernels_for_device(torch.device("cuda"))
    assert lib is not None, why
    print(f"card: {torch.cuda.get_device_name()}")
    print("level      shape              quantize ms plain  rotated   whole call ms plain  rotated")
    for B, H, N, D in SHAPES:
        sets = [make_qkv(B, H, H, N, N, D, dtype=torch.bfloat16, device="cuda", seed=s) for s in range(3)]
        for level in LEVELS:
            row = []
            for part in ("quantize", "call"):
                for hadamard in (False, True):
                    cfg = cfg_of(level).with_(hadamard=hadamard)
                    if part == "quantize":
                        fn = lambda q, k, v, cfg=cfg: mma.quantize(q, k, v, layout="HND", cfg=cfg, dk=lib)
                    else:
                        fn = lambda q, k, v, cfg=cfg: mma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=False,
                                                                    sm_scale=None, return_lse=False,
                                                                    force_int4_emulation=True)
                    row.append(time_ms(fn, sets))
            print(f"hadamard {level:10s} {B}x{H}x{N}x{D}  {row[0]:8.3f} {row[1]:8.3f}        {row[2]:8.3f} {row[3]:8.3f}")


def sanitize() -> None:
    """Tails, padding, GQA, strides, Q smoothing and every head dim through the rotating quantizers."""
    cases = [("int8+fp8", 128, 65, 33, "HND", True), ("int4+fp16", 80, 1, 70, "NHD", False),
             ("int8+fp16", 256, 70, 129, "HND", True), ("int4+fp8", 64, 130, 64, "NHD", True),
             ("int8+fp16", 36, 17, 300, "NHD", False)]
    bad = []
    for level, d, nq, nk, layout, causal in cases:
        cfg = cfg_of(level).with_(hadamard=True, smooth_q=True)
        q, k, v = make_qkv(1, 4, 2, nq, nk, d, dtype=torch.float16, device="cuda", layout=layout, seed=1)
        o, lse = mma.attention(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=None,
                               return_lse=True, force_int4_emulation=True)
        torch.cuda.synchronize()
        finite = bool(torch.isfinite(o).all() and torch.isfinite(lse).all())
        print(level, d, nq, nk, layout, "finite" if finite else "NaN")
        if not finite:
            bad.append((level, d, nq, nk, layout))
    if bad:
        sys.exit(f"non-finite outputs: {bad}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sanitize", action="store_true")
    sanitize() if parser.parse_args().sanitize else bench()
