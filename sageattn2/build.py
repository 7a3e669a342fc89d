"""Compiles kernels with NVRTC into an on-disk cache, safely shared between processes.

Cache folder: SAGEATTN2_CACHE_DIR, else `sageattn2/_build/kernels` in the pack when it is
writable, else a per-user cache folder (XDG_CACHE_HOME or ~/.cache on Linux, LOCALAPPDATA on
Windows). One file per kernel: `<target>/<kernel name>-<key>.bin`, a JSON line (the lowered
symbol, the launch constants) followed by the cubin; the key hashes the unit, every header, the
options, the arch and the NVRTC version (kernels.cache_key). A file is written to a temporary
name and renamed into place, under a per-entry lock file, so two processes building at once
neither corrupt an entry nor compile it twice.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import kernels
from .archs import Arch
from .nvrtc import Nvrtc, NvrtcError

PACK_CACHE = Path(__file__).resolve().parent / "_build" / "kernels"


def user_cache_dir(env=os.environ, platform: str = sys.platform) -> Path:
    if platform == "win32":
        base = env.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "sageattn2" / "cache"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sageattn2"


def writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def cache_dir(env=os.environ, pack_cache: Path = PACK_CACHE) -> Path:
    """Where compiled kernels live (see the module doc). Raises OSError when nothing is writable."""
    if env.get("SAGEATTN2_CACHE_DIR"):
        return Path(env["SAGEATTN2_CACHE_DIR"])
    if writable(pack_cache):
        return pack_cache
    user = user_cache_dir(env)
    if writable(user):
        return user
    raise OSError(f"neither {pack_cache} nor {user} is writable: set SAGEATTN2_CACHE_DIR")


def extra_options(env=os.environ) -> tuple[str, ...]:
    """SAGEATTN2_NVRTC_FLAGS: extra NVRTC options (kernel experiments, e.g. -DSA2_SWITCH=1, or
    -lineinfo for profiling); part of the cache key."""
    return tuple(shlex.split(env.get("SAGEATTN2_NVRTC_FLAGS", ""), posix=sys.platform != "win32"))


# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    kernel: kernels.Kernel
    symbol: str
    info: dict[str, int]
    cubin: bytes
    log: str = ""  # the compiler's messages when compiled now (ptxas -v output, warnings)


class FileLock:
    """An exclusive lock on a file (fcntl on POSIX, msvcrt on Windows), blocking."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if sys.platform == "win32":
            import msvcrt

            while True:
                try:
                    msvcrt.locking(self.fd, msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(0.2)
        else:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if sys.platform == "win32":
            import msvcrt

            os.lseek(self.fd, 0, 0)
            msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
        os.close(self.fd)


def entry_path(root: Path, arch: Arch, kernel: kernels.Kernel, key: str) -> Path:
    return root / arch.target / f"{kernel.name}-{key}.bin"


def read_entry(path: Path, kernel: kernels.Kernel) -> Entry | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, sep, cubin = data.partition(b"\n")
    try:
        meta = json.loads(head)
    except ValueError:
        return None
    if not sep or meta.get("kernel") != kernel.name or len(cubin) != meta.get("cubin_bytes"):
        return None
    return Entry(kernel, meta["symbol"], meta["info"], cubin)


def write_entry(path: Path, entry: Entry, nvrtc_version) -> None:
    meta = {"kernel": entry.kernel.name, "symbol": entry.symbol, "info": entry.info,
            "nvrtc": list(nvrtc_version), "cubin_bytes": len(entry.cubin)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(meta).encode() + b"\n" + entry.cubin)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Builder:
    """Compiles (or finds in the cache) kernels for archs with one NVRTC."""

    def __init__(self, nv: Nvrtc, root: Path, extra: tuple[str, ...] | None = None):
        self.nv, self.root = nv, root
        self.extra = extra_options() if extra is None else extra
        self.headers = kernels.headers()

    def path(self, kernel: kernels.Kernel, arch: Arch) -> Path:
        key = kernels.cache_key(kernel, arch, self.nv.version, self.extra, self.headers)
        return entry_path(self.root, arch, kernel, key)

    def cached(self, kernel: kernels.Kernel, arch: Arch) -> Entry | None:
        return read_entry(self.path(kernel, arch), kernel)

    def get(self, kernel: kernels.Kernel, arch: Arch) -> tuple[Entry, bool]:
        """(entry, whether it was compiled now). Raises NvrtcError when it does not compile."""
        path = self.path(kernel, arch)
        entry = read_entry(path, kernel)
        if entry is not None:
            return entry, False
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(path.name + ".lock")):
            entry = read_entry(path, kernel)  # another process may have built it meanwhile
            if entry is not None:
                return entry, False
            cubin, lowered, log = self.nv.compile(kernel.source(), f"{kernel.name}.cu", self.headers,
                                                  kernels.options(arch, self.extra), [kernel.expr])
            entry = Entry(kernel, lowered[kernel.expr], kernels.launch_info(kernel, cubin), cubin, log)
            write_entry(path, entry, self.nv.version)
            return entry, True

    def build_all(self, jobs: list[tuple[kernels.Kernel, Arch]], workers: int, progress=None) -> list[tuple]:
        """Compiles `jobs` on `workers` threads (NVRTC runs without the GIL). Returns
        [(kernel, arch, error message or None)] in job order; `progress(done, total, kernel, arch,
        error, compiler log)` is called as each finishes."""
        results: list = [None] * len(jobs)
        done = 0

        def one(i):
            kernel, arch = jobs[i]
            try:
                return i, None, self.get(kernel, arch)[0].log
            except (NvrtcError, OSError, ValueError, KeyError) as e:
                return i, str(e), ""

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for future in as_completed([pool.submit(one, i) for i in range(len(jobs))]):
                i, err, log = future.result()
                results[i] = (jobs[i][0], jobs[i][1], err)
                done += 1
                if progress:
                    progress(done, len(jobs), jobs[i][0], jobs[i][1], err, log)
        return results


def extract(cache: Path, out: Path) -> int:
    """Writes every cached kernel as a plain `<target>/<name>.cubin` under `out` (for
    cuobjdump / nvdisasm); returns how many."""
    n = 0
    for path in sorted(cache.glob("*/*.bin")):
        head, _, cubin = path.read_bytes().partition(b"\n")
        name = json.loads(head)["kernel"]
        (out / path.parent.name).mkdir(parents=True, exist_ok=True)
        (out / path.parent.name / f"{name}.cubin").write_bytes(cubin)
        n += 1
    return n


if __name__ == "__main__":
    # python -m sageattn2.build extract OUT_DIR [CACHE_DIR]: cubins for SASS dumps.
    if len(sys.argv) >= 3 and sys.argv[1] == "extract":
        print(extract(Path(sys.argv[3]) if len(sys.argv) > 3 else cache_dir(), Path(sys.argv[2])), "cubins")
    else:
        print("usage: python -m sageattn2.build extract OUT_DIR [CACHE_DIR]")
