"""Host (CPU) time to enqueue one attention call: the backends' `attention()` and the public
`sageattn`, per kernel family and PV type, against torch SDPA.

    python bench/bench_host.py [--shape 1x24x4608x128] [--calls 50] [--reps 9] [--stub] [--out F]
                               [--package-root DIR]

On a CUDA machine with built kernels: real calls, back to back without a sync inside the timed
loop (the launch queue holds them, so the CPU never waits for the GPU). On a CPU, or with
--stub: the same product code on CPU tensors over bench/host_stubs.py's stand-in device,
whose driver functions are C no-ops (so ctypes' own cost is counted, the driver's is not)
and whose allocations are CPU ones; use a small shape there (CPU allocations of large
buffers cost page mapping that the CUDA caching allocator does not). Each row is the fastest
of `reps` loops of `calls` calls (wall time on a GPU; the thread's CPU time when stubbed, so
other processes on a busy machine count less). --package-root times the `sageattn2` of another
tree (an export of an earlier commit, its kernels built; GPU only) with this script.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

_root = sys.argv[sys.argv.index("--package-root") + 1] if "--package-root" in sys.argv else None
sys.path.insert(0, str(Path(_root).resolve() if _root else Path(__file__).resolve().parents[1]))

from sageattn2 import sageattn  # noqa: E402
from sageattn2.backends import mma, wgmma  # noqa: E402
from sageattn2.config import AttnConfig, Family, PVAccum, PVDType  # noqa: E402


def per_call_us(fn, calls: int, reps: int, sync, clock=time.perf_counter) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = clock()
        for _ in range(calls):
            fn()
        times.append(clock() - t0)
        sync()
    return min(times) / calls * 1e6


def cases(q, k, v, families):
    """(label, fn) per row."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = [("torch SDPA", lambda: sdpa(q, k, v))] if q.is_cuda else []
    for family in families:
        for pv in (PVDType.FP8, PVDType.FP16):
            if family == "wgmma":
                cfg = AttnConfig(pv_dtype=pv, family=Family.WGMMA)
                fn = (lambda cfg=cfg: wgmma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=False,
                                                      sm_scale=None, return_lse=False))
            else:
                cfg = AttnConfig(pv_dtype=pv, family=Family.MMA, pv_accum=PVAccum.FP32)
                fn = (lambda cfg=cfg: mma.attention(q, k, v, layout="HND", cfg=cfg, is_causal=False,
                                                    sm_scale=None, return_lse=False))
            rows.append((f"{family} `attention()` int8+{pv.value}", fn))
    for level in ("int8+fp8", "int8+fp16", "auto"):
        rows.append((f"`sageattn` {level}", lambda level=level: sageattn(q, k, v, precision=level)))
    rows.append(("`sageattn` int8+fp8, NHD, lse",
                 lambda: sageattn(*(t.transpose(1, 2) for t in (q, k, v)), tensor_layout="NHD", return_lse=True,
                                  precision="int8+fp8")))
    return rows


def served_by(label: str, q, k) -> str:
    """For `auto`: which side its (cached) decision picked for this shape."""
    if not label.endswith(" auto"):
        return ""
    from sageattn2 import autotune

    decision = autotune._decisions.get(autotune.shape_key(q, k, "HND", False))
    return "" if decision is None else f" (served: {'quantized' if decision else 'exact'})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default=None, help="BxHxNxD (default 1x24x4608x128 on a GPU, 1x1x1024x128 stubbed)")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--stub", action="store_true", help="stand-in device even when CUDA is available")
    ap.add_argument("--capability", default=None, help="stubbed compute capability, e.g. 8.9 (default 9.0)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--package-root", default=None, help="import sageattn2 from this tree (read before argparse)")
    args = ap.parse_args(argv)
    stub = args.stub or not torch.cuda.is_available()
    shape = [int(x) for x in (args.shape or ("1x1x1024x128" if stub else "1x24x4608x128")).split("x")]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(3))

    with contextlib_stack(stub, args.capability) as (device_name, families):
        if not stub:
            q, k, v = (t.cuda() for t in (q, k, v))
        sync = torch.cuda.synchronize if not stub else (lambda: None)
        rows = []
        for label, fn in cases(q, k, v, families):
            try:
                us = per_call_us(fn, args.calls, args.reps, sync, time.thread_time if stub else time.perf_counter)
                rows.append((label + served_by(label, q, k), f"{us:.1f}"))
            except Exception as e:  # a family this machine lacks: say so in the table
                rows.append((label, f"n/a ({type(e).__name__}: {e})"[:120]))

    import sageattn2

    head = (f"Host µs per call, {device_name}, {Path(sageattn2.__file__).parent.parent.name}, "
            f"torch {torch.__version__}, shape {'x'.join(map(str, shape))} bf16 HND"
            f"{' (stand-in device: C no-op driver, CPU tensors)' if stub else ''}; fastest of {args.reps} x "
            f"{args.calls} back-to-back calls")
    lines = [head, "", "| call | host µs/call |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    text = "\n".join(lines)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_host.md") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(text + "\n")


class contextlib_stack:
    """The device to time on: the stand-in (CPU) or the real GPU."""

    def __init__(self, stub: bool, capability: str | None):
        self.stub, self.capability = stub, capability

    def __enter__(self):
        if not self.stub:
            from sageattn2 import loader

            dk, why = loader.kernels_for_device(torch.device("cuda", torch.cuda.current_device()))
            if dk is None:
                raise SystemExit(f"no kernels on this GPU: {why}")
            return torch.cuda.get_device_name(), dk.families
        import pytest

        from host_stubs import keep_freed_memory, stub_device

        keep_freed_memory()

        self.mp = pytest.MonkeyPatch()
        cap = tuple(int(x) for x in (self.capability or "9.0").split("."))
        self.ctx = stub_device(self.mp, cap)
        dk = self.ctx.__enter__()
        import platform

        return f"stand-in {dk.tag} on {platform.processor() or platform.machine()}", dk.families

    def __exit__(self, *exc):
        if self.stub:
            self.ctx.__exit__(*exc)
            self.mp.undo()
        return False


if __name__ == "__main__":
    main()
