"""The cached host path of an attention call serves no stale plan (CPU).

`sageattn` keeps, per call signature, how it is served; the backends keep a plan per tensor
signature and the parameter bytes of each launch per (stream, pointers). These tests run the
real API, dispatch, backends and Driver class on CPU tensors over the stand-in device of
bench/host_stubs.py, whose driver library records every launch as C code sees it (the
parameter struct copied from the pointer the launch passed), and check each launch against
the call that made it: new pointers, strides, streams and shapes reach the kernels, threads
launching one plan at once each launch their own pointers, and bad arguments still raise after
a good call of the same shapes.
"""
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from host_stubs import stub_device  # noqa: E402

import sageattn2  # noqa: E402
from sageattn2 import abi, api, autotune, dispatch  # noqa: E402
from sageattn2.backends import calls, mma  # noqa: E402

FAMILIES = {"wgmma": (9, 0), "mma": (8, 9)}


class Device:
    def __init__(self, dk):
        self.dk, self.stream = dk, 0

    def launches(self, since=0):
        """(kernel name, launch) of every launch from index `since` on."""
        return [(self.dk.kernels[l.handle].name, l) for l in self.dk.lib.launches[since:]]

    def call(self, *args, **kwargs):
        """sageattn(...) and the launches it made: {"quant": [...], "attention": launch}."""
        before = len(self.dk.lib.launches)
        result = sageattn2.sageattn(*args, **kwargs)
        made = self.launches(before)
        quant = [l for name, l in made if name.startswith("quant")]
        attention = [l for name, l in made if not name.startswith("quant")]
        assert len(attention) == 1 and 1 <= len(quant) <= 2 and made[-1][1] is attention[0]
        return result, quant, attention[0]


@pytest.fixture(params=list(FAMILIES))
def device(request, monkeypatch):
    holder = {}
    with stub_device(monkeypatch, FAMILIES[request.param], stream=lambda: holder["dev"].stream, record=True) as dk:
        holder["dev"] = dev = Device(dk)
        dev.family = request.param
        yield dev


def qkv(shape=(1, 2, 300, 128), layout="HND", seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    make = lambda: torch.randn(b, h, n, d, generator=g).to(torch.bfloat16)
    q, k, v = make(), make(), make()
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def attention_struct(dev, launch):
    return launch.struct(abi.WgmmaAttnParams if dev.family == "wgmma" else abi.MmaAttnParams)


def out_pointer(dev, launch):
    a = attention_struct(dev, launch)
    out, lse = (a.p.out, a.p.lse) if dev.family == "wgmma" else (a.out, a.lse)
    return out, lse or 0


def check_call(dev, q, k, v, quant, attention, out, lse=None, pv="fp8", layout="HND"):
    """The launches of one call read this call's q, k, v and write its O and lse."""
    params = [l.struct(abi.QuantizeParams) for l in quant]
    q_hnd_strides = q.stride()[:3] if layout == "HND" else (q.stride(0), q.stride(2), q.stride(1))
    for p in params:
        assert p.rows[0].x.ptr == q.data_ptr() and p.rows[1].x.ptr == k.data_ptr()
        assert (p.rows[0].x.stride_b, p.rows[0].x.stride_h, p.rows[0].x.stride_n) == q_hnd_strides
        if pv == "fp8":
            assert p.v.x.ptr == v.data_ptr()
    assert out_pointer(dev, attention) == (out.data_ptr(), 0 if lse is None else lse.data_ptr())
    ws_q, ws_k = params[0].rows[0].out, params[0].rows[1].out  # the call's workspace
    a = attention_struct(dev, attention)
    if dev.family == "wgmma":  # the descriptors map the same workspace (stand-in words: base first)
        assert (a.tm_q[0], a.tm_k[0]) == (ws_q, ws_k)
        assert a.tm_v[0] == (params[0].v.out if pv == "fp8" else v.data_ptr())
    else:
        assert (a.q, a.k) == (ws_q, ws_k)
        assert a.v == (params[0].v.out if pv == "fp8" else v.data_ptr())
    assert attention.stream == dev.stream and all(l.stream == dev.stream for l in quant)


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_repeated_calls_launch_their_own_pointers(device, pv, monkeypatch):
    level = f"int8+{pv}"
    first = qkv(seed=1)
    (out1, quant1, att1) = device.call(*first, precision=level)
    check_call(device, *first, quant1, att1, out1, pv=pv)
    planned = []
    monkeypatch.setattr(dispatch, "plan", lambda *a, **kw: planned.append(1))  # a repeat must not re-plan
    second = qkv(seed=2)
    keep = [out1]
    for _ in range(3):
        out2, quant2, att2 = device.call(*second, precision=level)
        check_call(device, *second, quant2, att2, out2, pv=pv)
        keep.append(out2)
    assert planned == [] and len(api._calls) == 1
    out3, quant3, att3 = device.call(*first, precision=level)  # back to the first pointers
    check_call(device, *first, quant3, att3, out3, pv=pv)


def test_the_rotation_reaches_the_quantizer_launches(device):
    """sageattn(hadamard=True) on either family launches the rotating quantizers with this call's
    pointers, the same attention kernel; the unrotated call of the same tensors keeps its own plan."""
    q, k, v = qkv(seed=5)
    names = lambda since: [name for name, _ in device.launches(since)]
    for rotate in (True, False, True):
        before = len(device.dk.lib.launches)
        out, quant, att = device.call(q, k, v, precision="int8+fp8", hadamard=rotate, return_lse=True)
        check_call(device, q, k, v, quant, att, *out)
        launched = names(before)
        if rotate:  # K smoothing and the lse: k-bar first (statistics only, nothing to rotate)
            assert launched[:2] == ["quant-bf16-d128-stats", "quant-bf16-d128-kvq-hadamard"]
        else:
            assert launched[:2] == ["quant-bf16-d128-stats", "quant-bf16-d128-kvq"]
        assert launched[2].startswith(device.family)
    assert sorted(c.plan.cfg.hadamard for c in api._calls.values()) == [False, True]
    before = len(device.dk.lib.launches)
    out, quant, att = device.call(q, k, v, precision="int8+fp16", hadamard=True)
    assert names(before)[:2] == ["quant-bf16-d128-qstats-hadamard", "quant-bf16-d128-kvq-hadamard"]


def test_other_strides_same_shape_get_their_own_plan(device):
    q, k, v = qkv(seed=3)
    out, quant, att = device.call(q, k, v, precision="int8+fp8")
    check_call(device, q, k, v, quant, att, out)
    # Same (B, H, N, D) and dtype, other strides: (B, N, H, D) memory viewed as HND; first for
    # q alone, then for v alone.
    qs, _, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(seed=4))
    assert qs.shape == q.shape and qs.stride() != q.stride()
    out, quant, att = device.call(qs, k, v, precision="int8+fp8")
    check_call(device, qs, k, v, quant, att, out)
    for v_now in (v, vs):  # 16-bit V is read in place
        out, quant, att = device.call(q, k, v_now, precision="int8+fp16")
        check_call(device, q, k, v_now, quant, att, out, pv="fp16")
    a = attention_struct(device, att)
    if device.family == "mma":
        assert (a.v_stride_b, a.v_stride_h, a.v_stride_n) == vs.stride()[:3]
    else:  # the stand-in descriptor's byte strides of dims 1..3 (tokens, heads, batch)
        assert tuple(a.tm_v[6:9]) == (2 * vs.stride(2), 2 * vs.stride(1), 2 * vs.stride(0))
    assert len(api._calls) == 4


def test_a_new_stream_gets_its_own_launches_and_counters(device):
    q, k, v = qkv(seed=5)
    counters = {}
    for stream in (0, 0x5000, 0x6000, 0x5000):
        device.stream = stream
        out, quant, att = device.call(q, k, v, precision="int8+fp8")
        check_call(device, q, k, v, quant, att, out)
        stats = quant[0].struct(abi.QuantizeParams).stats.job[0].counter
        assert counters.setdefault(stream, stats) == stats
    assert len(set(counters.values())) == 3  # one zeroed ticket set per stream


def test_shape_layout_and_lse_changes_reach_the_kernels(device):
    for shape, layout, lse in (((1, 2, 300, 128), "HND", False), ((1, 2, 300, 128), "HND", True),
                               ((2, 3, 1000, 64), "HND", False), ((1, 2, 300, 128), "NHD", True)):
        q, k, v = qkv(shape, layout, seed=6)
        result, quant, att = device.call(q, k, v, tensor_layout=layout, return_lse=lse, precision="int8+fp8")
        out, lse_t = result if lse else (result, None)
        assert out.shape == q.shape
        check_call(device, q, k, v, quant, att, out, lse_t, layout=layout)
        heads = shape[1]
        assert att.grid[1:] == (heads, shape[0])


def test_tma_descriptors_are_encoded_once_per_address(monkeypatch):
    with stub_device(monkeypatch, (9, 0), record=True) as dk:
        dev = Device(dk)
        dev.family = "wgmma"
        q, k, v = qkv(seed=7)
        out, quant, att = dev.call(q, k, v, precision="int8+fp16")
        encoded = list(dk.lib.encodes)
        assert len(encoded) == 3 and v.data_ptr() in encoded  # fp16 PV maps the caller's V
        keep = []
        for seed in (8, 9):
            v2 = qkv(seed=seed)[2]
            keep.append(v2)
            before = len(dk.lib.encodes)
            out, quant, att = dev.call(q, k, v2, precision="int8+fp16")
            check_call(dev, q, k, v2, quant, att, out, pv="fp16")
            new = dk.lib.encodes[before:]
            assert v2.data_ptr() in new and v.data_ptr() not in new  # only what moved is encoded
        before = len(dk.lib.encodes)
        out, quant, att = dev.call(q, k, v, precision="int8+fp16")  # back to the first V: remembered
        check_call(dev, q, k, v, quant, att, out, pv="fp16")
        assert v.data_ptr() not in dk.lib.encodes[before:]


def test_concurrent_threads_launch_their_own_pointers(monkeypatch):
    """8 threads call one signature at once; the recorder sleeps between reading a launch's
    parameter address and copying the parameter, so a buffer another thread could still write
    would show that thread's pointers."""
    with stub_device(monkeypatch, (9, 0), record=True, pause=0.0002) as dk:
        inputs = [qkv(seed=20 + i) for i in range(8)]
        sageattn2.sageattn(*inputs[0], precision="int8+fp8")  # the plan exists before the race
        outs = {}
        start = threading.Barrier(len(inputs))

        def worker(i):
            start.wait()
            outs[threading.get_ident()] = (inputs[i], [sageattn2.sageattn(*inputs[i], precision="int8+fp8")
                                                       for _ in range(5)])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(outs) == len(inputs)
        seen = 0
        for name, launch in Device(dk).launches():
            if launch.thread not in outs:
                continue  # the warm-up call
            (q, k, v), results = outs[launch.thread]
            if name.startswith("quant"):
                p = launch.struct(abi.QuantizeParams)
                assert (p.rows[0].x.ptr, p.rows[1].x.ptr, p.v.x.ptr) == (q.data_ptr(), k.data_ptr(), v.data_ptr())
            else:
                assert launch.struct(abi.WgmmaAttnParams).p.out in {o.data_ptr() for o in results}
            seen += 1
        assert seen == len(inputs) * 5 * 3


def test_threads_meeting_a_new_stream_share_one_live_counter_set(monkeypatch):
    """The ticket counters of a stream are made on its first call; threads arriving together
    (a slow allocation lets them meet there) must all launch with a set that stays alive."""
    zeros = torch.zeros

    def slow_zeros(*a, **kw):
        time.sleep(0.01)
        return zeros(*a, **kw)

    with stub_device(monkeypatch, (9, 0), stream=0x7700, record=True) as dk:
        inputs = [qkv(seed=40 + i) for i in range(4)]
        monkeypatch.setattr(torch, "zeros", slow_zeros)
        start = threading.Barrier(len(inputs))

        def worker(i):
            start.wait()
            sageattn2.sageattn(*inputs[i], precision="int8+fp8")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        used = {l.struct(abi.QuantizeParams).stats.job[0].counter for name, l in Device(dk).launches()
                if name.startswith("quant")}
        alive = {t.data_ptr() for t in list(mma._counter_sets.values()) + mma._retired_counters}
        assert len(used) >= 1 and used <= alive


@pytest.mark.parametrize("bad, error", [
    (dict(is_causal=1), TypeError), (dict(sm_scale=True), TypeError), (dict(return_lse="False"), TypeError),
    (dict(precision="int9+fp8"), ValueError), (dict(tensor_layout="BHND"), ValueError),
    (dict(smooth_q=0), TypeError), (dict(sm_scale=float("nan")), ValueError),
])
def test_bad_arguments_raise_after_a_good_call_of_the_same_shapes(device, bad, error):
    q, k, v = qkv(seed=10)
    good = dict(is_causal=True, sm_scale=1.0, return_lse=False, precision="int8+fp8", tensor_layout="HND",
                smooth_q=False)
    sageattn2.sageattn(q, k, v, **good)
    with pytest.raises(error):
        sageattn2.sageattn(q, k, v, **{**good, **bad})


def test_bad_tensors_raise_after_a_good_call(device):
    q, k, v = qkv(seed=11)
    sageattn2.sageattn(q, k, v, precision="int8+fp8")
    with pytest.raises(TypeError, match="share a dtype"):
        sageattn2.sageattn(q, k.half(), v, precision="int8+fp8")
    with pytest.raises(TypeError, match="torch.Tensor"):
        sageattn2.sageattn(q.float().numpy(), k, v, precision="int8+fp8")


def test_auto_decides_again_after_its_decisions_are_cleared(device, monkeypatch):
    q, k, v = qkv((1, 1, 1024, 64), seed=12)
    monkeypatch.setattr(autotune, "paired_medians", lambda quantized, exact: (quantized(), exact(), (1.0, 2.0))[2])
    before = len(device.dk.lib.launches)
    sageattn2.sageattn(q, k, v)  # timed: quantized wins
    assert len(device.dk.lib.launches) > before and autotune._decisions
    autotune._decisions.clear()
    monkeypatch.setattr(autotune, "paired_medians", lambda quantized, exact: (2.0, 1.0))
    before = len(device.dk.lib.launches)
    sageattn2.sageattn(q, k, v)  # timed again: exact wins, no kernel runs
    assert len(device.dk.lib.launches) == before and list(autotune._decisions.values()) == [False]


def test_launch_memo_is_bounded(monkeypatch):
    with stub_device(monkeypatch, (9, 0), record=True):
        q, k, v = qkv(seed=13)
        sageattn2.sageattn(q, k, v, precision="int8+fp8")
        call = next(iter(api._calls.values()))
        memo = call.runner.launches._memo
        keep = [qkv(seed=100 + i) for i in range(calls.MAX_MEMO + 5)]
        for t in keep:
            sageattn2.sageattn(*t, precision="int8+fp8")
        assert 1 <= len(memo) <= calls.MAX_MEMO
