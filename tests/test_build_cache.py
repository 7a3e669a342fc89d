"""The kernel cache: keys that change with what was compiled, entries written atomically, and
two builders of one kernel at once compiling it once without corrupting it."""
import threading
import time

from sageattn2 import archs, build, kernels, nvrtc

SM89 = archs.arch(8, 9)


class SlowNvrtc:
    version = (13, 0)

    def __init__(self):
        self.compiles = 0

    def compile(self, source, name, headers, options, exprs):
        self.compiles += 1
        time.sleep(0.2)  # another builder arrives meanwhile
        return b"\x7fELF" + bytes(60), {e: "sym_" + name for e in exprs}, ""


def test_key_changes_with_every_input():
    k, hdrs = kernels.smooth_v16_kernel(False), {"sa2/a.cuh": "x"}
    key = kernels.cache_key(k, SM89, (13, 0), (), hdrs)
    assert key == kernels.cache_key(k, SM89, (13, 0), (), dict(hdrs))
    assert key != kernels.cache_key(k, archs.arch(8, 6), (13, 0), (), hdrs)
    assert key != kernels.cache_key(k, SM89, (13, 1), (), hdrs)
    assert key != kernels.cache_key(k, SM89, (13, 0), ("-DSA2_X=1",), hdrs)
    assert key != kernels.cache_key(k, SM89, (13, 0), (), {"sa2/a.cuh": "y"})
    assert key != kernels.cache_key(kernels.smooth_v16_kernel(True), SM89, (13, 0), (), hdrs)


def test_concurrent_builders_compile_once(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "launch_info", lambda kernel, cubin: {"threads": 256})
    nv = SlowNvrtc()
    kernel = kernels.smooth_v16_kernel(False)
    results = []

    def run():
        results.append(build.Builder(nv, tmp_path, extra=()).get(kernel, SM89))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert nv.compiles == 1
    assert sorted(compiled for _, compiled in results) == [False, False, False, True]
    assert all(e.cubin == results[0][0].cubin for e, _ in results)
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary left behind


def test_torn_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "launch_info", lambda kernel, cubin: {"threads": 256})
    nv = SlowNvrtc()
    b = build.Builder(nv, tmp_path, extra=())
    kernel = kernels.smooth_v16_kernel(False)
    entry, _ = b.get(kernel, SM89)
    path = b.path(kernel, SM89)
    path.write_bytes(path.read_bytes()[:-5])  # what a crash mid-write without the rename would leave
    again, compiled = b.get(kernel, SM89)
    assert compiled and again.cubin == entry.cubin and nv.compiles == 2


def test_failed_compile_leaves_no_entry(tmp_path):
    class Broken(SlowNvrtc):
        def compile(self, *a):
            raise nvrtc.NvrtcError("broken")

    b = build.Builder(Broken(), tmp_path, extra=())
    res = b.build_all([(kernels.smooth_v16_kernel(False), SM89)], 2)
    assert res[0][2] == "broken" and not list(tmp_path.rglob("*.bin"))


def test_every_arch_lists_each_kernel_once():
    # install.py --all compiles what test_kernels lists; a name twice is compiled twice.
    for cc in archs.PRODUCT_ARCHS:
        arch = archs.arch(*cc)
        for listing in (kernels.product_kernels(arch), kernels.test_kernels(arch)):
            names = [k.name for k in listing]
            assert len(names) == len(set(names)), (arch.target, sorted({n for n in names if names.count(n) > 1}))
    sm90 = kernels.test_kernels(archs.arch(9, 0))
    assert {"mma-d64-int4-fp8", "mma-d128-int4-fp8"} <= {k.name for k in sm90}  # emulated INT4 stays listed
