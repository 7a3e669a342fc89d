"""Device A/B helper: the same kernel units compiled by nvcc instead of NVRTC (issue 13).

    python3 tests/gpu/nvcc_swap.py SRC_CACHE DST_CACHE [--arch sm_90a] [--only REGEX] [-j 16]
    SAGEATTN2_CACHE_DIR=DST_CACHE python3 bench/bench_attention.py ...   # nvcc's code, our launch path

Copies every cache entry of SRC_CACHE/<arch> (an NVRTC build: install.py) to DST_CACHE under
the same file name, its cubin replaced by `nvcc -cubin` of the same generated unit with the
same defines (tools/nvcc_report.py's nvcc_cubin). The loader then serves nvcc's machine code
through the unchanged host path, so a timing difference between the two caches is the
compiler's alone, not a source or launch-path difference. Needs nvcc (a CUDA toolkit).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from nvcc_report import nvcc_cubin  # noqa: E402
from sageattn2 import archs, build, kernels  # noqa: E402


def nvcc_build(kernel: kernels.Kernel, arch: archs.Arch) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        done = nvcc_cubin(kernel, arch, out, capture=True)
        if done.returncode != 0:
            raise RuntimeError(f"{kernel.name}: nvcc failed\n{done.stderr.decode(errors='replace')}")
        return out.read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--only", default="", help="regex on kernel names (others are copied as NVRTC built them)")
    ap.add_argument("-j", type=int, default=8)
    args = ap.parse_args()
    num = int("".join(c for c in args.arch if c.isdigit()))
    arch = archs.arch(num // 10, num % 10)
    by_name = {k.name: k for k in kernels.test_kernels(arch)}
    entries = sorted((args.src / arch.target).glob("*.bin"))
    if not entries:
        print(f"no cache entries in {args.src / arch.target}")
        return 1

    def swap(path: Path) -> str:
        meta = json.loads(path.read_bytes().partition(b"\n")[0])
        kernel = by_name[meta["kernel"]]
        entry = build.read_entry(path, kernel)
        dst = args.dst / arch.target / path.name
        if args.only and not re.search(args.only, kernel.name):
            build.write_entry(dst, entry, meta["nvrtc"])
            return f"{kernel.name}: NVRTC (copied)"
        cubin = nvcc_build(kernel, arch)
        info = kernels.launch_info(kernel, cubin)
        if entry.symbol.encode() not in cubin:
            raise RuntimeError(f"{kernel.name}: nvcc's cubin has no {entry.symbol}")
        build.write_entry(dst, build.Entry(kernel, entry.symbol, info, cubin), meta["nvrtc"])
        same = "same launch info" if info == entry.info else f"launch info {entry.info} -> {info}"
        return f"{kernel.name}: nvcc ({same})"

    with ThreadPoolExecutor(max_workers=args.j) as pool:
        for line in pool.map(swap, entries):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
