"""install.py on machines that cannot (fully) build: every case exits 0 with a clear message,
never a traceback; one failing arch keeps the others; `$` and spaces in paths; and a real
(small) NVRTC build when NVRTC is available."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sa2_install", ROOT / "install.py")
install = importlib.util.module_from_spec(spec)
sys.modules["sa2_install"] = install
spec.loader.exec_module(install)

from sageattn2 import archs, build, kernels, nvrtc  # noqa: E402

NV, _ = nvrtc.load()
needs_nvrtc = pytest.mark.skipif(NV is None, reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")


def test_parse_arch_list_accepts_torch_spellings():
    assert install.parse_arch_list("8.0;8.6 8.9+PTX,9.0a;12.0") == [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)]
    assert install.parse_arch_list("8.9;8.9") == [(8, 9)]
    with pytest.raises(install.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        install.parse_arch_list("sm_89")


def test_bad_arch_list_is_a_message_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_89")
    assert install.main([]) == 0
    assert "cannot read 'sm_89'" in capsys.readouterr().out


def test_no_gpu_and_no_arch_list_builds_nothing(monkeypatch, capsys):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert install.main([]) == 0
    assert "nothing to build: no CUDA GPU" in capsys.readouterr().out


def test_no_nvrtc_is_skipped_with_exit_0(monkeypatch, capsys):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    monkeypatch.setattr(nvrtc, "load", lambda: (None, "NVRTC (the CUDA runtime compiler) was not found"))
    assert install.main([]) == 0
    out = capsys.readouterr().out
    assert "NVRTC (the CUDA runtime compiler) was not found" in out and "stock attention" in out
    assert install.main(["--compile-only"]) == 1  # CI must notice


class FakeNvrtc:
    """NVRTC that knows sm_80..sm_120 and compiles nothing (or fails for chosen archs)."""

    version = (13, 0)
    archs = (75, 80, 86, 87, 89, 90, 100, 120)
    found = nvrtc.Found(Path("/fake/libnvrtc.so.13"), None, "a test")

    def __init__(self, fail_archs=()):
        self.fail_archs = fail_archs

    def compile(self, source, name, headers, options, exprs):
        if any(f"sm_{a}" in " ".join(options) for a in self.fail_archs):
            raise nvrtc.NvrtcError(f"compiling {name}: broken on purpose")
        return bytes(8 * 16), {e: "sym" for e in exprs}, ""


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """install.py with a fake NVRTC whose 'cubins' carry launch constants of zeros."""
    monkeypatch.setattr(kernels, "launch_info", lambda kernel, cubin: {n: 0 for n, _ in kernel.info})
    monkeypatch.setenv("SAGEATTN2_CACHE_DIR", str(tmp_path / "cache"))

    def use(nv):
        monkeypatch.setattr(nvrtc, "load", lambda: (nv, None))
        return tmp_path / "cache"

    return use


def test_old_gpus_are_skipped_with_exit_0(monkeypatch, capsys, fake_build):
    fake_build(FakeNvrtc())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;7.5")
    assert install.main([]) == 0
    out = capsys.readouterr().out
    assert "older than 8.0" in out and "no architecture to build" in out


def test_one_failing_arch_keeps_the_others(monkeypatch, capsys, fake_build):
    cache = fake_build(FakeNvrtc(fail_archs=(86,)))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;8.9;99.9")
    assert install.main(["--no-selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "complete for sm_89" in out and "incomplete for sm_86" in out
    assert "sm_999: this NVRTC cannot compile for it" in out
    n89 = len(kernels.product_kernels(archs.arch(8, 9)))
    assert len(list((cache / "sm_89").glob("*.bin"))) == n89
    assert not list((cache / "sm_86").glob("*.bin"))
    assert install.main(["--compile-only"]) == 1


def test_read_only_pack_folder_uses_the_user_cache(tmp_path, monkeypatch):
    pack = tmp_path / "pack" / "kernels"
    monkeypatch.setattr(build, "writable", lambda folder: folder != pack)
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert build.cache_dir(env, pack) == tmp_path / "xdg" / "sageattn2"
    monkeypatch.setattr(build, "writable", lambda folder: False)
    with pytest.raises(OSError, match="SAGEATTN2_CACHE_DIR"):
        build.cache_dir(env, pack)
    monkeypatch.setattr(build, "writable", lambda folder: True)
    assert build.cache_dir(env, pack) == pack


def test_writable_probe(tmp_path):
    assert build.writable(tmp_path / "new" / "dir")
    (tmp_path / "file").write_text("")
    assert not build.writable(tmp_path / "file" / "sub")  # a file where the folder should be


def test_concurrent_installs_compile_each_kernel_once(monkeypatch, capsys, fake_build):
    import threading
    import time

    class Counting(FakeNvrtc):
        def __init__(self):
            super().__init__()
            self.names, self.lock = [], threading.Lock()

        def compile(self, source, name, *rest):
            time.sleep(0.002)
            with self.lock:
                self.names.append(name)
            return super().compile(source, name, *rest)

    nv = Counting()
    cache = fake_build(nv)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    rcs = []
    threads = [threading.Thread(target=lambda: rcs.append(install.main(["--no-selfcheck", "-j", "2"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rcs == [0, 0]
    assert sorted(nv.names) == sorted(set(nv.names))  # nothing compiled twice
    assert len(nv.names) == len(kernels.product_kernels(archs.arch(8, 9)))
    assert not list(cache.rglob("*.tmp"))


def test_dollar_and_space_in_the_cache_path(monkeypatch, capsys, fake_build, tmp_path):
    fake_build(FakeNvrtc())
    cache = tmp_path / "Comfy UI $HOME ${x}"
    monkeypatch.setenv("SAGEATTN2_CACHE_DIR", str(cache))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert install.main(["--no-selfcheck"]) == 0
    assert len(list((cache / "sm_80").glob("*.bin"))) == len(kernels.product_kernels(archs.arch(8, 0)))


def test_nothing_writable_is_a_message(monkeypatch, capsys, fake_build):
    fake_build(FakeNvrtc())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")

    def no_cache():
        raise OSError("neither A nor B is writable: set SAGEATTN2_CACHE_DIR")

    monkeypatch.setattr(build, "cache_dir", no_cache)
    assert install.main([]) == 0
    assert "set SAGEATTN2_CACHE_DIR" in capsys.readouterr().out


def test_windows_user_cache_dir():
    assert build.user_cache_dir({"LOCALAPPDATA": r"C:\Users\a\AppData\Local"}, "win32") == \
        Path(r"C:\Users\a\AppData\Local") / "sageattn2" / "cache"


@needs_nvrtc
def test_real_build_into_a_dollar_path_is_cached(tmp_path, monkeypatch, capsys):
    """The smallest product kernel compiled for sm_80 into a folder whose name has `$` and a
    space (no ninja, no shell: nothing expands it); the second run compiles nothing."""
    cache = tmp_path / "pack $HOME dir"
    b = build.Builder(NV, cache, extra=())
    kernel = kernels.smooth_v16_kernel(False)
    entry, compiled = b.get(kernel, archs.arch(8, 0))
    assert compiled and entry.info == {"threads": 256}
    assert kernels.cubin_sm(entry.cubin) == 80
    again, compiled = build.Builder(NV, cache, extra=()).get(kernel, archs.arch(8, 0))
    assert not compiled and again.cubin == entry.cubin and again.symbol == entry.symbol
    assert "$HOME" in str(b.path(kernel, archs.arch(8, 0)))
