"""A CUDA device made of stand-ins, so the host path of an attention call runs on a CPU.

Only what needs a GPU is replaced: the driver library (every function is a C no-op that
returns CUDA_SUCCESS, so the real `sageattn2.driver.Driver` and its ctypes calls run, argument
conversion included), the compiled kernels (launch constants as the kernels' traits give
them), torch's CUDA stream and device queries, and the `is_cuda` checks of planning. Tensors
are CPU tensors; everything else (api, dispatch, the backends' plans, templates, TMA
descriptor caching) is the product code. Used by bench/bench_host.py and tests/test_host_path.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import threading
import time

import torch

from sageattn2 import api, archs, autotune, dispatch, driver, kernels, loader
from sageattn2.backends import calls, mma, wgmma
from sageattn2.config import Family, tile_shape

QUANT_INFO = {"threads": 256, "stats_chunk_rows": 256, "stats_stage_bytes": 32768, "v_tile_tokens": 64}


class NoOpDriverLibrary:
    """Every attribute is a fresh ctypes function pointer to libm's `fegetround`: a C function
    that ignores its arguments and returns 0 (FE_TONEAREST, also CUDA_SUCCESS) without a
    system call, so a stubbed driver call costs what ctypes costs."""

    def __init__(self):
        self._libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        fn = self._libm._FuncPtr(("fegetround", self._libm))
        fn.restype = ctypes.c_int
        setattr(self, name, fn)
        return fn


_LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p)
_ENCODE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p,
                           ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                           ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int)


class RecordingDriverLibrary(NoOpDriverLibrary):
    """The no-op library, except that cuLaunchKernel records each launch as C code would see it
    (thread, kernel handle, grid, block, shared memory, stream, a copy of the parameter struct)
    and cuTensorMapEncodeTiled writes a readable descriptor: words [base, data type, dims x4,
    byte strides x3, box x2, swizzle]. `param_bytes(handle)` says how many bytes a kernel's
    parameter has; `pause` (seconds) is slept between reading a launch's parameter address and
    copying the parameter, letting other threads run there."""

    def __init__(self, param_bytes, pause: float = 0.0):
        super().__init__()
        self.launches, self.encodes, self.pause, self._param_bytes = [], [], pause, param_bytes

        def launch(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            struct_addr = ctypes.c_void_p.from_address(params).value
            if self.pause:
                time.sleep(self.pause)
            raw = ctypes.string_at(struct_addr, self._param_bytes(f))
            self.launches.append(Launch(threading.get_ident(), f, (gx, gy, gz), bx, smem, stream or 0, raw))
            return 0

        def encode(dst, dtype, rank, base, dims, strides, box, elem, interleave, swizzle, l2, oob):
            words = [base or 0, dtype, *dims[:4], *strides[:3], *box[:2], swizzle]
            self.encodes.append(base or 0)
            ctypes.memmove(dst, (ctypes.c_uint64 * len(words))(*words), 8 * len(words))
            return 0

        self._callbacks = (_LAUNCH(launch), _ENCODE(encode))  # alive as long as the library
        for name, cb in zip(("cuLaunchKernel", "cuTensorMapEncodeTiled"), self._callbacks):
            fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.cast(cb, ctypes.c_void_p).value)
            fn.argtypes = None  # called as the driver's: arguments as the caller passes them
            setattr(self, name, fn)


@dataclasses.dataclass
class Launch:
    thread: int
    handle: int
    grid: tuple
    threads: int
    smem: int
    stream: int
    params: bytes

    def struct(self, struct_type):
        return struct_type.from_buffer_copy(self.params[:ctypes.sizeof(struct_type)])


def keep_freed_memory() -> None:
    """Makes glibc's malloc reuse freed blocks instead of mapping and unmapping large ones, as
    the CUDA caching allocator reuses device memory (else CPU torch.empty of a few hundred KB
    pays page mapping on every call). No-op where mallopt is missing."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 1 << 30)
        mallopt(m_trim_threshold, 1 << 30)




def _info(kernel: kernels.Kernel) -> dict[str, int]:
    if kernel.name.startswith(("quant", "smooth_v16")):
        return dict(QUANT_INFO)
    dpad = int(kernel.name.split("-")[1][1:])
    if kernel.name.startswith("wgmma"):
        warpgroups = kernels.WGMMA_SCHEDULES[kernel.name.split("-")[-1]][1]
        tile = tile_shape(Family.WGMMA, dpad)
        return {"threads": 128 * (warpgroups + 1), "smem": 200_000, "cta_q": 64 * warpgroups,
                "k_tile": tile.k_tile}
    tile = tile_shape(Family.MMA, dpad)
    return {"threads": 128, "smem": 50_000, "smem_no_qbar": 48_000, "cta_q": tile.cta_q, "k_tile": tile.k_tile,
            "warp_q": tile.warp_q}


class StubDeviceKernels:
    """loader.DeviceKernels of device 0 without NVRTC: `get` returns a real loader.Loaded whose
    launch calls the stub driver."""

    index = 0

    def __init__(self, capability=(9, 0), record: bool = False, pause: float = 0.0):
        self.arch = archs.arch(*capability)
        self.tag, self.families = self.arch.target, self.arch.families
        self.lib = (RecordingDriverLibrary(self.param_bytes, pause) if record else NoOpDriverLibrary())
        self.drv = driver.Driver(self.lib)  # the real class over the stand-in library
        self._loaded, self.kernels = {}, {}

    def get(self, kernel, max_dynamic_smem=None):
        k = self._loaded.get(kernel.name)
        if k is None:
            handle = 0x7000 + len(self._loaded)
            k = self._loaded[kernel.name] = loader.Loaded(kernel.name, handle, _info(kernel), 0, self.drv)
            self.kernels[handle] = kernel
        return k

    def param_bytes(self, handle: int) -> int:
        return ctypes.sizeof(self.kernels[handle].params)

    def available(self, kernel, max_dynamic_smem=None):
        self.get(kernel)
        return None


@contextlib.contextmanager
def stub_device(monkeypatch, capability=(9, 0), stream=0, record: bool = False, pause: float = 0.0):
    """Within this context CPU tensors are served by the kernel families of `capability` on
    the stand-in device. `stream` is what torch's current stream reads as (an int or a callable);
    `record`/`pause`: a RecordingDriverLibrary (`dk.lib.launches`). `monkeypatch` is pytest's
    fixture or a `pytest.MonkeyPatch()`."""
    dk = StubDeviceKernels(capability, record, pause)
    # Plans made here hold this device's kernels: none made before is served, none leaks out.
    for mod, name in ((api, "_calls"), (dispatch, "_plans"), (mma, "_attention_plans"), (wgmma, "_attention_plans"),
                      (wgmma, "_run_launches"), (autotune, "_decisions"), (mma, "_counter_sets")):
        monkeypatch.setattr(mod, name, {})
    stream_of = stream if callable(stream) else (lambda: stream)
    monkeypatch.setattr(mma, "_device_kernels", lambda device: dk)
    monkeypatch.setattr(calls, "current_stream", lambda index: stream_of())
    monkeypatch.setattr(calls, "current_device", lambda: dk.index)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(loader, "capability", lambda device: capability)
    # Planning: CPU tensors count as on the device.
    for mod in (mma, wgmma):
        real = mod.unsupported_reason
        monkeypatch.setattr(mod, "unsupported_reason", _as_cuda(real, dk))
    monkeypatch.setattr(wgmma, "arch_of", lambda device: dk.arch)
    monkeypatch.setattr(mma, "kernels_for_device", lambda device: (dk, None))
    monkeypatch.setattr(wgmma, "kernels_for_device", lambda device: (dk, None))

    def plan_uncached(q, k, v, *, layout, precision, granularity, smooth_k, smooth_q, smooth_v, is_causal,
                      backend, force_int4_emulation, hadamard):
        if precision == "exact" or backend in ("exact", "reference"):
            return real_plan_uncached(q, k, v, layout=layout, precision=precision, granularity=granularity,
                                      smooth_k=smooth_k, smooth_q=smooth_q, smooth_v=smooth_v, is_causal=is_causal,
                                      backend=backend, force_int4_emulation=force_int4_emulation, hadamard=hadamard)
        return dispatch.plan_for_library(q, k, v, dk, capability, layout=layout, precision=precision,
                                         granularity=granularity, smooth_k=smooth_k, smooth_q=smooth_q,
                                         smooth_v=smooth_v, is_causal=is_causal,
                                         force_int4_emulation=force_int4_emulation, hadamard=hadamard)

    real_plan_uncached = dispatch._plan_uncached
    monkeypatch.setattr(dispatch, "_plan_uncached", plan_uncached)
    monkeypatch.setattr(autotune, "paired_medians", lambda quantized, exact: (1.0, 2.0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    yield dk


class _CudaView:
    """A tensor that says it is on a CUDA device (for `unsupported_reason` only)."""

    def __init__(self, t):
        self._t = t

    is_cuda = True

    def __getattr__(self, name):
        return getattr(self._t, name)


def _as_cuda(real, dk):
    def unsupported_reason(q, k, v, **kw):
        return real(*(_CudaView(x) for x in (q, k, v)), **kw)
    return unsupported_reason
