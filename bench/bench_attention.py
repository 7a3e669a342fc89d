"""The team's attention benchmark: one table per run, TOPS and error per shape and method.

    python bench/bench_attention.py [--shapes 1x24x4096x128,1x32x8192x128c] [--quick] [--out F]
                                    [--all-schedules] [--breakdown 1x24x4608x128,1x40x32760x128]
                                    [--no-table] [--no-mma] [--json F] [--package-root DIR]
    python bench/bench_attention.py --compare before.json after.json

Inputs follow ../shared/docs/h100-baseline.md: bf16 (B, H, N, D) randn with
k += 3 * randn(1, H, 1, D), non-causal unless the shape ends in "c". TOPS = 4*B*H*N^2*D / t
(halved for causal), t = median of triton.testing.do_bench (warm-up 100 ms, 400 ms of repeats;
calls longer than 50 ms are timed as the median of 3, longer than 0.5 s once, after a warm-up). Error = cosine /
relative L1 against fp32 SDPA for N <= 8192. Our levels are timed kernel-only (operands
already quantized) and end to end (quantization included, in parentheses; for the wgmma
default schedule the backend's `attention()`, the call dispatch makes).
--breakdown times the wgmma quantization (`prepare`) against the kernel per shape, the whole
`attention()` call, its host time (perf_counter around back-to-back calls without a sync: what
the CPU spends enqueueing one call) and the device time of each quantizer kernel
(torch.profiler). --json writes those numbers; --package-root imports `sageattn2` from another
tree (e.g. an export of an older commit; SAGEATTN2_CACHE_DIR, or SAGEATTN2_BUILD_DIR for nvcc-built trees, says where its kernels are)
so two versions can be timed on one machine; --compare prints their before/after table.
The markdown table also goes to --out (default $OUT/bench_attention.md when $OUT is set).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch

_root = sys.argv[sys.argv.index("--package-root") + 1] if "--package-root" in sys.argv else None
sys.path.insert(0, str(Path(_root).resolve() if _root else Path(__file__).resolve().parents[1]))

from sageattn2.config import AttnConfig, Family, PVDType  # noqa: E402

TARGET_SHAPES = [
    "1x24x4096x128", "1x24x8192x128", "1x24x16384x128", "1x40x32760x128",
    "1x24x8192x64", "1x24x16384x64",
]
EXTRA_SHAPES = ["2x40x32760x128", "1x24x119056x128", "1x32x8192x128c", "1x24x4608x128"]
QUICK_SHAPES = ["1x24x4096x128", "1x24x8192x128", "1x24x8192x64", "1x32x8192x128c"]
ERROR_MAX_N = 8192


def parse_shape(s):
    causal = s.endswith("c")
    b, h, n, d = (int(x) for x in s.rstrip("c").split("x"))
    return b, h, n, d, causal


def bench_seconds(fn):
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) / 1e3
    if once > 0.5:  # seconds per call: a second sample adds nothing but device time
        return once
    if once > 0.05:
        times = []
        for _ in range(3):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[1]
    return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median") / 1e3


def errors(out, ref):
    if ref is None:
        return None
    o, r = out.float().flatten(), ref.flatten()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    return cos, ((o - r).abs().sum() / r.abs().sum()).item()


def methods(q, k, v, causal, all_schedules, with_mma=True):
    """(name, kernel-only fn, end-to-end fn or None) for everything available here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    out = []
    for name, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION),
                          ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        def run_sdpa(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=causal)
        out.append((name, run_sdpa, None))

    try:
        from sageattn2.backends import wgmma
    except ImportError:
        wgmma = None
    if wgmma is not None:
        variants = [(level, pv, schedule)
                    for level, pv in (("int8+fp8", PVDType.FP8), ("int8+fp16", PVDType.FP16))
                    for schedule in (wgmma.default_schedule(pv, q.shape[-1]),)]
        if all_schedules:
            variants += [(f"{level} {schedule}", pv, schedule)
                         for level, pv in (("int8+fp8", PVDType.FP8), ("int8+fp16", PVDType.FP16))
                         for schedule in wgmma.schedules_for(q.shape[-1])
                         if schedule != wgmma.default_schedule(pv, q.shape[-1])]
        for level, pv, schedule in variants:
            cfg = AttnConfig(pv_dtype=pv, family=Family.WGMMA)
            if wgmma.unsupported_reason(q, k, v, layout="HND", cfg=cfg, is_causal=causal):
                continue
            prep = wgmma.prepare(q, k, v, layout="HND", cfg=cfg, is_causal=causal)

            def kernel_only(prep=prep, schedule=schedule):
                return wgmma.run(prep, schedule=schedule)[0]

            def end_to_end(cfg=cfg, schedule=schedule):
                # The default schedule through attention(), the call dispatch makes (its plan is
                # cached per signature); prepare + run rebuild their host-side work every call.
                if schedule == wgmma.default_schedule(cfg.pv_dtype, q.shape[-1]):
                    return wgmma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=causal, sm_scale=None,
                                           return_lse=False)[0]
                p = wgmma.prepare(q, k, v, layout="HND", cfg=cfg, is_causal=causal)
                return wgmma.run(p, schedule=schedule)[0]

            # End to end for the default, and for every head-dim-64 schedule (defaults undecided).
            timed_e2e = schedule == wgmma.default_schedule(pv, q.shape[-1]) or q.shape[-1] <= 64
            out.append((f"wgmma {level}", kernel_only, end_to_end if timed_e2e else None))

    try:
        from sageattn2.backends import mma
    except ImportError:
        mma = None
    if mma is not None and with_mma:
        for level, pv, acc in (("int8+fp8", PVDType.FP8, "fp32"), ("int8+fp16", PVDType.FP16, "fp32"),
                               ("int8+fp8 acc16", PVDType.FP8, "fp16"), ("int8+fp16 acc16", PVDType.FP16, "fp16")):
            cfg = AttnConfig(pv_dtype=pv, family=Family.MMA, pv_accum=acc)
            try:
                if mma.unsupported_reason(q, k, v, layout="HND", cfg=cfg, is_causal=causal):
                    continue
            except Exception:  # a backend still in progress must not break the table
                continue

            def run_mma(cfg=cfg):
                return mma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=causal,
                                     sm_scale=None, return_lse=False)[0]
            out.append((f"mma {level} (e2e)", run_mma, None))

    try:
        from sageattention import sageattn
    except ImportError:
        sageattn = None
    if sageattn is not None:
        out.append(("thu-ml sageattn",
                    lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=causal), None))
    try:  # its sm80 mma.sync kernel (tests/gpu/build_thuml.sh builds the fp32-accumulation variant)
        from sageattention import sageattn_qk_int8_pv_fp16_cuda
        from sageattention import sm80_compile  # noqa: F401  (absent when not built)
    except ImportError:
        sageattn_qk_int8_pv_fp16_cuda = None
    if sageattn_qk_int8_pv_fp16_cuda is not None:
        out.append(("thu-ml sm80 int8+fp16",
                    lambda: sageattn_qk_int8_pv_fp16_cuda(q, k, v, tensor_layout="HND", is_causal=causal,
                                                          pv_accum_dtype="fp32"), None))
    return out


HOST_CALLS = 50


def host_us_per_call(fn, calls=HOST_CALLS):
    """CPU time to enqueue one call: back-to-back calls, no sync inside the timed loop (the
    launch queue holds them all, so the CPU never waits for the GPU)."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def _is_quantizer(name):
    return any(x in name for x in ("quantize", "smooth_v16"))  # csrc/include/sa2/quant_kernels.cuh


def quant_breakdown(specs, records):
    """Markdown lines: prepare (quantization), kernel and whole-call time per shape and PV type,
    host µs per call, and the device time of each quantizer kernel in one call. Appends one
    dict per row to `records`."""
    from torch.profiler import ProfilerActivity, profile

    from sageattn2.backends import wgmma

    lines = ["", "Quantization (wgmma `prepare`) vs kernel, µs per call; HBM GB/s = (bf16 Q,K,V read "
             "once + int8/fp8 written once) / quantizer device time; host = CPU µs to enqueue one "
             "`attention()` call", "",
             "| shape | PV | prepare µs | kernel µs | attention() µs | host µs | quantizer device µs "
             "| device / kernel | HBM GB/s | per quantizer kernel, µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        b, h, n, d, causal = parse_shape(spec)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
                   for _ in range(3))
        k = k + 3 * torch.randn(1, h, 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
        for pv in (PVDType.FP8, PVDType.FP16):
            cfg = AttnConfig(pv_dtype=pv, family=Family.WGMMA)
            prep = wgmma.prepare(q, k, v, layout="HND", cfg=cfg, is_causal=causal)
            call = lambda: wgmma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=causal,
                                           sm_scale=None, return_lse=False)
            t_prep = bench_seconds(lambda: wgmma.prepare(q, k, v, layout="HND", cfg=cfg,
                                                         is_causal=causal))
            t_kern = bench_seconds(lambda: wgmma.run(prep))
            t_call = bench_seconds(call)
            host = host_us_per_call(call)
            elems = b * h * n * d
            moved = 3 * elems * 2 + 2 * elems + (elems if pv is PVDType.FP8 else 0)
            reps = 5
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    call()
                torch.cuda.synchronize()
            # Template instances of one kernel are separate profiler keys: sum them by name.
            totals, counts = {}, {}
            for e in prof.key_averages():
                us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                name = e.key.replace("void ", "").replace("(anonymous namespace)::", "")
                name = name.split("<")[0].split("(")[0]
                if us > 0 and _is_quantizer(name):
                    totals[name] = totals.get(name, 0.0) + us / reps
                    counts[name] = counts.get(name, 0) + e.count
            parts = {f"{n} x{counts[n] // reps}": us for n, us in totals.items()}
            quant_us = sum(parts.values())
            rec = dict(shape=spec, pv=pv.value, prepare_us=t_prep * 1e6, kernel_us=t_kern * 1e6,
                       call_us=t_call * 1e6, host_us=host, quant_device_us=quant_us, kernels=parts,
                       device=torch.cuda.get_device_name())
            records.append(rec)
            lines.append(f"| {spec} | {pv.value} | {t_prep * 1e6:.1f} | {t_kern * 1e6:.1f} | "
                         f"{t_call * 1e6:.1f} | {host:.1f} | {quant_us:.1f} | "
                         f"{100 * quant_us / (t_kern * 1e6):.1f} % | {moved / quant_us / 1e3:.0f} | "
                         f"{'; '.join(f'{k}: {u:.1f}' for k, u in parts.items())} |")
        q = k = v = prep = None  # free before the next shape
        torch.cuda.empty_cache()
    return lines


def compare(before_path, after_path):
    """Before/after table of two --json files (same shapes and PV types)."""
    import json

    before = {(r["shape"], r["pv"]): r for r in json.loads(Path(before_path).read_text())}
    after = json.loads(Path(after_path).read_text())
    lines = ["| shape | PV | host µs/call | quantizer device µs | device / kernel | prepare µs "
             "| attention() µs | (prepare + kernel) share: prepare / kernel |",
             "|---|---|---|---|---|---|---|---|"]
    for r in after:
        o = before.get((r["shape"], r["pv"]))
        if o is None:
            continue
        f = lambda key, fmt="{:.1f}": f"{fmt.format(o[key])} -> {fmt.format(r[key])}"
        share = lambda x: 100 * x["quant_device_us"] / x["kernel_us"]
        lines.append(f"| {r['shape']} | {r['pv']} | {f('host_us')} | {f('quant_device_us')} | "
                     f"{share(o):.1f} % -> {share(r):.1f} % | {f('prepare_us')} | {f('call_us')} | "
                     f"{100 * o['prepare_us'] / o['kernel_us']:.1f} % -> "
                     f"{100 * r['prepare_us'] / r['kernel_us']:.1f} % |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated BxHxNxD[c] (c = causal)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_SHAPES)}")
    ap.add_argument("--out", help="markdown output file")
    ap.add_argument("--all-schedules", action="store_true",
                    help="also time the wgmma schedules that are not the default")
    ap.add_argument("--breakdown", help="comma-separated shapes: quantization vs kernel time")
    ap.add_argument("--no-mma", action="store_true",
                    help="leave out the mma.sync family (emulated on Hopper: correctness only)")
    ap.add_argument("--no-table", action="store_true", help="only the --breakdown")
    ap.add_argument("--json", help="write the --breakdown numbers here")
    ap.add_argument("--package-root", help="import sageattn2 from this directory")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                    help="input dtype of the table (fp16 also times the fp16-accumulated 16-bit PV)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="before/after of two --json files")
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    shapes = (args.shapes.split(",") if args.shapes else
              QUICK_SHAPES if args.quick else TARGET_SHAPES + EXTRA_SHAPES)

    dev = torch.cuda.get_device_name()
    commit = os.environ.get("SAGEATTN2_COMMIT", "")  # a device copy may carry no .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            commit = ""
    header = (f"{dev}, torch {torch.__version__}, {args.dtype} inputs, "
              f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit {commit or 'uncommitted'}")

    out = args.out or (os.path.join(os.environ["OUT"], "bench_attention.md") if "OUT" in os.environ
                       else None)
    # The breakdown runs first and the file is rewritten after every shape, so a run cut short
    # still leaves its numbers.
    records = []
    breakdown = quant_breakdown(args.breakdown.split(","), records) if args.breakdown else []
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(records, indent=1))
    rows, columns = [], []
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    if args.no_table:
        shapes = []

    def cell(c, base):
        if c is None:
            return "-"
        tops, tops_e2e, err, fail = c
        if fail:
            return f"error: {fail}"
        s = f"{tops:.0f}"
        if tops_e2e is not None:
            s += f" ({tops_e2e:.0f})"
        if base:
            s += f" {tops / base:.2f}x"
        if err is not None:
            s += f" [{err[0]:.5f} / {err[1]:.4f}]"
        return s

    def table():
        lines = [f"Attention TOPS, {header}", "",
                 "TOPS kernel-only (end to end), ratio to SDPA cuDNN, [cosine / rel. L1 vs fp32 SDPA]",
                 "", "| B×H×N×D | " + " | ".join(columns) + " |",
                 "|---|" + "---|" * len(columns)]
        for spec, cells in rows:
            base = cells.get("SDPA cuDNN", (None,))[0]
            lines.append(f"| {spec} | " + " | ".join(
                cell(cells.get(c), base if c.startswith(("wgmma", "mma", "thu-ml")) else None)
                for c in columns) + " |")
        text = "\n".join(lines + breakdown) + "\n"
        if out:
            Path(out).write_text(text)
        return text

    for spec in shapes:
        b, h, n, d, causal = parse_shape(spec)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=dtype) for _ in range(3))
        k = (k + 3 * torch.randn(1, h, 1, d, device="cuda", generator=g, dtype=dtype))
        ref = None
        if n <= ERROR_MAX_N:
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), is_causal=causal)
        work = 4 * b * h * n * n * d / (2 if causal else 1)
        cells = {}
        for name, fn, e2e in methods(q, k, v, causal, args.all_schedules, with_mma=not args.no_mma):
            try:
                err = errors(fn(), ref)
                t = bench_seconds(fn)
                t_e2e = bench_seconds(e2e) if e2e is not None else None
            except Exception as e:  # report, keep going
                cells[name] = (None, None, None, f"{type(e).__name__}: {e}"[:80])
                continue
            cells[name] = (work / t / 1e12, None if t_e2e is None else work / t_e2e / 1e12, err,
                           None)
            if name not in columns:
                columns.append(name)
        rows.append((spec, cells))
        table()
        del q, k, v, ref
        torch.cuda.empty_cache()
    print(table())


if __name__ == "__main__":
    main()
