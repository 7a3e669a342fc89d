"""One side of an A/B of mma.sync kernel builds (device script, run by rtx_round.sh's bench stage).

    SAGEATTN2_NVRTC_FLAGS="-DSA2_SWITCH=1" SAGEATTN2_CACHE_DIR=/tmp/sa2_ab/alt \
        python3 tests/gpu/mma_ab.py --name alt --shapes 1x24x8192x128,1x24x16384x64 >> ab.md

Prints one markdown row per shape: our int8+fp16 whole call (bf16 inputs) and thu-ml's sm80
kernel (`sageattn_qk_int8_pv_fp16_cuda`, fp32 accumulation) in the same process, TOPS, their
ratio and our error against fp32 SDPA. thu-ml is timed in every process so that run-to-run
drift of the card shows up beside the difference between builds. The kernels this build
needs are compiled on first use (NVRTC, with the flags of this process).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_attention import bench_seconds, errors, parse_shape  # noqa: E402
from sageattn2.backends import mma  # noqa: E402
from sageattn2.config import AttnConfig, Family, PVDType  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--shapes", required=True, help="comma-separated BxHxNxD[c] (c = causal)")
    ap.add_argument("--header", action="store_true", help="print the table header first")
    ap.add_argument("--warm", action="store_true", help="one call per shape (compiles this build's kernels), no timing")
    args = ap.parse_args()
    try:
        from sageattention import sageattn_qk_int8_pv_fp16_cuda
    except ImportError:
        sageattn_qk_int8_pv_fp16_cuda = None
    if args.header:
        print("| build | shape | ours int8+fp16 TOPS | thu-ml sm80 TOPS | ratio | ours cos / rel L1 |")
        print("|---|---|---|---|---|---|")
    cfg = AttnConfig(pv_dtype=PVDType.FP16, family=Family.MMA)
    for spec in args.shapes.split(","):
        b, h, n, d, causal = parse_shape(spec)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
        k = k + 3 * torch.randn(b, h, 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        if args.warm:
            mma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=causal, sm_scale=None, return_lse=False)
            torch.cuda.synchronize()
            continue

        def ours():
            return mma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=causal, sm_scale=None,
                                 return_lse=False)[0]

        ours_tops = flops / bench_seconds(ours) / 1e12
        err = "-"
        if n <= 8192:
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            cos, rel = errors(ours(), ref)
            err = f"{cos:.5f} / {rel:.4f}"
            del ref
        theirs = "-"
        ratio = "-"
        if sageattn_qk_int8_pv_fp16_cuda is not None:
            t = flops / bench_seconds(lambda: sageattn_qk_int8_pv_fp16_cuda(
                q, k, v, tensor_layout="HND", is_causal=causal, pv_accum_dtype="fp32")) / 1e12
            theirs, ratio = f"{t:.0f}", f"{ours_tops / t:.2f}"
        print(f"| {args.name} | {spec} | {ours_tops:.0f} | {theirs} | {ratio} | {err} |", flush=True)
    if args.warm:
        print(f"{args.name}: kernels ready ({args.shapes})")


if __name__ == "__main__":
    main()
