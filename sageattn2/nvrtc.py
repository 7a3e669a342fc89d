"""Finds NVRTC (the CUDA runtime compiler) and compiles one kernel unit to a cubin.

Where NVRTC comes from, in order (the first one found is used):
  1. SAGEATTN2_NVRTC: the path of the library itself;
  2. torch's CUDA wheels, beside torch: `nvidia/cu13/lib` (CUDA 13), `nvidia/cuda_nvrtc/lib`
     (CUDA 12), their Windows `bin` folders, and `torch/lib` (Windows wheels bundle the DLL);
  3. a CUDA toolkit: CUDA_HOME, CUDA_PATH, the folder of `nvcc` on PATH, /usr/local/cuda.
NVRTC opens its builtins library (`libnvrtc-builtins` / `nvrtc-builtins64_*.dll`) by name, so
it is loaded first from the same folder. No CUDA header is needed: the kernels define their own
types (csrc/include/sa2/common.cuh) and every header they include is passed in memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

IS_WINDOWS = sys.platform == "win32"


class NvrtcError(RuntimeError):
    """NVRTC is missing or a compile failed (the message says which, with the log)."""


# ---------------------------------------------------------------------------------------------
# Discovery


def _site_dirs() -> list[Path]:
    """site-packages folders that may hold torch's CUDA wheels (torch's own first)."""
    dirs = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("torch")
        if spec and spec.origin:
            dirs.append(Path(spec.origin).resolve().parent.parent)
    except (ImportError, ValueError):
        pass
    for p in sys.path:
        if p and p.endswith("site-packages") and Path(p) not in dirs:
            dirs.append(Path(p))
    return dirs


def candidate_dirs(env=os.environ, site_dirs: list[Path] | None = None, which=shutil.which) -> list[tuple[Path, str]]:
    """(folder, where it came from) to search for the NVRTC library, in preference order."""
    out: list[tuple[Path, str]] = []
    for site in _site_dirs() if site_dirs is None else site_dirs:
        for sub in ("nvidia/cu13/lib", "nvidia/cu13/bin", "nvidia/cu13/bin/x86_64", "nvidia/cuda_nvrtc/lib",
                    "nvidia/cuda_nvrtc/bin", "torch/lib"):
            out.append((site / sub, f"torch's CUDA wheels ({site})"))
    homes = [env.get("CUDA_HOME"), env.get("CUDA_PATH")]
    nvcc = which("nvcc", path=env.get("PATH"))
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    if not IS_WINDOWS:
        homes.append("/usr/local/cuda")
    for home in homes:
        if home:
            for sub in ("lib64", "lib", "bin", "bin/x64", "lib/x64"):
                out.append((Path(home) / sub, f"the CUDA toolkit at {home}"))
    return out


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.name))


def libraries_in(folder: Path, windows: bool = IS_WINDOWS) -> tuple[Path, Path | None] | None:
    """(NVRTC library, its builtins library or None) in `folder`, newest version first."""
    if not folder.is_dir():
        return None
    if windows:
        libs = [p for p in folder.glob("nvrtc64_*.dll") if "builtins" not in p.name and ".alt" not in p.name]
        builtins = sorted(folder.glob("nvrtc-builtins64_*.dll"), key=_version_key, reverse=True)
    else:
        libs = [p for p in folder.glob("libnvrtc*.so*")
                if "builtins" not in p.name and ".alt" not in p.name and p.name != "libnvrtc.so.dummy"]
        builtins = sorted((p for p in folder.glob("libnvrtc-builtins*.so*") if ".alt" not in p.name),
                          key=_version_key, reverse=True)
    if not libs:
        return None
    libs.sort(key=lambda p: (p.name.count("."), _version_key(p)), reverse=True)
    return libs[0], (builtins[0] if builtins else None)


@dataclass(frozen=True)
class Found:
    library: Path
    builtins: Path | None
    origin: str


def find(env=os.environ, site_dirs: list[Path] | None = None, windows: bool = IS_WINDOWS,
         which=shutil.which) -> tuple[Found | None, list[str]]:
    """(what was found or None, the places searched: for the message when nothing was)."""
    explicit = env.get("SAGEATTN2_NVRTC")
    if explicit:
        p = Path(explicit)
        found = libraries_in(p.parent, windows) if p.exists() else None
        if p.exists():
            return Found(p, found[1] if found else None, "SAGEATTN2_NVRTC"), []
        return None, [f"SAGEATTN2_NVRTC={explicit} (no such file)"]
    searched = []
    for folder, origin in candidate_dirs(env, site_dirs, which):
        hit = libraries_in(folder, windows)
        if hit:
            return Found(hit[0], hit[1], origin), searched
        searched.append(str(folder))
    return None, searched


# ---------------------------------------------------------------------------------------------
# The library


class Nvrtc:
    """A loaded NVRTC. Thread-safe: every compile has its own program object (NVRTC allows
    concurrent programs), and ctypes releases the GIL while NVRTC compiles."""

    def __init__(self, found: Found):
        self.found = found
        if found.builtins is not None:
            if IS_WINDOWS:
                os.add_dll_directory(str(found.builtins.parent))
                ctypes.WinDLL(str(found.builtins))
            else:
                ctypes.CDLL(str(found.builtins), mode=ctypes.RTLD_GLOBAL)
        self.lib = lib = ctypes.CDLL(str(found.library))
        vp, cp, i, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
        lib.nvrtcGetErrorString.restype = cp
        lib.nvrtcGetErrorString.argtypes = [i]
        for name, args in (
            ("nvrtcVersion", [ctypes.POINTER(i), ctypes.POINTER(i)]),
            ("nvrtcCreateProgram", [ctypes.POINTER(vp), cp, cp, i, ctypes.POINTER(cp), ctypes.POINTER(cp)]),
            ("nvrtcDestroyProgram", [ctypes.POINTER(vp)]),
            ("nvrtcAddNameExpression", [vp, cp]),
            ("nvrtcCompileProgram", [vp, i, ctypes.POINTER(cp)]),
            ("nvrtcGetProgramLogSize", [vp, ctypes.POINTER(sz)]),
            ("nvrtcGetProgramLog", [vp, ctypes.c_char_p]),
            ("nvrtcGetCUBINSize", [vp, ctypes.POINTER(sz)]),
            ("nvrtcGetCUBIN", [vp, ctypes.c_char_p]),
            ("nvrtcGetPTXSize", [vp, ctypes.POINTER(sz)]),
            ("nvrtcGetPTX", [vp, ctypes.c_char_p]),
            ("nvrtcGetLoweredName", [vp, cp, ctypes.POINTER(cp)]),
            ("nvrtcGetNumSupportedArchs", [ctypes.POINTER(i)]),
            ("nvrtcGetSupportedArchs", [ctypes.POINTER(i)]),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, i
        major, minor = i(), i()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)
        n = i()
        self._check(lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (i * n.value)()
        self._check(lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        self.archs = tuple(archs)

    def _check(self, rc: int, what: str, log: str = "") -> None:
        if rc != 0:
            msg = (self.lib.nvrtcGetErrorString(rc) or b"?").decode()
            raise NvrtcError(f"{what}: {msg}" + (f"\n{log}" if log else ""))

    @contextlib.contextmanager
    def _compiled(self, source: str, name: str, headers: dict[str, str], options: list[str],
                  name_expressions: list[str]):
        """(program, compiler log) of a successful compile; the program is destroyed on exit.
        Raises NvrtcError with the log."""
        lib, cp = self.lib, ctypes.c_char_p
        prog = ctypes.c_void_p()
        hdr_names = list(headers)
        hdr_src = (cp * len(hdr_names))(*(headers[h].encode() for h in hdr_names))
        hdr_inc = (cp * len(hdr_names))(*(h.encode() for h in hdr_names))
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), len(hdr_names),
                                           hdr_src, hdr_inc), "nvrtcCreateProgram")
        try:
            for expr in name_expressions:
                self._check(lib.nvrtcAddNameExpression(prog, expr.encode()), "nvrtcAddNameExpression")
            opts = (cp * len(options))(*(o.encode() for o in options))
            rc = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace").strip()
            self._check(rc, f"compiling {name}", log)
            yield prog, log
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def compile(self, source: str, name: str, headers: dict[str, str], options: list[str],
                name_expressions: list[str]) -> tuple[bytes, dict[str, str], str]:
        """(cubin, {name expression: lowered symbol}, compiler log). `options` must name a real
        `--gpu-architecture=sm_XX` (a cubin, not PTX). Raises NvrtcError with the log."""
        lib, cp = self.lib, ctypes.c_char_p
        with self._compiled(source, name, headers, options, name_expressions) as (prog, log):
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            lowered = {}
            for expr in name_expressions:
                out = cp()
                self._check(lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)), "nvrtcGetLoweredName")
                lowered[expr] = out.value.decode()
            return cubin.raw, lowered, log

    def ptx(self, source: str, name: str, headers: dict[str, str], options: list[str]) -> str:
        """PTX of a compile for a virtual `--gpu-architecture=compute_XX` (tests read what NVRTC
        made of a construct). Raises NvrtcError with the log."""
        with self._compiled(source, name, headers, options, []) as (prog, _):
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
            return buf.value.decode()


_loaded: Nvrtc | None = None
_why: str | None = None


def load() -> tuple[Nvrtc | None, str | None]:
    """(NVRTC, None), or (None, a message that says what was searched). Cached."""
    global _loaded, _why
    if _loaded is None and _why is None:
        found, searched = find()
        if found is None:
            _why = ("NVRTC (the CUDA runtime compiler, libnvrtc / nvrtc64_*.dll) was not found; it comes with "
                    "every CUDA build of torch. Searched: " + ", ".join(searched[:12])
                    + (" ..." if len(searched) > 12 else "") + ". Install a CUDA build of torch, or set "
                    "SAGEATTN2_NVRTC to the library's path.")
        else:
            try:
                _loaded = Nvrtc(found)
            except (OSError, AttributeError, NvrtcError) as e:
                _why = f"NVRTC at {found.library} ({found.origin}) could not be loaded: {e}"
    return _loaded, _why
