"""The kernels of a device without a GPU: first use compiles what the cache lacks with one log
line per process, a kernel that cannot be built gives a reason (not an exception) to the
dispatcher, and a device the table does not serve says why."""
import logging

from sageattn2 import archs, build, kernels, loader, nvrtc


class FakeNvrtc:
    version = (13, 0)

    def __init__(self, broken=()):
        self.broken = broken

    def compile(self, source, name, headers, options, exprs):
        if any(b in name for b in self.broken):
            raise nvrtc.NvrtcError(f"compiling {name}: error: broken on purpose")
        return b"cubin:" + name.encode(), {e: "sym_" + name for e in exprs}, ""


class FakeDriver:
    def __init__(self):
        self.loaded, self.smem = [], []
        self.launch_kernel = None

    def load_library(self, cubin):
        self.loaded.append(cubin)
        return len(self.loaded)

    def get_kernel(self, library, name):
        return 1000 + library

    def set_max_dynamic_smem(self, kernel, device, nbytes):
        self.smem.append((kernel, device, nbytes))


def device_kernels(tmp_path, monkeypatch, nv):
    monkeypatch.setattr(kernels, "launch_info", lambda k, cubin: {"threads": 128, "smem": 60000, "cta_q": 128})
    monkeypatch.setattr(loader, "_first_compile_logged", False)
    return loader.DeviceKernels(0, archs.arch(8, 9), build.Builder(nv, tmp_path, extra=()), FakeDriver())


def test_first_use_compiles_with_one_log_line(tmp_path, monkeypatch, caplog):
    dk = device_kernels(tmp_path, monkeypatch, FakeNvrtc())
    with caplog.at_level(logging.INFO, logger="sageattn2"):
        a = dk.get(kernels.mma_kernel(128, False, 2))
        b = dk.get(kernels.mma_kernel(64, False, 2))
        assert dk.get(kernels.mma_kernel(128, False, 2)) is a  # loaded once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "compiling kernels for sm_89 on first use" in lines[0]
    assert (a.threads, a.smem) == (128, 60000) and a.handle != b.handle
    assert dk.drv.smem == [(a.handle, 0, 60000), (b.handle, 0, 60000)]  # above 48 KB: raised once each
    # A second process finds both in the cache: nothing compiled, nothing logged.
    caplog.clear()
    again = device_kernels(tmp_path, monkeypatch, FakeNvrtc(broken=("mma",)))
    with caplog.at_level(logging.INFO, logger="sageattn2"):
        assert again.available(kernels.mma_kernel(128, False, 2)) is None
    assert not caplog.records


def test_a_kernel_that_does_not_compile_is_a_reason(tmp_path, monkeypatch):
    dk = device_kernels(tmp_path, monkeypatch, FakeNvrtc(broken=("mma-d256",)))
    why = dk.available(kernels.mma_kernel(256, False, 0))
    assert "mma-d256-int8-fp16 for sm_89" in why and "broken on purpose" in why
    assert dk.available(kernels.mma_kernel(256, False, 0)) == why  # remembered, not recompiled
    assert dk.available(kernels.mma_kernel(128, False, 0)) is None


def test_devices_without_kernels_say_why(monkeypatch):
    monkeypatch.setattr(loader, "_capability", lambda index: (7, 5))
    loader._for_index.cache_clear()
    try:
        dk, why = loader._for_index(0)
        assert dk is None and "older than 8.0" in why and "stock attention" in why
        monkeypatch.setattr(loader, "_capability", lambda index: (8, 9))
        monkeypatch.setattr(nvrtc, "load", lambda: (None, "NVRTC (the CUDA runtime compiler) was not found"))
        loader._for_index.cache_clear()
        dk, why = loader._for_index(0)
        assert dk is None and "NVRTC" in why and "not found" in why
    finally:
        loader._for_index.cache_clear()
