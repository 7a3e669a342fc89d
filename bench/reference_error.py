"""Error of the PyTorch reference (what our kernels must compute) against float64 exact
attention, on the data of /work/shared/docs/h100-baseline.md: bf16 q, k, v = randn,
k += 3 * randn(1, H, 1, D), non-causal.

    python bench/reference_error.py [--seed 0] [--no-write]

Prints a markdown table and writes it to bench/results/reference_error.md. CPU is enough.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sageattn2.config import QUANTIZED_PRECISIONS, AttnConfig, default_smooth_q, parse_precision  # noqa: E402
from sageattn2.reference import exact_attention, reference_attention  # noqa: E402

SHAPES = ((1, 4, 1024, 128), (1, 4, 1024, 64))
FAMILIES = ("mma", "wgmma")
# Published kernel errors on the same data (h100-baseline.md, 1x24x4096x128, vs fp32 SDPA).
PUBLISHED = {
    ("wgmma", "int8+fp8"): ("SageAttn2 sm90 (INT8+FP8)", 0.99926, 0.0383),
    ("mma", "int8+fp16"): ("SageAttn2 sm80 (INT8+FP16)", 0.99993, 0.0113),
}


def baseline_inputs(shape, seed):
    B, H, N, D = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    k = k + 3.0 * torch.randn(1, H, 1, D, generator=gen)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    cos = float((o @ r) / (o.norm() * r.norm()))
    return cos, float((o - r).abs().sum() / r.abs().sum())


def measure(seed):
    """Yields (shape, family, precision, accumulator, cos, rel_l1)."""
    for shape in SHAPES:
        q, k, v = baseline_inputs(shape, seed)
        ref = exact_attention(q.double(), k.double(), v.double())[0]
        for family in FAMILIES:
            for precision in QUANTIZED_PRECISIONS:
                qk, pv = parse_precision(precision)
                cfg = AttnConfig(qk_dtype=qk, pv_dtype=pv, family=family, smooth_q=default_smooth_q(qk))
                variants = [("fp32", None)]
                if family == "wgmma" and pv.value == "fp8":
                    variants.append(("13-bit tile sum", 13))
                for acc_name, bits in variants:
                    out = reference_attention(q, k, v, cfg, fp8_acc_mantissa_bits=bits)[0]
                    yield (shape, family, precision, acc_name, *metrics(out, ref))


def render(rows, seed, command, seconds):
    lines = [
        "# Reference error vs float64 exact attention",
        "",
        f"Date: {datetime.date.today().isoformat()}. Command: `{command}` (CPU, torch {torch.__version__}, "
        f"{seconds:.0f} s on a shared 2-core machine). Data as in h100-baseline.md: bf16, q, k, v = randn, k += 3 * randn(1, H, 1, D), "
        f"non-causal, generator seed {seed}. Per-thread groups; default smoothing (K; K and Q for INT4). "
        "\"13-bit tile sum\" emulates Hopper's FP8 wgmma accumulator (`fp8_acc_mantissa_bits=13`).",
        "",
        "| B×H×N×D | family | precision | PV tile sum | cosine | rel L1 |",
        "|---|---|---|---|---|---|",
    ]
    for shape, family, precision, acc, cos, rel in rows:
        acc_cell = acc if precision.endswith("fp8") else "fp32 (fp16 PV)"
        lines.append(f"| {'×'.join(map(str, shape))} | {family} | {precision} | {acc_cell} | {cos:.5f} | {rel:.4f} |")

    def find(shape, family, precision, acc):
        return next(r for r in rows if r[:4] == (shape, family, precision, acc))

    hd128 = SHAPES[0]
    sm90 = find(hd128, "wgmma", "int8+fp8", "13-bit tile sum")
    sm80 = find(hd128, "mma", "int8+fp16", "fp32")
    int4 = find(hd128, "mma", "int4+fp8", "fp32")
    fp8_over_fp16 = find(hd128, "mma", "int8+fp8", "fp32")[5] / sm80[5]
    trunc_change = max(
        abs(r[5] - find(r[0], r[1], r[2], "fp32")[5]) for r in rows if r[3] == "13-bit tile sum"
    )
    (name90, cos90, rel90), (name80, cos80, rel80) = PUBLISHED[("wgmma", "int8+fp8")], PUBLISHED[("mma", "int8+fp16")]
    lines += [
        "",
        "## Against the published kernels",
        "",
        f"The baseline doc measured {name90} at {cos90} / {rel90} and {name80} at {cos80} / {rel80} "
        f"(cosine / rel L1, 1×24×4096×128, vs fp32 SDPA, H100). The reference with the matching tiles gives "
        f"{sm90[4]:.5f} / {sm90[5]:.4f} (wgmma INT8+FP8, 13-bit tile sum) and {sm80[4]:.5f} / {sm80[5]:.4f} "
        f"(mma INT8+FP16) at 1×4×1024×128, i.e. rel L1 {sm90[5] - rel90:+.4f} and {sm80[5] - rel80:+.4f} "
        f"from the published kernels: a kernel that follows docs/numerics.md should land at thu-ml's accuracy. "
        f"FP8 PV costs {fp8_over_fp16:.1f}× the rel L1 of FP16 PV on this data, and emulating the 13-bit "
        f"accumulator moves rel L1 by at most {trunc_change:.1e}. INT4 QK is far worse here (rel L1 "
        f"{int4[5]:.3f} for mma INT4+FP8): plain randn Q has no block mean for Q smoothing to remove, and 15 "
        f"levels per group leave large score errors.",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    command = "python bench/reference_error.py" + (f" --seed {args.seed}" if args.seed else "")
    start = time.time()
    rows = list(measure(args.seed))
    text = render(rows, args.seed, command, time.time() - start)
    print(text)
    if not args.no_write:
        out = REPO / "bench" / "results" / "reference_error.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
