"""install.py: arch detection and flags, the cache key, the no-GPU / no-nvcc paths, and one
real (small) build with the loader reading its manifest."""
import ctypes
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sa2_install", ROOT / "install.py")
install = importlib.util.module_from_spec(spec)
sys.modules["sa2_install"] = install  # dataclasses look their module up while decorating
spec.loader.exec_module(install)
Arch = install.Arch


def test_parse_arch_list_accepts_torch_spellings():
    assert install.parse_arch_list("8.0;8.6 8.9+PTX,9.0a;12.0") == [
        Arch(8, 0), Arch(8, 6), Arch(8, 9), Arch(9, 0), Arch(12, 0)
    ]
    assert install.parse_arch_list("8.9;8.9") == [Arch(8, 9)]
    with pytest.raises(install.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        install.parse_arch_list("sm_89")


def test_arch_flags():
    hopper, ada, ampere = Arch(9, 0), Arch(8, 9), Arch(8, 6)
    assert hopper.tag == "sm_90a" and hopper.gencode == "-gencode=arch=compute_90a,code=sm_90a"
    assert hopper.families == ["wgmma", "mma"] and "-DSA2_FAMILY_WGMMA=1" in hopper.defines()
    assert ada.fp8_mma and "-DSA2_HAS_FP8_MMA=1" in ada.defines() and ada.families == ["mma"]
    assert not ampere.fp8_mma and "-DSA2_ARCH=86" in ampere.defines()
    assert Arch(12, 0).gencode == "-gencode=arch=compute_120,code=sm_120"


def test_arch_list_env_wins_even_without_gpu():
    archs, origin = install.detect_archs({"TORCH_CUDA_ARCH_LIST": "8.9"})
    assert archs == [Arch(8, 9)] and origin == "TORCH_CUDA_ARCH_LIST"


def test_no_gpu_and_no_arch_list_builds_nothing(monkeypatch, capsys):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert install.main([]) == 0
    assert "nothing to build: no CUDA GPU" in capsys.readouterr().out


def test_no_nvcc_is_skipped_with_exit_0(monkeypatch, capsys):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    monkeypatch.setattr(install, "find_nvcc", lambda env=None: None)
    assert install.main([]) == 0
    assert "nvcc (the CUDA toolkit compiler) was not found" in capsys.readouterr().out


def test_too_old_gpu_and_too_old_toolkit_are_explained():
    assert "older than 8.0" in install.check_arch(Arch(7, 5), (13, 0))
    assert "needs CUDA 12.4" in install.check_arch(Arch(8, 9), (12, 2))
    assert install.check_arch(Arch(9, 0), (12, 4)) is None


def test_find_nvcc_prefers_cuda_home(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    assert install.find_nvcc({"CUDA_HOME": str(tmp_path)}) == fake


def write_src(dir_: Path, name, text):
    (dir_ / name).write_text(text)


def test_sources_headers_and_cache_key(tmp_path):
    csrc = tmp_path / "csrc"
    (csrc / "include").mkdir(parents=True)
    write_src(csrc, "a.cu", "// SA2_FAMILIES: all\n")
    write_src(csrc, "b.cu", "// SA2_FAMILIES: wgmma\n// SA2_SHARDS: 3\n")
    sources = install.scan_sources(csrc)
    assert [(s.path.name, s.families, s.shards) for s in sources] == [("a.cu", ["all"], 1), ("b.cu", ["wgmma"], 3)]
    assert sources[1].compiles_for(Arch(9, 0)) and not sources[1].compiles_for(Arch(8, 9))

    nvcc = Path("/usr/local/bin/nvcc")
    key = install.cache_key(sources, Arch(8, 9), nvcc, (13, 0), csrc)
    assert key == install.cache_key(sources, Arch(8, 9), nvcc, (13, 0), csrc)
    assert key != install.cache_key(sources, Arch(8, 6), nvcc, (13, 0), csrc)
    assert key != install.cache_key(sources, Arch(8, 9), nvcc, (12, 8), csrc)
    write_src(csrc / "include", "h.cuh", "// a header change must rebuild\n")
    assert key != install.cache_key(sources, Arch(8, 9), nvcc, (13, 0), csrc)

    key = install.cache_key(sources, Arch(8, 9), nvcc, (13, 0), csrc)
    os.environ["SAGEATTN2_NVCC_FLAGS"] = "-DSA2_EXPERIMENT=1"  # experiment flags rebuild too
    try:
        assert key != install.cache_key(sources, Arch(8, 9), nvcc, (13, 0), csrc)
        text = install.write_ninja(tmp_path, sources, Arch(8, 9), nvcc, link=True).read_text()
        assert "-DSA2_EXPERIMENT=1" in text
    finally:
        del os.environ["SAGEATTN2_NVCC_FLAGS"]
    assert key == install.cache_key(sources, Arch(8, 9), nvcc, (13, 0), csrc)

    write_src(csrc, "c.cu", "// no header\n")
    with pytest.raises(install.BuildError, match="SA2_FAMILIES"):
        install.scan_sources(csrc)


def test_ninja_file_shards_and_skips_other_families(tmp_path):
    src = [install.Source(Path("/x/a.cu"), ["all"]), install.Source(Path("/x/w.cu"), ["wgmma"], 2)]
    text = install.write_ninja(tmp_path, src, Arch(9, 0), Path("nvcc"), link=True).read_text()
    assert "build obj/w.0.o: cu /x/w.cu" in text and "-DSA2_SHARD=1 -DSA2_NUM_SHARDS=2" in text
    assert "compute_90a" in text and "libsageattn2.so: link obj/a.o obj/w.0.o obj/w.1.o" in text
    text = install.write_ninja(tmp_path, src, Arch(8, 9), Path("nvcc"), link=True).read_text()
    assert "w.cu" not in text


def test_windows_paths_and_flags(tmp_path):
    """The default CUDA path on Windows has spaces, a drive has a colon, MSVC knows no -fPIC."""
    assert install.ninja_path(r"C:\Comfy UI\csrc\a.cu") == r"C$:\Comfy$ UI\csrc\a.cu"
    src = [install.Source(Path("/Comfy UI/csrc/a.cu"), ["all"])]
    nvcc = Path("/Program Files/CUDA/bin/nvcc")
    text = install.write_ninja(tmp_path, src, Arch(8, 9), nvcc, link=True).read_text()
    assert 'nvcc = "/Program Files/CUDA/bin/nvcc"' in text and '-I"/Comfy UI/csrc/include"' in text
    assert "cu /Comfy$ UI/csrc/a.cu" in text
    assert "-fPIC" in install.nvcc_flags({}, "linux") and "-fPIC" not in install.nvcc_flags({}, "win32")
    assert install.nvcc_flags({"SAGEATTN2_NVCC_FLAGS": "-DA=1 -DB=2"}, "win32")[-2:] == ["-DA=1", "-DB=2"]


@pytest.mark.skipif(install.find_nvcc() is None or install.find_ninja() is None, reason="needs nvcc and ninja")
def test_real_build_is_cached_and_loads(tmp_path, monkeypatch, capsys):
    """Builds csrc/common.cu alone (fast) for sm_80, rebuilds nothing the second time, and
    loads the library with ctypes: it exports the C ABI and depends on no torch symbols."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc" / "include", csrc / "include")
    shutil.copy(ROOT / "csrc" / "common.cu", csrc / "common.cu")
    monkeypatch.setattr(install, "CSRC", csrc)
    monkeypatch.setattr(install, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert install.main(["--no-selfcheck"]) == 0
    assert install.main(["--no-selfcheck"]) == 0
    assert "up to date" in capsys.readouterr().out

    lib_path = tmp_path / "build" / "sm_80" / install.LIB_NAME
    lib = ctypes.CDLL(str(lib_path))
    assert lib.sa2_abi_version() == 2
    import json

    manifest = json.loads((tmp_path / "build" / "manifest.json").read_text())
    # Only common.cu was built: no kernel family is listed, so dispatch will not try one.
    assert manifest["archs"]["sm_80"] == {"path": "sm_80/" + install.LIB_NAME, "families": [], "fp8_mma": False}
    if sys.platform.startswith("linux"):
        import subprocess

        assert "torch" not in subprocess.run(["ldd", str(lib_path)], capture_output=True, text=True).stdout
