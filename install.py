#!/usr/bin/env python3
"""Compile the SageAttention2 kernels for this machine's GPUs with NVRTC, then check them.

ComfyUI-Manager runs this after `git clone`. Nothing but a CUDA build of torch and the NVIDIA
driver is needed (no CUDA toolkit, no C++ compiler, no ninja). It never fails an install for a
machine that cannot build: it says what it skipped and exits 0, and the nodes run stock
attention (ComfyUI's own) until kernels exist. Kernels missing later (a new GPU, a changed
source) are compiled on first use.

    python install.py                                  # visible GPUs, then the self-check
    TORCH_CUDA_ARCH_LIST="8.9;9.0" python install.py   # these archs, GPU or not
    python install.py --compile-only --jobs 2          # CI: every product kernel, exit 1 on a failure
    python install.py --all --no-selfcheck             # also what only the GPU tests and benchmarks use

The build, cache and ABI are described in docs/building.md.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
PREFIX = "[sageattn2 install]"
STOCK = "The nodes work meanwhile, with stock attention."


class BuildError(Exception):
    """A problem the user must fix; the message says how."""


def parse_arch_list(text: str) -> list[tuple[int, int]]:
    """'8.0;8.6 8.9+PTX,9.0a' -> [(8, 0), (8, 6), (8, 9), (9, 0)] (PTX suffixes and 'a' ignored)."""
    out = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            raise BuildError(f"cannot read {item!r} in TORCH_CUDA_ARCH_LIST (expected e.g. '8.9;9.0')")
        cc = (int(m.group(1)), int(m.group(2)))
        if cc not in out:
            out.append(cc)
    return out


def detect_archs(env=os.environ) -> tuple[list[tuple[int, int]], str]:
    """(compute capabilities, where they came from). TORCH_CUDA_ARCH_LIST wins over the GPUs."""
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return parse_arch_list(env["TORCH_CUDA_ARCH_LIST"]), "TORCH_CUDA_ARCH_LIST"
    try:
        import torch
    except ImportError:
        return [], "no torch installed"
    if not torch.cuda.is_available():
        return [], "no CUDA GPU visible to torch"
    out = []
    for i in range(torch.cuda.device_count()):
        cc = tuple(torch.cuda.get_device_capability(i))
        if cc not in out:
            out.append(cc)
    return out, "visible GPUs"


def buildable(ccs, nvrtc_archs) -> tuple[list, list[str]]:
    """(the archs to build, a message per skipped one)."""
    from sageattn2 import archs

    out, skipped = [], []
    for major, minor in ccs:
        a = archs.arch(major, minor)
        if a is None:
            skipped.append(f"sm_{major}{minor}: {archs.why_unsupported(major, minor)}")
        elif a.number not in nvrtc_archs:
            skipped.append(f"{a.target}: this NVRTC cannot compile for it (a newer CUDA build of torch can)")
        else:
            out.append(a)
    return out, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", "-j", type=int, default=None, help="parallel compiles (default: CPU count)")
    ap.add_argument("--no-selfcheck", action="store_true", help="build only")
    ap.add_argument("--all", action="store_true",
                    help="also the kernels only tests and benchmarks use (every wgmma schedule, emulated INT4)")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every product kernel, no self-check; exit 1 if any fails (CI)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        ccs, origin = detect_archs()
    except BuildError as e:
        print(f"{PREFIX} {e}. {STOCK}")
        return 1 if args.compile_only else 0
    if not ccs:
        print(f"{PREFIX} nothing to build: {origin}. Set TORCH_CUDA_ARCH_LIST (e.g. '8.9') to build "
              f"without a GPU. {STOCK}")
        return 0

    from sageattn2 import build, kernels, nvrtc

    nv, why = nvrtc.load()
    if nv is None:
        print(f"{PREFIX} skipped: {why} {STOCK}")
        return 1 if args.compile_only else 0
    targets, skipped = buildable(ccs, nv.archs)
    for line in skipped:
        print(f"{PREFIX} skipped {line}")
    if not targets:
        print(f"{PREFIX} no architecture to build for ({origin}). {STOCK}")
        return 0
    try:
        root = build.cache_dir()
    except OSError as e:
        print(f"{PREFIX} skipped: {e}. {STOCK}")
        return 1 if args.compile_only else 0

    listed = kernels.test_kernels if args.all else kernels.product_kernels
    jobs = [(k, a) for a in targets for k in listed(a)]
    workers = args.jobs or os.cpu_count() or 1
    print(f"{PREFIX} NVRTC {nv.version[0]}.{nv.version[1]} from {nv.found.origin}; {len(jobs)} kernels for "
          f"{', '.join(a.target for a in targets)} ({origin}) on {workers} threads; cache {root}", flush=True)
    builder = build.Builder(nv, root)

    def progress(done, total, kernel, arch, err, log):
        status = "FAILED" if err else "ok"
        print(f"{PREFIX} [{done}/{total}] {arch.target} {kernel.name} {status} ({time.time() - t0:.0f} s)",
              flush=True)
        if log:  # warnings, or the ptxas report SAGEATTN2_NVRTC_FLAGS="-Xptxas -v" asks for
            print(log, flush=True)

    root.mkdir(parents=True, exist_ok=True)
    with build.FileLock(root / ".install.lock"):  # a concurrent install waits, then finds the cache filled
        results = builder.build_all(jobs, workers, progress)
    failed = [(k, a, err) for k, a, err in results if err]
    for k, a, err in failed:
        print(f"{PREFIX} {a.target} {k.name} did not compile:\n{err[:4000]}", file=sys.stderr)
    bad_archs = sorted({a.target for _, a, _ in failed})
    good = [a.target for a in targets if a.target not in bad_archs]
    print(f"{PREFIX} built in {time.time() - t0:.0f} s: complete for {', '.join(good) or 'no arch'}"
          + (f"; incomplete for {', '.join(bad_archs)} (those calls run stock attention)" if bad_archs else ""))
    if args.compile_only:
        return 1 if failed else 0
    if args.no_selfcheck:
        return 0
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print(f"{PREFIX} self-check skipped: no GPU visible")
        return 0
    from sageattn2 import selfcheck

    return selfcheck.main([])


if __name__ == "__main__":
    sys.exit(main())
