"""Finds and loads the kernel library that install.py built for this GPU.

The library is a plain C-ABI shared object (no torch symbols), loaded with ctypes, so a
torch upgrade never breaks it. One library per GPU architecture lives under
`sageattn2/_build/<arch tag>/`, listed in `sageattn2/_build/manifest.json`.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
from pathlib import Path

BUILD_DIR = Path(os.environ.get("SAGEATTN2_BUILD_DIR", Path(__file__).resolve().parent / "_build"))
MANIFEST = "manifest.json"
ABI_VERSION = 2
LIB_NAME = "sageattn2.dll" if sys.platform == "win32" else "libsageattn2.so"


def arch_tag(major: int, minor: int) -> str:
    """Compute capability -> build tag. Hopper gets the `a` target (wgmma, setmaxnreg)."""
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def read_manifest(build_dir: Path = BUILD_DIR) -> dict:
    try:
        return json.loads((build_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {"archs": {}}


class Library:
    """A loaded kernel library and what it contains."""

    def __init__(self, tag: str, path: Path, info: dict):
        self.tag = tag
        self.path = path
        self.families = tuple(info.get("families", ()))
        self.fp8_mma = bool(info.get("fp8_mma", False))
        self.cdll = ctypes.CDLL(str(path))
        self.cdll.sa2_last_error.restype = ctypes.c_char_p
        self.cdll.sa2_abi_version.restype = ctypes.c_int

    def has(self, symbol: str) -> bool:
        return hasattr(self.cdll, symbol)

    def last_error(self) -> str:
        return (self.cdll.sa2_last_error() or b"").decode(errors="replace")


@functools.lru_cache(maxsize=None)
def _load(tag: str) -> tuple[Library | None, str | None]:
    info = read_manifest().get("archs", {}).get(tag)
    if info is None:
        return None, f"kernels not built for {tag} (run install.py)"
    path = BUILD_DIR / info["path"]
    if not path.exists():
        return None, f"kernel library missing at {path} (run install.py)"
    try:
        lib = Library(tag, path, info)
    except OSError as e:
        return None, f"could not load {path}: {e}"
    abi = lib.cdll.sa2_abi_version()
    if abi != ABI_VERSION:
        return None, f"{path} has ABI {abi}, this code expects {ABI_VERSION} (rerun install.py)"
    return lib, None


def capability(device) -> tuple[int, int]:
    """Compute capability of a CUDA device (cached: asked on every attention call)."""
    import torch

    index = torch.device(device).index
    return _capability(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


def library_for_device(device) -> tuple[Library | None, str | None]:
    """(library, None) if kernels for this CUDA device's arch are built, else (None, reason)."""
    major, minor = capability(device)
    if major < 8:
        return None, f"GPU compute capability {major}.{minor} is older than 8.0 (Ampere)"
    return _load(arch_tag(major, minor))
