#!/usr/bin/env python3
"""Build the SageAttention2 kernels for this machine's GPU, then check them.

ComfyUI-Manager runs this after `git clone`; it must never fail an install for a machine
that simply cannot build (no nvcc, no GPU): it says what it skipped and exits 0. The pack
then runs exact attention until kernels are built.

    python install.py                      # build for the visible GPUs, then self-check
    TORCH_CUDA_ARCH_LIST="8.9;9.0" python install.py   # these archs, GPU or not
    python install.py --no-selfcheck --jobs 8

Conventions for csrc/ are in docs/building.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_DIR = Path(os.environ.get("SAGEATTN2_BUILD_DIR", ROOT / "sageattn2" / "_build"))
LIB_NAME = "sageattn2.dll" if sys.platform == "win32" else "libsageattn2.so"
PREFIX = "[sageattn2 install]"

# Lowest CUDA toolkit that has what each arch needs (FP8 mma on sm89, wgmma on sm90a,
# sm_120 support).
MIN_CUDA = {80: (12, 0), 86: (12, 0), 87: (12, 0), 89: (12, 4), 90: (12, 3), 100: (12, 8), 120: (12, 8), 121: (12, 9)}
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]


def nvcc_flags(env=os.environ, platform: str = sys.platform) -> list[str]:
    """NVCC_FLAGS, position-independent code where the host compiler wants the flag (not MSVC),
    and SAGEATTN2_NVCC_FLAGS (kernel experiments, e.g. "-DSA2_MY_SWITCH=1")."""
    pic = [] if platform == "win32" else ["-Xcompiler", "-fPIC"]
    return NVCC_FLAGS + pic + shlex.split(env.get("SAGEATTN2_NVCC_FLAGS", ""), posix=platform != "win32")


class BuildError(Exception):
    """A problem the user must fix; the message says how."""


# ---------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Arch:
    major: int
    minor: int

    @property
    def number(self) -> int:
        return self.major * 10 + self.minor

    @property
    def tag(self) -> str:
        return "sm_90a" if self.number == 90 else f"sm_{self.number}"

    @property
    def gencode(self) -> str:
        code = "90a" if self.number == 90 else str(self.number)
        return f"-gencode=arch=compute_{code},code=sm_{code}"

    @property
    def families(self) -> list[str]:
        # Preference order: dispatch tries them in this order.
        return ["wgmma", "mma"] if self.number == 90 else ["mma"]

    @property
    def fp8_mma(self) -> bool:
        return self.number >= 89

    def defines(self) -> list[str]:
        return [
            f"-DSA2_ARCH={self.number}",
            f"-DSA2_HAS_FP8_MMA={int(self.fp8_mma)}",
            f"-DSA2_FAMILY_WGMMA={int('wgmma' in self.families)}",
        ]


def parse_arch_list(text: str) -> list[Arch]:
    """'8.0;8.6 8.9+PTX,9.0a' -> Arch list (PTX suffixes and 'a' are accepted and ignored)."""
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            raise BuildError(f"cannot read {item!r} in TORCH_CUDA_ARCH_LIST (expected e.g. '8.9;9.0')")
        arch = Arch(int(m.group(1)), int(m.group(2)))
        if arch not in archs:
            archs.append(arch)
    return archs


def detect_archs(env=os.environ) -> tuple[list[Arch], str]:
    """(archs, where they came from). TORCH_CUDA_ARCH_LIST wins over the visible GPUs."""
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return parse_arch_list(env["TORCH_CUDA_ARCH_LIST"]), "TORCH_CUDA_ARCH_LIST"
    try:
        import torch
    except ImportError:
        return [], "no torch installed"
    if not torch.cuda.is_available():
        return [], "no CUDA GPU visible to torch"
    archs = []
    for i in range(torch.cuda.device_count()):
        arch = Arch(*torch.cuda.get_device_capability(i))
        if arch not in archs:
            archs.append(arch)
    return archs, "visible GPUs"


def check_arch(arch: Arch, cuda_version: tuple[int, int]) -> str | None:
    """Why `arch` cannot be built with this toolkit, or None."""
    if arch.number < 80:
        return f"{arch.tag}: compute capability {arch.major}.{arch.minor} is older than 8.0 (Ampere); exact attention only"
    need = MIN_CUDA.get(arch.number, MIN_CUDA[120] if arch.number >= 120 else (12, 0))
    if cuda_version < need:
        return (f"{arch.tag} needs CUDA {need[0]}.{need[1]} or newer, nvcc is "
                f"{cuda_version[0]}.{cuda_version[1]}; install a newer CUDA toolkit")
    return None


# ---------------------------------------------------------------------------------------
# Toolchain


def find_nvcc(env=os.environ) -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            p = Path(env[var]) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
            if p.exists():
                return p
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.exists() else None


def nvcc_version(nvcc: Path) -> tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise BuildError(f"could not read the CUDA version from `{nvcc} --version`")
    return int(m.group(1)), int(m.group(2))


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI wheel ships the binary

        path = Path(ninja.BIN_DIR) / "ninja"
        return str(path) if path.exists() else None
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------
# Sources and the ninja file


@dataclass
class Source:
    path: Path
    families: list[str]
    shards: int = 1

    def compiles_for(self, arch: Arch) -> bool:
        return "all" in self.families or any(f in arch.families for f in self.families)


def scan_sources(csrc: Path | None = None) -> list[Source]:
    csrc = csrc or CSRC
    sources = []
    for path in sorted(csrc.glob("*.cu")):
        head = path.read_text(errors="replace")[:2000]
        fam = re.search(r"//\s*SA2_FAMILIES:\s*([\w ,]+)", head)
        if not fam:
            raise BuildError(f"{path.relative_to(csrc.parent)} has no '// SA2_FAMILIES:' header (docs/building.md)")
        shards = re.search(r"//\s*SA2_SHARDS:\s*(\d+)", head)
        sources.append(Source(path, re.split(r"[\s,]+", fam.group(1).strip()), int(shards.group(1)) if shards else 1))
    return sources


def cache_key(sources: list[Source], arch: Arch, nvcc: Path, cuda_version, csrc: Path | None = None) -> str:
    """Changes when any source or header, the flags, or the toolkit changes."""
    csrc = csrc or CSRC
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(csrc)).encode())
        h.update(path.read_bytes())
    h.update(" ".join(nvcc_flags() + arch.defines() + [arch.gencode, str(nvcc), str(cuda_version)]).encode())
    return h.hexdigest()[:20]


def ninja_path(path) -> str:
    """A path in a ninja build line: `$`, spaces and colons (C:\\...) escaped."""
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja(out_dir: Path, sources: list[Source], arch: Arch, nvcc: Path, link: bool) -> Path:
    include = sources[0].path.parent / "include" if sources else CSRC / "include"
    # Quoted: the default CUDA and ComfyUI-portable paths on Windows contain spaces.
    flags = " ".join(nvcc_flags() + arch.defines() + [arch.gencode, f'-I"{include}"'])
    lines = [
        "ninja_required_version = 1.3",
        f'nvcc = "{nvcc}"',
        f"flags = {flags}",
        "rule cu",
        "  command = $nvcc $flags $extra -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in $extra",
        "rule link",
        "  command = $nvcc -shared -cudart static $gencode $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for src in sources:
        if not src.compiles_for(arch):
            continue
        for i in range(src.shards):
            obj = f"obj/{src.path.stem}" + (f".{i}" if src.shards > 1 else "") + ".o"
            objects.append(obj)
            lines.append(f"build {obj}: cu {ninja_path(src.path)}")
            if src.shards > 1:
                lines.append(f"  extra = -DSA2_SHARD={i} -DSA2_NUM_SHARDS={src.shards}")
    if link:
        lines.append(f"build {LIB_NAME}: link {' '.join(objects)}")
        lines.append(f"  gencode = {arch.gencode}")
        lines.append(f"default {LIB_NAME}")
    else:
        lines.append(f"default {' '.join(objects)}")
    path = out_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_arch(arch: Arch, sources, nvcc, cuda_version, ninja: str, jobs: int | None, link: bool = True) -> Path:
    out_dir = BUILD_DIR / arch.tag
    out_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(sources, arch, nvcc, cuda_version) + ("" if link else "-objects")
    key_file = out_dir / "build.key"
    lib = out_dir / LIB_NAME
    if key_file.exists() and key_file.read_text() == key and (lib.exists() or not link):
        print(f"{PREFIX} {arch.tag}: up to date (sources and flags unchanged)")
        return lib
    write_ninja(out_dir, sources, arch, nvcc, link)
    cmd = [ninja, "-C", str(out_dir)] + (["-j", str(jobs)] if jobs else [])
    print(f"{PREFIX} {arch.tag}: building ({' '.join(cmd)})", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise BuildError(f"compiling for {arch.tag} failed (see the nvcc messages above)")
    key_file.write_text(key)
    return lib


def write_manifest(built: list[Arch], sources: list[Source]) -> None:
    path = BUILD_DIR / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = {"archs": {}}
    for arch in built:
        manifest["archs"][arch.tag] = {
            "path": f"{arch.tag}/{LIB_NAME}",
            # Only families whose sources exist, in dispatch preference order.
            "families": [f for f in arch.families if any(f in s.families for s in sources)],
            "fp8_mma": arch.fp8_mma,
        }
    path.write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: ninja's)")
    ap.add_argument("--no-selfcheck", action="store_true", help="build only")
    ap.add_argument("--compile-only", action="store_true", help="compile objects, do not link (CI)")
    args = ap.parse_args(argv)

    try:
        archs, origin = detect_archs()
        if not archs:
            print(f"{PREFIX} nothing to build: {origin}. Set TORCH_CUDA_ARCH_LIST (e.g. '8.9') to build "
                  "without a GPU. The nodes work with exact attention meanwhile.")
            return 0
        nvcc = find_nvcc()
        if nvcc is None:
            print(f"{PREFIX} skipped: nvcc (the CUDA toolkit compiler) was not found. Install the CUDA "
                  "toolkit (12.4 or newer) or set CUDA_HOME, then run `python install.py` again. "
                  "The nodes work with exact attention meanwhile.")
            return 0
        if shutil.which("g++") is None and shutil.which("cl") is None and shutil.which("c++") is None:
            raise BuildError("no C++ host compiler found (install g++ / build-essential, or MSVC on Windows)")
        ninja = find_ninja()
        if ninja is None:
            raise BuildError("ninja was not found: `pip install ninja`")
        cuda_version = nvcc_version(nvcc)
        print(f"{PREFIX} nvcc {cuda_version[0]}.{cuda_version[1]} at {nvcc}; archs from {origin}: "
              f"{', '.join(a.tag for a in archs)}")
        sources = scan_sources()
        built = []
        for arch in archs:
            why = check_arch(arch, cuda_version)
            if why:
                print(f"{PREFIX} skipped {why}")
                continue
            build_arch(arch, sources, nvcc, cuda_version, ninja, args.jobs, link=not args.compile_only)
            built.append(arch)
        if not args.compile_only:
            write_manifest(built, sources)
    except BuildError as e:
        print(f"{PREFIX} error: {e}", file=sys.stderr)
        print(f"{PREFIX} the nodes still work, with exact attention.", file=sys.stderr)
        return 1

    if built and not (args.no_selfcheck or args.compile_only):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            print(f"{PREFIX} self-check skipped: no GPU visible")
        else:
            sys.path.insert(0, str(ROOT))
            from sageattn2 import selfcheck

            return selfcheck.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
