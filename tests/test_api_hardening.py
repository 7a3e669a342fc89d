"""Unusual and hostile API input (issue 17): argument types, negative and non-finite scales,
empty problems, misaligned storage, launch limits, the exact lse's memory, the Hopper
backend's argument and V-stride handling. CPU only; kernel-side behaviour is checked
through stand-ins of the backend modules (the GPU fuzz, tests/gpu/fuzz_attention.py,
runs the real kernels)."""
import functools
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sageattn2
from sageattn2 import dispatch, exact
from sageattn2.config import AttnConfig, Family, PVDType, QKDType
from sageattn2.reference import exact_attention, reference_attention

from conftest import error_metrics, make_qkv

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from fuzz_attention import HostPeakMemory  # noqa: E402


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def exact64(q, k, v, causal=False, scale=None):
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


# ---------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("name, value", [("is_causal", "False"), ("is_causal", 0), ("return_lse", "yes"),
                                         ("smooth_k", None), ("smooth_q", "auto"), ("force_int4_emulation", 1)])
@pytest.mark.parametrize("backend", ["auto", "reference", "exact"])
def test_flags_must_be_real_bools(name, value, backend):
    q = rand(1, 2, 8, 32)
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        sageattn2.sageattn(q, q, q, backend=backend, **{name: value})


@pytest.mark.parametrize("scale, exc, match", [
    (float("nan"), ValueError, "finite"), (float("inf"), ValueError, "finite"), (-float("inf"), ValueError, "finite"),
    ("0.125", TypeError, "real number"), (True, TypeError, "real number"), (torch.tensor(0.1), TypeError, "real number"),
])
@pytest.mark.parametrize("backend", ["auto", "reference", "exact"])
def test_bad_sm_scale_is_a_clear_error(scale, exc, match, backend):
    q = rand(1, 2, 8, 32)
    with pytest.raises(exc, match=match):
        sageattn2.sageattn(q, q, q, sm_scale=scale, backend=backend)


# ---------------------------------------------------------------------------------------
# Negative sm_scale: served as (-Q, |sm_scale|) on every path


@pytest.mark.parametrize("precision", ["int8+fp16", "int8+fp8", "int4+fp8"])
def test_negative_scale_reference_matches_exact(precision):
    q, k, v = make_qkv(1, 4, 2, 150, 170, 64, dtype=torch.float16, seed=7)
    o, lse = sageattn2.sageattn(q, k, v, sm_scale=-0.125, precision=precision, backend="reference", return_lse=True)
    ref_o, ref_lse = exact64(q, k, v, scale=-0.125)
    # As accurate as the positive scale on the same data (INT4 on outlier data is coarse).
    pos_o, pos_lse = sageattn2.sageattn(-q, k, v, sm_scale=0.125, precision=precision, backend="reference",
                                        return_lse=True)
    m, m_pos = error_metrics(o, ref_o), error_metrics(pos_o, ref_o)
    assert m["rel_l1"] <= 1.05 * m_pos["rel_l1"] + 1e-3
    if precision.startswith("int8"):
        assert m["cos"] > 0.995
        torch.testing.assert_close(lse.double(), ref_lse, atol=0.15, rtol=0)
    # The reference folds the sign exactly: the same numbers as -Q with the positive scale.
    cfg = AttnConfig(*precision.split("+"))
    neg = reference_attention(q, k, v, cfg, sm_scale=-0.125, return_lse=True)
    folded = reference_attention(-q, k, v, cfg, sm_scale=0.125, return_lse=True)
    torch.testing.assert_close(neg[0], folded[0], atol=0, rtol=0)
    torch.testing.assert_close(neg[1], folded[1], atol=0, rtol=0)


def _fake_kernel_backend(monkeypatch, seen):
    """Routes the API's quantized path to a stand-in 'mma' kernel backend (the reference,
    asserting the kernels' contract sm_scale >= 0 and recording what it got)."""
    def attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse, **kw):
        seen.append(sm_scale)
        assert sm_scale >= 0, "kernels need a non-negative sm_scale"
        return reference_attention(q, k, v, cfg, tensor_layout=layout, is_causal=is_causal,
                                   sm_scale=sm_scale, return_lse=return_lse)

    cfg = AttnConfig("int8", "fp8")
    monkeypatch.setattr(dispatch, "plan", lambda *a, **kw: dispatch.Plan("mma", cfg))
    from sageattn2 import ops

    monkeypatch.setattr(ops, "backend_module", lambda name: types.SimpleNamespace(
        attention=attention, attention_plan=lambda q, k, v, **kw: functools.partial(attention, **kw)))


@pytest.mark.parametrize("causal", [False, True])
def test_negative_scale_reaches_kernels_folded_into_q(monkeypatch, causal):
    q, k, v = make_qkv(1, 2, 2, 96, 96, 64, dtype=torch.bfloat16, seed=3)
    seen = []
    _fake_kernel_backend(monkeypatch, seen)
    o, lse = sageattn2.sageattn(q, k, v, is_causal=causal, sm_scale=-0.1, precision="int8+fp8", return_lse=True)
    assert seen == [0.1]
    ref_o, ref_lse = exact64(q, k, v, causal, scale=-0.1)
    assert error_metrics(o, ref_o)["cos"] > 0.995
    torch.testing.assert_close(lse.double(), ref_lse, atol=0.05, rtol=0)


def test_negative_scale_exact_path():
    q, k, v = rand(1, 4, 20, 32, seed=1), rand(1, 2, 30, 32, seed=2), rand(1, 2, 30, 32, seed=3)
    o, lse = sageattn2.sageattn(q, k, v, sm_scale=-0.7, precision="exact", return_lse=True, is_causal=True)
    ref_o, ref_lse = exact64(q, k, v, True, scale=-0.7)
    torch.testing.assert_close(o.double(), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_zero_scale_is_a_plain_average():
    q, k, v = rand(1, 2, 9, 32, seed=1), rand(1, 2, 11, 32, seed=2), rand(1, 2, 11, 32, seed=3)
    for backend in ("exact", "reference"):
        o = sageattn2.sageattn(q, k, v, sm_scale=0.0, backend=backend)
        torch.testing.assert_close(o, v.mean(dim=2, keepdim=True).expand_as(o), atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------
# Empty problems: the same answer from every backend and the reference


EMPTY_SHAPES = [((0, 4, 16, 32), (0, 2, 16, 32)), ((2, 0, 16, 32), (2, 1, 16, 32)), ((2, 0, 16, 32), (2, 0, 16, 32)),
                ((2, 4, 0, 32), (2, 2, 16, 32)), ((2, 4, 0, 32), (2, 2, 0, 32))]


@pytest.mark.parametrize("q_shape, kv_shape", EMPTY_SHAPES)
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_empty_query_side_gives_empty_results_everywhere(q_shape, kv_shape, layout):
    perm = (lambda s: s) if layout == "HND" else (lambda s: (s[0], s[2], s[1], s[3]))
    q, k = torch.randn(perm(q_shape)), torch.randn(perm(kv_shape))
    lse_shape = (q_shape[0], q_shape[1], q_shape[2])
    runs = [lambda **kw: sageattn2.sageattn(q, k, k, tensor_layout=layout, return_lse=True, **kw)]
    runs += [lambda b=b: sageattn2.sageattn(q, k, k, tensor_layout=layout, return_lse=True, backend=b)
             for b in ("exact", "reference", "cuda")]
    runs += [lambda p=p: sageattn2.sageattn(q, k, k, tensor_layout=layout, return_lse=True, backend="reference",
                                            precision=p) for p in ("int4+fp16", "int8+fp8")]
    runs.append(lambda: reference_attention(q, k, k, AttnConfig(), tensor_layout=layout, return_lse=True))
    runs.append(lambda: exact_attention(q, k, k, tensor_layout=layout, return_lse=True))
    for run in runs:
        o, lse = run()
        assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == lse_shape and lse.dtype == torch.float32


@pytest.mark.parametrize("q_shape, kv_shape, match", [
    ((1, 4, 16, 32), (1, 0, 16, 32), "key/value heads"),
    ((1, 4, 16, 32), (1, 2, 0, 32), "at least one token"),
])
def test_empty_keys_for_real_queries_are_errors_everywhere(q_shape, kv_shape, match):
    q, k = torch.randn(q_shape), torch.randn(kv_shape)
    for run in (lambda: sageattn2.sageattn(q, k, k), lambda: sageattn2.sageattn(q, k, k, backend="reference"),
                lambda: reference_attention(q, k, k, AttnConfig()), lambda: exact_attention(q, k, k)):
        with pytest.raises(ValueError, match=match):
            run()


def test_backends_decline_empty_problems():
    from sageattn2.backends import input_reason

    class T:
        def __init__(self, *shape):
            self.shape, self.dtype, self.is_cuda = torch.Size(shape), torch.float16, True

        def dim(self):
            return 4

        def stride(self, i):
            return 1

    for q, k in (((0, 4, 8, 64), (0, 2, 8, 64)), ((1, 0, 8, 64), (1, 2, 8, 64)), ((1, 0, 8, 64), (1, 0, 8, 64))):
        assert "empty" in input_reason(T(*q), T(*k), T(*k), "HND", 128)


# ---------------------------------------------------------------------------------------
# SDPA only ever sees 16-byte aligned storage


def misaligned(t):
    """The same values in storage that starts one element past 16-byte alignment."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    off = next(i for i in range(16) if (buf.data_ptr() + i * t.element_size()) % 16 == t.element_size())
    out = buf[off:off + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.fixture
def aligned_sdpa_only(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def checked(*args, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        assert all(t.data_ptr() % 16 == 0 for t in tensors), "misaligned tensor reached SDPA"
        assert all(t.shape[0] <= exact.MAX_GRID for t in tensors if t.dim() == 4)
        assert all(t.shape[1] <= exact.MAX_GRID for t in tensors if t.dim() == 4)
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", checked)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_misaligned_inputs_are_copied_before_sdpa(aligned_sdpa_only, dtype):
    q, k, v = (rand(1, 4, 24, 40, seed=s).to(dtype) for s in (1, 2, 3))
    mq, mk, mv = (misaligned(t) for t in (q, k, v))
    before = [t.clone() for t in (mq, mk, mv)]
    ref_o, ref_lse = exact64(q, k, v, True)
    tol = dict(atol=2e-3, rtol=0) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    for kwargs in ({"precision": "exact"}, {}, {"backend": "exact"}):
        o, lse = sageattn2.sageattn(mq, mk, mv, is_causal=True, return_lse=True, **kwargs)
        torch.testing.assert_close(o.double(), ref_o, **tol)
        torch.testing.assert_close(lse.double(), ref_lse, **tol)
    mask = misaligned(rand(1, 1, 24, 24, seed=4).to(dtype))
    o = sageattn2.scaled_dot_product_attention(mq, mk, mv, attn_mask=mask)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, attn_mask=mask.clone()), **tol)
    assert len(aligned_sdpa_only) >= 4
    for t, b in zip((mq, mk, mv), before):  # inputs untouched
        assert torch.equal(t, b)


# ---------------------------------------------------------------------------------------
# Launch limits: batch and heads above the CUDA grid are split


@pytest.mark.parametrize("q_shape, kv_shape", [((65537, 1, 1, 8), (65537, 1, 3, 8)), ((1, 65536, 2, 8), (1, 1, 3, 8)),
                                               ((1, 65540, 1, 8), (1, 65540, 2, 8))])
def test_batch_and_heads_above_the_grid_limit_are_split(aligned_sdpa_only, q_shape, kv_shape):
    q, k, v = rand(*q_shape, seed=1), rand(*kv_shape, seed=2), rand(*kv_shape, seed=3)
    o, lse = sageattn2.sageattn(q, k, v, return_lse=True)
    ref_o, ref_lse = exact64(q, k, v)
    torch.testing.assert_close(o.double(), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert len(aligned_sdpa_only) >= 2


def test_split_keeps_masks_and_groups_apart(monkeypatch):
    monkeypatch.setattr(exact, "MAX_GRID", 2)
    q = rand(3, 6, 9, 16, seed=1)
    for kv_heads in (1, 2, 3, 6):
        k, v = rand(3, kv_heads, 11, 16, seed=2), rand(3, kv_heads, 11, 16, seed=3)
        for mask in (None, rand(3, 6, 9, 11, seed=4), rand(1, 6, 1, 11, seed=5), rand(9, 11, seed=6)):
            for causal in ((False, True) if mask is None else (False,)):
                got = exact.sdpa(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
                want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_fp8_v_offsets_past_31_bits_decline_mma(monkeypatch):
    """Nk = 8.4M keys at head dim 256: the FP8 V^T tile offsets do not fit the kernel's 32-bit
    arithmetic; the mma family declines (the dispatcher then runs exact attention)."""
    from sageattn2.backends import mma

    from sageattn2 import archs

    kernels = types.SimpleNamespace(families=("mma",), tag="sm_89", arch=archs.arch(8, 9),
                                    available=lambda kernel: None)
    monkeypatch.setattr(mma, "_shape_reason", lambda *a: None)
    monkeypatch.setattr(mma, "kernels_for_device", lambda dev: (kernels, None))
    meta = lambda *s: torch.empty(s, dtype=torch.float16, device="meta")
    cfg = AttnConfig("int8", "fp8")
    long_k = meta(1, 1, 8_400_000, 256)
    why = mma.unsupported_reason(meta(1, 1, 64, 256), long_k, long_k, layout="HND", cfg=cfg, is_causal=False)
    assert "32-bit tile offsets" in why
    ok_k = meta(1, 1, 8_000_000, 128)
    assert mma.unsupported_reason(meta(1, 1, 64, 128), ok_k, ok_k, layout="HND", cfg=cfg, is_causal=False) is None
    assert mma.unsupported_reason(meta(1, 1, 64, 256), long_k, long_k, layout="HND",
                                  cfg=cfg.with_(pv_dtype=PVDType.FP16), is_causal=False) is None


# ---------------------------------------------------------------------------------------
# The exact lse: no repeated K, chunks bounded by the input size


@pytest.mark.parametrize("causal", [False, True])
def test_exact_lse_memory_follows_the_inputs(causal):
    q, k, v = rand(1, 16, 1024, 32, seed=1), rand(1, 2, 2048, 32, seed=2), rand(1, 2, 2048, 32, seed=3)
    with HostPeakMemory() as mem:
        lse = exact.exact_lse(q, k, causal, 1 / math.sqrt(32))
    assert mem.peak <= 4 * exact.default_lse_capacity(q, k) + lse.nbytes
    ref_o, ref_lse = exact64(q[:, ::5], k, v, causal)  # query heads 0, 5, 10, 15 read kv heads 0, 0, 1, 1
    torch.testing.assert_close(lse[:, ::5].double(), ref_lse, atol=1e-4, rtol=1e-5)


def test_exact_lse_of_few_rows_over_many_keys_stays_small():
    """Fuzz case #500 (2 query rows x 66K keys, GQA 3): K was cast to fp32 whole and the
    matmul's broadcast over the query group copied it three times more (397 MiB extra for
    48 MiB of q + k). Now only key chunks are cast and no operand is broadcast-copied."""
    q = rand(2, 9, 2, 64, dtype=torch.bfloat16, seed=1)
    k = rand(2, 3, 66192, 64, dtype=torch.bfloat16, seed=2)
    with HostPeakMemory() as mem:
        lse = exact.exact_lse(q, k, False, 0.125)
    inputs = q.nbytes + k.nbytes
    assert mem.peak <= 4 * exact.default_lse_capacity(q, k) + lse.nbytes <= inputs // 2 + (5 << 20)
    s = q.double().unflatten(1, (3, 3)) @ k.double()[:, :, None].transpose(-1, -2) * 0.125
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1).flatten(1, 2), atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 4, 1, 33, 40), (2, 3, 3, 17, 1000), (1, 2, 64, 5, 5000), (3, 1, 2, 300, 7)])
@pytest.mark.parametrize("capacity", [1, 2000, 10 ** 6])
def test_lse_tiles_respect_the_capacity(shape, capacity):
    batch, heads_kv, group, n_q, n_k = shape
    for d in (16, 256):
        sizes, keys = exact.lse_tiles(batch, heads_kv, group, n_q, n_k, d, capacity)
        assert 1 <= keys <= n_k and all(1 <= s <= n for s, n in zip(sizes, (batch, heads_kv, group, n_q)))
        floor = exact.lse_tile_elements([1, 1, 1, 1], 1, d)  # one row against one key
        assert exact.lse_tile_elements(sizes, keys, d) <= max(capacity, floor)


@pytest.mark.parametrize("max_chunk", [1, 300, 700, None])
def test_exact_lse_chunking_is_exact(max_chunk):
    q, k = rand(3, 6, 37, 16, seed=1), rand(3, 2, 29, 16, seed=2)
    if max_chunk == 1:  # one row against one key per tile
        q, k = q[:2, :4, :9], k[:2, :, :11]
    for causal in (False, True):
        _, ref = exact64(q, k, k, causal, scale=0.3)
        torch.testing.assert_close(exact.exact_lse(q, k, causal, 0.3, max_chunk).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_lse_over_key_chunks_matches_float64(dtype, causal):
    """Key chunks merged by logaddexp, on data with a sink key and large scores, in 16-bit
    inputs: the lse is that of the inputs' exact values (fp32 products), whatever the tiling."""
    q, k = rand(2, 4, 300, 48, dtype=dtype, seed=4), rand(2, 2, 3000, 48, dtype=dtype, seed=5)
    k[:, :, 7] = (4 * q[:, 0, :1].float().sign()).to(dtype)  # a key every query attends to strongly
    _, ref = exact64(q.float(), k.float(), k.float(), causal, scale=0.2)
    for capacity in (20000, 200000, None):
        sizes, keys = exact.lse_tiles(2, 2, 2, 300, 3000, 48, capacity or exact.default_lse_capacity(q, k))
        lse = exact.exact_lse(q, k, causal, 0.2, capacity)
        assert (lse.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    assert keys < 3000 or capacity is None  # the small capacities do cut the keys


# ---------------------------------------------------------------------------------------
# Hopper backend: force_int4_emulation and V strides TMA cannot map


class FakeLib:
    tag, families, fp8_mma = "sm_90a", ("wgmma", "mma"), True


def test_force_int4_emulation_never_reaches_the_wgmma_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "backend_module",
                        lambda name: types.SimpleNamespace(unsupported_reason=lambda *a, cfg, **kw:
                                                           "no int4" if name == "wgmma" and cfg.qk_dtype is QKDType.INT4 else None))
    q = rand(1, 2, 8, 64)
    opts = dict(layout="HND", granularity="per_thread", smooth_k=True, smooth_q=None, smooth_v=False,
                is_causal=False, force_int4_emulation=True)
    p = dispatch.plan_for_library(q, q, q, FakeLib(), (9, 0), precision="int8+fp8", **opts)
    assert p.backend == "wgmma" and not p.force_int4_emulation
    p = dispatch.plan_for_library(q, q, q, FakeLib(), (9, 0), precision="int4+fp8", **opts)
    assert p.backend == "mma" and p.force_int4_emulation and p.cfg.qk_dtype is QKDType.INT4


def test_ops_passes_the_int4_flag_only_to_mma(monkeypatch):
    from sageattn2 import ops

    got = {}

    def wgmma_attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse):  # no such flag
        got["wgmma"] = True
        return q, None

    def mma_attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation=False):
        got["mma"] = force_int4_emulation
        return q, None

    mods = {name: types.SimpleNamespace(attention_plan=lambda q, k, v, _f=f, **kw: functools.partial(_f, **kw))
            for name, f in (("wgmma", wgmma_attention), ("mma", mma_attention))}
    monkeypatch.setattr(ops, "backend_module", lambda name: mods[name])
    q = rand(1, 1, 4, 64)
    for backend in ("wgmma", "mma"):
        ops._execute(q, q, q, "HND", backend, AttnConfig(family=Family(backend)), False, 0.1, False, True)
    assert got == {"wgmma": True, "mma": True}


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_wgmma_copies_v_that_tma_cannot_map(layout):
    from sageattn2.backends.wgmma import _tma_readable_v

    fp16 = AttnConfig("int8", "fp16", family="wgmma")
    base = rand(2, 1, 40, 64, dtype=torch.float16)
    expanded = base.expand(2, 4, 40, 64) if layout == "HND" else base.transpose(1, 2).expand(2, 40, 4, 64)
    fixed = _tma_readable_v(expanded, layout, fp16)
    assert torch.equal(fixed, expanded)
    strides = fixed.stride() if layout == "HND" else fixed.transpose(1, 2).stride()
    assert all(s > 0 and s * 2 % 16 == 0 for s in strides[:3])
    fine = rand(2, 4, 40, 64, dtype=torch.float16)
    fine = fine if layout == "HND" else fine.transpose(1, 2)
    assert _tma_readable_v(fine, layout, fp16) is fine
    assert _tma_readable_v(expanded, layout, fp16.with_(pv_dtype=PVDType.FP8)) is expanded  # quantizer reads it
    odd = rand(2, 4, 40, 36, dtype=torch.float16).expand(2, 4, 40, 36)
    assert _tma_readable_v(odd, "HND", fp16) is odd  # rows not 16-byte: the quantizer's padded copy


def test_exact_sdpa_gets_a_contiguous_last_dim(monkeypatch):
    """A strided last dim sends torch's SDPA to its math backend, which materialises the whole
    score matrix (the fuzz saw 7 GB extra at 20K tokens): the exact path copies such inputs."""
    seen = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append(tuple(t.stride(-1) for t in (q, k, v)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(exact.F, "scaled_dot_product_attention", recording)
    base = rand(1, 2, 33, 32, 2, seed=7)
    q, k, v = base[..., 0], base[..., 1], base[..., 0].flip(-2)
    got = exact.sdpa(q, k, v)
    assert seen and all(s == (1, 1, 1) for s in seen)
    torch.testing.assert_close(got, real(q, k, v), atol=1e-6, rtol=1e-6)
