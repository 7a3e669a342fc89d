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


def nvcc_cubin(kernel, arch, cubin: Path, extra=(), capture: bool = False) -> subprocess.CompletedProcess:
    """nvcc -cubin of `kernel`'s unit for `arch`: the NVRTC build's source, headers and defines."""
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / f"{kernel.name}.cu"
        unit.write_text(kernel.source() + f"\nauto* sa2_instantiate = &{kernel.expr};\n")
        cmd = ["nvcc", "-cubin", f"-arch={arch.target}", "-std=c++17", "-O3", f"-I{ROOT / 'csrc' / 'include'}",
               *arch.defines(), *extra, str(unit), "-o", str(cubin)]
        if not capture:
            print(" ".join(cmd), flush=True)
        return subprocess.run(cmd, capture_output=capture)


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
        cubin = Path(tmp) / "k.cubin"
        rc = nvcc_cubin(k, arch, cubin, ("-Xptxas", "-v", *args.extra)).returncode
        if rc == 0 and args.sass:
            rc = subprocess.run(["cuobjdump", "-sass", str(cubin)]).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
