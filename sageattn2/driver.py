"""The CUDA driver API through ctypes (libcuda.so.1 / nvcuda.dll, installed with the NVIDIA
driver): load a cubin, set a kernel's shared-memory limit, launch on torch's current stream,
and encode Hopper TMA descriptors.

Why ctypes and not NVIDIA's `cuda-python` bindings: nothing to install (the driver library is
always there), and a launch is one foreign call whose cost we measured and control (see
docs/building.md). Kernels are loaded with cuLibraryLoadData (CUDA 12+): a library is
context-independent, and cuLaunchKernel takes its CUkernel handles (cast to CUfunction),
launching in the context of the given stream (torch's primary context of the device), or the
current context for the NULL stream.
"""
from __future__ import annotations

import ctypes
import sys
import threading

_vp, _i = ctypes.c_void_p, ctypes.c_int

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
# CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion (cuda.h)
TMA_UINT8, TMA_FLOAT16, TMA_BFLOAT16 = 0, 6, 9
TMA_SWIZZLE_64B, TMA_SWIZZLE_128B = 2, 3
TMA_L2_256B = 3


class DriverError(RuntimeError):
    """A driver call failed; the message names the call and the CUDA error."""


class Driver:
    def __init__(self, lib=None):
        """`lib`: the driver library (default: the system's); tests and bench/host_stubs.py pass
        a stand-in."""
        if lib is None:
            lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        self.lib = lib
        sigs = {
            "cuInit": [ctypes.c_uint],
            "cuGetErrorString": [_i, ctypes.POINTER(ctypes.c_char_p)],
            "cuDriverGetVersion": [ctypes.POINTER(_i)],
            "cuDeviceGet": [ctypes.POINTER(_i), _i],
            "cuCtxGetCurrent": [ctypes.POINTER(_vp)],
            "cuCtxSetCurrent": [_vp],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_vp), _i],
            "cuLibraryLoadData": [ctypes.POINTER(_vp), ctypes.c_char_p, _vp, _vp, ctypes.c_uint, _vp, _vp,
                                  ctypes.c_uint],
            "cuLibraryGetKernel": [ctypes.POINTER(_vp), _vp, ctypes.c_char_p],
            "cuKernelSetAttribute": [_i, _i, _vp, _i],
        }
        for fn_name, args in sigs.items():
            fn = getattr(lib, fn_name)
            fn.argtypes, fn.restype = args, _i
        # The two per-call functions have no declared argument types: converting eleven declared
        # arguments costs ctypes ~2 us a call, more than the driver's own launch. Callers pass
        # c_void_p objects (or bytes, for a pointer to their data) as pointers and Python ints
        # below 2**31 as the 32-bit arguments; ctypes passes those unconverted.
        #   cuLaunchKernel(f, gridX, gridY, gridZ, blockX, blockY, blockZ, sharedMem, stream,
        #                  kernelParams, extra)
        #   cuTensorMapEncodeTiled(tensorMap, dataType, rank, globalAddress, globalDim,
        #                          globalStrides, boxDim, elementStrides, interleave, swizzle,
        #                          l2Promotion, oobFill)
        self.launch_kernel = lib.cuLaunchKernel
        self.launch_kernel.restype = _i
        self.encode_tiled = getattr(lib, "cuTensorMapEncodeTiled", None)
        if self.encode_tiled is not None:
            self.encode_tiled.restype = _i
        self.check(lib.cuInit(0), "cuInit")
        v = _i()
        self.check(lib.cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
        self.version = (v.value // 1000, v.value % 1000 // 10)
        self._tls = threading.local()

    def error_string(self, rc: int) -> str:
        s = ctypes.c_char_p()
        self.lib.cuGetErrorString(rc, ctypes.byref(s))
        return (s.value or b"unknown error").decode()

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise DriverError(f"{what} failed: CUDA error {rc} ({self.error_string(rc)})")

    def load_library(self, cubin: bytes) -> int:
        lib = _vp()
        self.check(self.lib.cuLibraryLoadData(ctypes.byref(lib), cubin, None, None, 0, None, None, 0),
                   "cuLibraryLoadData")
        return lib.value

    def get_kernel(self, library: int, name: str) -> int:
        k = _vp()
        self.check(self.lib.cuLibraryGetKernel(ctypes.byref(k), library, name.encode()), f"cuLibraryGetKernel({name})")
        return k.value

    def set_max_dynamic_smem(self, kernel: int, device: int, nbytes: int) -> None:
        dev = _i()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        self.check(self.lib.cuKernelSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes, kernel,
                                                 dev.value), "cuKernelSetAttribute(max dynamic shared memory)")

    def ensure_context(self, device: int) -> None:
        """A thread that never touched this device through the runtime has no current context:
        make the device's primary context (torch's) current. Checked once per thread and device."""
        done = getattr(self._tls, "devices", None)
        if done is None:
            done = self._tls.devices = set()
        if device in done:
            return
        ctx = _vp()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = _i()
            self.check(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain")
            self.check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        done.add(device)


_driver: Driver | None = None
_driver_why: str | None = None
_lock = threading.Lock()


def get() -> tuple[Driver | None, str | None]:
    """(driver, None) or (None, why it could not be loaded). Cached."""
    global _driver, _driver_why
    if _driver is None and _driver_why is None:
        with _lock:
            if _driver is None and _driver_why is None:
                try:
                    _driver = Driver()
                except (OSError, AttributeError, DriverError) as e:
                    _driver_why = f"the CUDA driver library could not be used: {e}"
    return _driver, _driver_why
