"""Finding NVRTC where torch's CUDA wheels or a CUDA toolkit put it, on fake Linux and Windows
layouts (tmp folders): the right library and its builtins, the preference order, and a message
naming what was searched when nothing is there."""
from pathlib import Path

from sageattn2 import nvrtc


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def no_which(*_a, **_k):
    return None


def test_linux_cuda13_wheel_layout(tmp_path):
    site = tmp_path / "site-packages"
    lib = touch(site / "nvidia/cu13/lib/libnvrtc.so.13")
    builtins = touch(site / "nvidia/cu13/lib/libnvrtc-builtins.so.13.0")
    touch(site / "nvidia/cu13/lib/libnvrtc.alt.so.13")
    touch(site / "nvidia/cu13/lib/libnvrtc-builtins.alt.so.13.0")
    found, _ = nvrtc.find({}, [site], windows=False, which=no_which)
    assert found.library == lib and found.builtins == builtins and "torch's CUDA wheels" in found.origin


def test_linux_cuda12_wheel_layout(tmp_path):
    site = tmp_path / "site-packages"
    lib = touch(site / "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
    builtins = touch(site / "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.8")
    found, _ = nvrtc.find({}, [site], windows=False, which=no_which)
    assert (found.library, found.builtins) == (lib, builtins)


def test_windows_dll_beside_torch(tmp_path):
    site = tmp_path / "Lib" / "site-packages"
    lib = touch(site / "torch/lib/nvrtc64_130_0.dll")
    builtins = touch(site / "torch/lib/nvrtc-builtins64_130.dll")
    touch(site / "torch/lib/nvrtc64_130_0.alt.dll")
    touch(site / "torch/lib/cudnn64_9.dll")
    found, _ = nvrtc.find({}, [site], windows=True, which=no_which)
    assert (found.library, found.builtins) == (lib, builtins)


def test_windows_toolkit_from_cuda_path(tmp_path):
    home = tmp_path / "Program Files/NVIDIA GPU Computing Toolkit/CUDA/v13.0"
    lib = touch(home / "bin/x64/nvrtc64_130_0.dll")
    touch(home / "bin/x64/nvrtc-builtins64_130.dll")
    found, _ = nvrtc.find({"CUDA_PATH": str(home)}, [tmp_path / "empty-site"], windows=True, which=no_which)
    assert found.library == lib and "toolkit" in found.origin


def test_wheels_win_over_a_toolkit(tmp_path):
    site = tmp_path / "site"
    wheel = touch(site / "nvidia/cu13/lib/libnvrtc.so.13")
    home = tmp_path / "cuda"
    touch(home / "lib64/libnvrtc.so.12")
    found, _ = nvrtc.find({"CUDA_HOME": str(home)}, [site], windows=False, which=no_which)
    assert found.library == wheel


def test_toolkit_found_through_nvcc_on_path(tmp_path):
    home = tmp_path / "cuda-12.8"
    lib = touch(home / "lib64/libnvrtc.so.12")
    nvcc = touch(home / "bin/nvcc")
    found, _ = nvrtc.find({"PATH": "x"}, [], windows=False, which=lambda name, path=None: str(nvcc))
    assert found.library == lib


def test_explicit_path_and_nothing_found(tmp_path):
    lib = touch(tmp_path / "x/libnvrtc.so.13")
    found, _ = nvrtc.find({"SAGEATTN2_NVRTC": str(lib)}, [], windows=False, which=no_which)
    assert found.library == lib and found.origin == "SAGEATTN2_NVRTC"
    found, searched = nvrtc.find({"SAGEATTN2_NVRTC": str(tmp_path / "nope.so")}, [], windows=False)
    assert found is None and "no such file" in searched[0]
    found, searched = nvrtc.find({}, [tmp_path / "site"], windows=False, which=no_which)
    assert found is None and any("nvidia/cu13/lib" in s for s in searched)
