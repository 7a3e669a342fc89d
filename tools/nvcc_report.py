#!/usr/bin/env python3
"""Developer tool: a kernel unit through nvcc for ptxas reports (registers, spills) and SASS.

    python tools/nvcc_report.py mma-d128-int8-fp8 sm_89 [--sass] [-- extra nvcc flags]

Reads the same headers and the same generated unit as the NVRTC build (sageattn2/kernels.py);
it builds nothing the product uses.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sageattn2 import archs, kernels  # noqa: E402


def all_kernels():
    return {k.name: k for cc in archs.PRODUCT_ARCHS for k in kernels.test_kernels(archs.arch(*cc))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel")
    ap.add_argument("target", help="sm_80, sm_89, sm_90a, sm_120 ...")
    ap.add_argument("--sass", action="store_true", help="also dump SASS (cuobjdump -sass)")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    k = all_kernels()[args.kernel]
    num = int("".join(c for c in args.target if c.isdigit()))
    arch = archs.arch(num // 10, num % 10)
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / f"{k.name}.cu"
        unit.write_text(k.source() + f"\nauto* sa2_instantiate = &{k.expr};\n")
        cubin = Path(tmp) / "k.cubin"
        cmd = ["nvcc", "-cubin", f"-arch={arch.target}", "-std=c++17", "-O3", "-Xptxas", "-v",
               f"-I{ROOT / 'csrc' / 'include'}", *arch.defines(), *args.extra, str(unit), "-o", str(cubin)]
        print(" ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc == 0 and args.sass:
            rc = subprocess.run(["cuobjdump", "-sass", str(cubin)]).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
