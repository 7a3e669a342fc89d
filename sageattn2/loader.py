"""The kernels of one CUDA device: found in the cache or compiled by NVRTC on first use, loaded
through the driver API, launched on torch's current stream.

`kernels_for_device(device)` -> (DeviceKernels, None) or (None, why not: old GPU, no NVRTC,
no driver). `DeviceKernels.get(kernel)` -> a Loaded kernel (compiling it first if the cache
lacks it, with one log line per process), raising KernelBuildError when it cannot be built.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading

from . import abi, archs, build, driver, kernels, nvrtc

log = logging.getLogger("sageattn2")


class KernelBuildError(RuntimeError):
    """A kernel could not be compiled or loaded (the message says which and why)."""


class Loaded:
    """One kernel loaded on one device, and its launch constants (threads, smem, ...)."""

    __slots__ = ("name", "handle", "info", "threads", "smem", "device", "drv", "_fn", "_handle")

    def __init__(self, name, handle, info, device, drv):
        self.name, self.handle, self.info, self.device, self.drv = name, handle, info, device, drv
        self.threads, self.smem = info["threads"], info.get("smem", 0)
        self._fn, self._handle = drv.launch_kernel, ctypes.c_void_p(handle)

    def bind(self, grid, smem: int | None = None):
        """This kernel's launch with a fixed grid and shared memory: `bound(stream, kernel_params,
        None)` enqueues it and returns the CUresult (`check` raises on an error). `stream` is a
        c_void_p, `kernel_params` an `abi.param_pointer`."""
        smem = self.smem if smem is None else smem
        if not (all(0 < n < 2**31 for n in grid) and 0 <= smem < 2**31):
            raise ValueError(f"{self.name}: grid {grid} or shared memory {smem} out of range")
        return functools.partial(self._fn, self._handle, grid[0], grid[1], grid[2], self.threads, 1, 1, smem)

    def check(self, rc: int) -> None:
        if rc != 0:
            raise driver.DriverError(f"launching {self.name} failed: CUDA error {rc} ({self.drv.error_string(rc)})")

    def launch(self, grid, kernel_params: bytes, stream: int, smem: int | None = None) -> None:
        """One launch (`bind` for a launch repeated per call)."""
        self.check(self.bind(grid, smem)(ctypes.c_void_p(stream), kernel_params, None))

    def launch_struct(self, grid, params, stream: int, smem: int | None = None) -> None:
        """A launch with a ctypes.Structure as the parameter (the slow path, no template)."""
        self.launch(grid, abi.param_pointer(params), stream, smem)


class DeviceKernels:
    def __init__(self, index: int, arch: archs.Arch, builder: build.Builder, drv: driver.Driver):
        self.index, self.arch, self.builder, self.drv = index, arch, builder, drv
        self.tag = arch.target
        self.families = arch.families
        self._loaded: dict[str, Loaded] = {}
        self._failed: dict[str, str] = {}
        self._images: list[bytes] = []
        self._lock = threading.Lock()

    def get(self, kernel: kernels.Kernel, max_dynamic_smem: int | None = None) -> Loaded:
        k = self._loaded.get(kernel.name)
        if k is not None:
            return k
        with self._lock:
            k = self._loaded.get(kernel.name)
            if k is not None:
                return k
            if kernel.name in self._failed:
                raise KernelBuildError(self._failed[kernel.name])
            try:
                entry, compiled = self.builder.get(kernel, self.arch)
                if compiled:
                    _log_first_compile(self.arch, self.builder)
                handle = self.drv.get_kernel(self.drv.load_library(entry.cubin), entry.symbol)
                self._images.append(entry.cubin)  # alive for the process: the driver may load lazily from it
                smem = max_dynamic_smem if max_dynamic_smem is not None else entry.info.get("smem", 0)
                if smem > 48 * 1024:
                    self.drv.set_max_dynamic_smem(handle, self.index, smem)
            except (nvrtc.NvrtcError, driver.DriverError, OSError, ValueError, KeyError) as e:
                self._failed[kernel.name] = f"kernel {kernel.name} for {self.tag}: {e}"
                raise KernelBuildError(self._failed[kernel.name]) from None
            k = self._loaded[kernel.name] = Loaded(kernel.name, handle, entry.info, self.index, self.drv)
            return k

    def available(self, kernel: kernels.Kernel, max_dynamic_smem: int | None = None) -> str | None:
        """None when `kernel` is loaded (compiling it if needed), else why not."""
        try:
            self.get(kernel, max_dynamic_smem)
            return None
        except KernelBuildError as e:
            return str(e)


_first_compile_logged = False


def _log_first_compile(arch, builder) -> None:
    global _first_compile_logged
    if not _first_compile_logged:
        _first_compile_logged = True
        log.info("[sageattn2] compiling kernels for %s on first use (NVRTC %d.%d, cached in %s)", arch.target,
                 *builder.nv.version, builder.root)


def capability(device) -> tuple[int, int]:
    """Compute capability of a CUDA device (cached: asked on every attention call)."""
    import torch

    index = torch.device(device).index
    return _capability(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


def arch_of(device) -> archs.Arch | None:
    return archs.arch(*capability(device))


def kernels_for_device(device) -> tuple[DeviceKernels | None, str | None]:
    """(kernels, None) when this device can run our kernels, else (None, reason)."""
    import torch

    index = torch.device(device).index
    return _for_index(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _for_index(index: int) -> tuple[DeviceKernels | None, str | None]:
    major, minor = _capability(index)
    arch = archs.arch(major, minor)
    if arch is None:
        return None, archs.why_unsupported(major, minor)
    nv, why = nvrtc.load()
    if nv is None:
        return None, why
    if arch.number not in nv.archs:
        return None, (f"NVRTC {nv.version[0]}.{nv.version[1]} ({nv.found.library}) cannot compile for "
                      f"{arch.target}: a newer CUDA build of torch is needed")
    drv, why = driver.get()
    if drv is None:
        return None, why
    try:
        root = build.cache_dir()
    except OSError as e:
        return None, str(e)
    return DeviceKernels(index, arch, build.Builder(nv, root), drv), None
