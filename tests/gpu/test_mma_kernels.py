"""GPU tests of the mma.sync family: the fused quantizers (csrc/include/sa2/quant_kernels.cuh) and the attention
kernel (csrc/include/sa2/attn_mma.cuh) against sageattn2.reference, which computes docs/numerics.md with
the same groups in fp32.

Skipped without CUDA or without a kernel library that has the mma family (build it with
install.py, or run tests/gpu/run_gpu.sh on a GPU machine). On Hopper the INT4 and FP8
instructions are emulated by the compiler: correctness only, and FP8 accumulation there is
exact fp32, so the reference runs without accumulator truncation.

Tolerances (kernel vs reference, same quantization groups):
- quantized values: the kernels sum means in another order than torch, so a value at a
  rounding boundary can land one step away: at most 1 in 10^3 values may differ, by 1 (INT)
  or one E4M3 step; scales to 2e-6 relative.
- outputs: the kernel's exp2 is ex2.approx (2 ulp) and its fp32 sums run in another order;
  both move P by ~1e-7 relative, far below a bf16/fp16 output step, so the outputs differ
  by rare one-step roundings of the final cast: rel L1 <= 2e-3 and cos >= 0.99995. A wrong
  group, layout, mask or scale shows up as >= 1e-2.
- lse: <= 2e-3 absolute (fp32 sums over up to 4k keys).
Every case also checks the kernel is no further from exact attention than the reference
(+5%), and that no output element is left unwritten (the allocator is filled with NaN
before each launch).
"""
from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from sageattn2 import loader  # noqa: E402
from sageattn2.backends import mma  # noqa: E402
from sageattn2.config import AttnConfig, Granularity, PVDType, QKDType, padded_head_dim  # noqa: E402
from sageattn2 import reference as R  # noqa: E402
from sageattn2.reference import (  # noqa: E402
    exact_attention,
    quantize_k,
    quantize_q,
    quantize_v,
    reference_attention,
    unpack_int4,
)

from conftest import error_metrics, make_qkv  # noqa: E402

LIB, _WHY = loader.kernels_for_device(torch.device("cuda", 0))
if LIB is None or "mma" not in LIB.families:
    pytest.skip(f"mma kernels not built: {_WHY or 'family missing'}", allow_module_level=True)

DEV = torch.device("cuda", 0)
CAP = torch.cuda.get_device_capability(DEV)
HAS_FP8 = LIB.arch.fp8_mma
LOG = os.environ.get("SA2_TEST_LOG")

PRECISIONS = ("int8+fp16", "int8+fp8", "int4+fp16", "int4+fp8")
SMOOTHINGS = {"k": (True, False, False), "none": (False, False, False), "kq": (True, True, False),
              "kqv": (True, True, True)}


def log(record: dict) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def make_cfg(precision: str, gran="per_thread", smoothing="k", pv_accum="fp32") -> AttnConfig:
    qk, pv = precision.split("+")
    sk, sq, sv = SMOOTHINGS[smoothing]
    return AttnConfig(qk_dtype=qk, pv_dtype=pv, granularity=gran, smooth_k=sk, smooth_q=sq, smooth_v=sv,
                      pv_accum=pv_accum)


def need(cfg: AttnConfig) -> None:
    if cfg.pv_dtype is PVDType.FP8 and not HAS_FP8:
        pytest.skip("library has no FP8 PV (sm80/86)")


def poison_allocator() -> None:
    """Fill the caching allocator's free blocks (small and large pools) with 0xFF bytes: NaN
    in fp16/bf16/fp32, -1 in int8. Buffers the kernels should write but do not then fail
    the comparisons instead of holding stale or zero data."""
    blocks = [torch.empty(1 << 19, dtype=torch.uint8, device=DEV) for _ in range(64)]
    blocks.append(torch.empty(1 << 28, dtype=torch.uint8, device=DEV))
    for b in blocks:
        b.fill_(0xFF)
    del blocks


def run_kernel(q, k, v, cfg, *, layout="HND", causal=False, lse=False, sm_scale=None):
    """mma.attention's two halves (quantize, launch), returning the quantized operands too."""
    poison_allocator()
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qz = mma.quantize(q, k, v, layout=layout, cfg=cfg, with_q_dot_kbar=lse and cfg.smooth_k, dk=LIB)
    o, l = mma.launch(LIB, qz, q, k, layout=layout, cfg=cfg, is_causal=causal, sm_scale=sm_scale, return_lse=lse)
    torch.cuda.synchronize()  # surfaces any asynchronous CUDA error here
    return o, l, qz


def reference_on_operands(qz, q, k, v, cfg, **kwargs):
    """reference_attention fed with the kernel's own quantized operands: isolates the
    attention kernel from the (rare, legitimate) one-step rounding differences of the
    quantizers, which summing means in another order can cause."""
    d, D = q.shape[-1], qz.padded_head_dim
    unpack = unpack_int4 if cfg.qk_dtype is QKDType.INT4 else (lambda x: x)
    B, Hkv = qz.k.shape[:2]
    zeros = torch.zeros((B, Hkv, D), dtype=torch.float32, device=DEV)
    qq = R.QuantQ(unpack(qz.q), qz.q_scale, None, qz.qbar, qz.qbar_scale)
    kq = R.QuantK(unpack(qz.k), qz.k_scale, qz.kbar if qz.kbar is not None else zeros)
    nk_pad = qz.k.shape[2]
    if cfg.pv_dtype is PVDType.FP8:
        values, scale = _v_by_token(qz.v)[:, :, :nk_pad], qz.v_scale
    else:
        values = torch.zeros((B, Hkv, nk_pad, D), dtype=torch.float32, device=DEV)
        values[:, :, : qz.v.shape[2], : qz.v.shape[3]] = qz.v.float()
        scale = torch.ones_like(zeros)
    vq = R.QuantV(values, scale, qz.vbar if qz.vbar is not None else zeros)
    saved = R.quantize_q, R.quantize_k, R.quantize_v
    R.quantize_q, R.quantize_k, R.quantize_v = (lambda *a, **kw: qq), (lambda *a, **kw: kq), (lambda *a, **kw: vq)
    try:
        return reference_attention(q, k, v, cfg, **kwargs)
    finally:
        R.quantize_q, R.quantize_k, R.quantize_v = saved


def check(q, k, v, cfg, *, layout="HND", causal=False, lse=True, case="", exact_dtype=torch.float64,
          same_rel_l1=1e-3):
    need(cfg)
    o, l, qz = run_kernel(q, k, v, cfg, layout=layout, causal=causal, lse=lse)
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous()
    assert torch.isfinite(o).all(), "output has NaN/inf: unwritten or broken elements"
    kernel = LIB.get(mma.attention_kernel_for(cfg, q.dtype, q.shape[-1]))
    kw = dict(tensor_layout=layout, is_causal=causal, return_lse=lse)
    row_sums = dict(rounded_p_row_sums=bool(kernel.info["row_sums_by_mma"]))
    same_o, same_l = reference_on_operands(qz, q, k, v, cfg, **kw, **row_sums)
    ref_o, ref_l = reference_attention(q, k, v, cfg, **kw, **row_sums)
    ex_o, ex_l = exact_attention(q, k, v, compute_dtype=exact_dtype, **kw)
    m = error_metrics(o, same_o)
    m_ref, m_exact, m_ref_exact = error_metrics(o, ref_o), error_metrics(o, ex_o), error_metrics(ref_o, ex_o)
    record = {"kind": "vs_reference", "case": case or cfg.uri, **m, "vs_ref_rel_l1": m_ref["rel_l1"],
              "vs_exact_rel_l1": m_exact["rel_l1"], "ref_vs_exact_rel_l1": m_ref_exact["rel_l1"]}
    if lse:
        assert l.shape == ref_l.shape and torch.isfinite(l).all()
        record["lse_err"] = float((l - same_l).abs().max())
        record["lse_err_ref"] = float((l - ref_l).abs().max())
        record["lse_err_exact"] = float((l - ex_l).abs().max())
    log(record)
    # Same operands: only fp32 summation order, ex2.approx and the final cast differ (and,
    # with an fp16 P.V accumulator, where the hardware rounds it: see test_fp16_accumulation).
    assert m["cos"] >= 0.99999 and m["rel_l1"] <= same_rel_l1, record
    if lse:
        assert record["lse_err"] <= 1e-3 + 1e-5 * float(same_l.abs().max()), record
    # Own quantizers against the reference's: one-step roundings are rare; an INT4 step is
    # 18x an INT8 one, hence the looser INT4 bound.
    loose = 2e-2 if cfg.qk_dtype is QKDType.INT4 else 2e-3
    assert m_ref["rel_l1"] <= loose, record
    assert m_exact["rel_l1"] <= 1.05 * m_ref_exact["rel_l1"] + loose / 4, record


# ---------------------------------------------------------------------------------------
# Quantizers


def _values_close(mine: torch.Tensor, ref: torch.Tensor, max_step: float, what: str,
                  max_fraction: float = 1e-3) -> None:
    assert mine.shape == ref.shape, (what, mine.shape, ref.shape)
    diff = (mine.double() - ref.double()).abs()
    bad = diff > 0
    log({"kind": "quant_mismatch", "what": what, "count": int(bad.sum()), "of": bad.numel()})
    assert diff.max() <= max_step, (what, float(diff.max()))
    assert bad.sum() <= max(2, max_fraction * bad.numel()), (what, int(bad.sum()), bad.numel())


def _v_by_token(v_t: torch.Tensor) -> torch.Tensor:
    """FP8 V^T (B, H, D, v_pad) in stored token order -> float32 (B, H, v_pad, D) by token."""
    pad = v_t.shape[-1]
    order = torch.tensor([16 * (p // 16) + mma_order(p % 16) for p in range(pad)], device=v_t.device)
    values = v_t.view(torch.float8_e4m3fn).float()
    by_token = torch.empty_like(values)
    by_token[..., order] = values
    return by_token.transpose(-1, -2)


def mma_order(p: int) -> int:
    return (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)[p]


QUANT_SMOOTHINGS = {**SMOOTHINGS, "kv": (True, False, True)}
QUANT_CASES = [
    # (d, nq, nk, precision, granularity, smoothing, dtype, layout, family)
    (128, 300, 200, "int8+fp8", "per_thread", "k", torch.bfloat16, "HND", "mma"),
    (128, 1, 65, "int4+fp8", "per_thread", "kq", torch.float16, "NHD", "mma"),
    (64, 129, 63, "int8+fp16", "per_warp", "kqv", torch.bfloat16, "NHD", "mma"),
    (80, 65, 130, "int4+fp16", "per_block", "kqv", torch.float16, "HND", "mma"),
    (256, 70, 64, "int8+fp8", "per_thread", "kqv", torch.bfloat16, "HND", "mma"),
    (40, 33, 77, "int4+fp8", "per_warp", "none", torch.float16, "NHD", "mma"),
    (160, 257, 1, "int8+fp8", "per_block", "kq", torch.bfloat16, "NHD", "mma"),
    # Several statistics chunks per head (256 tokens each, the last CTA finalizes), V smoothing
    # without Q smoothing, INT4 at the native 256.
    (64, 1000, 3000, "int8+fp8", "per_thread", "kv", torch.float16, "NHD", "mma"),
    (256, 513, 700, "int4+fp16", "per_thread", "kv", torch.bfloat16, "HND", "mma"),
    # d % 8 != 0: rows are read without 16-byte copies and padded inside a vector.
    (36, 100, 90, "int4+fp8", "per_thread", "kq", torch.float16, "NHD", "mma"),
    # The Hopper family reuses these quantizers with its own groups (warp_q 16, k_tile 128)
    # and FP8 V^T padded to 128 tokens.
    (128, 300, 200, "int8+fp8", "per_thread", "k", torch.bfloat16, "NHD", "wgmma"),
    (64, 129, 1000, "int8+fp16", "per_thread", "kq", torch.float16, "HND", "wgmma"),
    (96, 70, 130, "int8+fp8", "per_thread", "kqv", torch.float16, "HND", "wgmma"),
    (128, 4173, 4173, "int8+fp8", "per_thread", "k", torch.bfloat16, "HND", "wgmma"),
    (128, 777, 777, "int8+fp16", "per_warp", "none", torch.bfloat16, "NHD", "wgmma"),
    (100, 150, 333, "int8+fp8", "per_thread", "kq", torch.bfloat16, "HND", "wgmma"),
]
QUANT_FIELDS = ("q", "q_scale", "k", "k_scale", "kbar", "qbar", "qbar_scale", "q_dot_kbar", "v", "v_scale", "vbar")


@pytest.mark.parametrize("noncontig", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("d,nq,nk,precision,gran,smoothing,dtype,layout,family", QUANT_CASES)
def test_quantizers_match_reference(d, nq, nk, precision, gran, smoothing, dtype, layout, family, noncontig):
    """The fused quantizers (every output) against the PyTorch reference quantizers, and a second
    call bit for bit against the first (the statistics' ticket counters must come back to 0)."""
    sk, sq, sv = QUANT_SMOOTHINGS[smoothing]
    qk, pv = precision.split("+")
    cfg = AttnConfig(qk_dtype=qk, pv_dtype=pv, granularity=gran, smooth_k=sk, smooth_q=sq, smooth_v=sv,
                     family=family)
    if family == "mma":
        need(cfg)
    q, k, v = make_qkv(2, 4, 2, nq, nk, d, dtype=dtype, device=DEV, layout=layout, v_bias=1.0)
    if noncontig:  # rows 8 channels longer than d: last dim contiguous, other strides not
        q, k, v = (torch.cat([x, torch.randn_like(x[..., :8])], dim=-1)[..., :d] for x in (q, k, v))
    runs = []
    for _ in range(2):
        poison_allocator()
        runs.append(mma.quantize(q, k, v, layout=layout, cfg=cfg, with_q_dot_kbar=cfg.smooth_k, dk=LIB))
        torch.cuda.synchronize()
    qz = runs[0]
    for field in QUANT_FIELDS:
        a, b = getattr(runs[0], field), getattr(runs[1], field)
        assert (a is None) == (b is None), field
        if a is not None:
            bits = lambda t: t.contiguous().view(torch.uint8)
            assert a.shape == b.shape and torch.equal(bits(a), bits(b)), f"{field}: second call differs"
    assert (qz.qbar is None) == (not cfg.smooth_q) and (qz.kbar is None) == (not cfg.smooth_k)

    rq, rk = quantize_q(q, cfg, tensor_layout=layout), quantize_k(k, cfg, tensor_layout=layout)
    rv = quantize_v(v, cfg, tensor_layout=layout)
    unpack = unpack_int4 if cfg.qk_dtype is QKDType.INT4 else (lambda x: x)
    _values_close(unpack(qz.q), rq.values, 1, "q values")
    _values_close(unpack(qz.k), rk.values, 1, "k values")
    torch.testing.assert_close(qz.q_scale, rq.scale, rtol=2e-6, atol=0)
    torch.testing.assert_close(qz.k_scale, rk.scale, rtol=2e-6, atol=0)
    if cfg.smooth_k:
        torch.testing.assert_close(qz.kbar, rk.kbar, rtol=1e-5, atol=1e-5)
        q_h = q if layout == "HND" else q.transpose(1, 2)
        kv_head = torch.arange(q_h.shape[1], device=DEV) // (q_h.shape[1] // rk.kbar.shape[1])
        dot = (q_h.float() @ rk.kbar[:, kv_head, :d, None]).squeeze(-1)
        torch.testing.assert_close(qz.q_dot_kbar[:, :, :nq], dot, rtol=1e-4, atol=1e-3)
        assert (qz.q_dot_kbar[:, :, nq:] == 0).all(), "q . kbar of padding rows must be 0"
    if cfg.smooth_q:
        assert (qz.qbar[..., d:] == 0).all(), "q-bar padding channels must be 0"
        _values_close(qz.qbar, rq.qbar_values, 1, "qbar values")
        torch.testing.assert_close(qz.qbar_scale, rq.qbar_scale, rtol=2e-6, atol=0)
    if cfg.pv_dtype is PVDType.FP8:
        mine = _v_by_token(qz.v)[:, :, : rv.values.shape[2]]
        # One E4M3 step at the top binade is 32; a flip anywhere is at most that.
        _values_close(mine, rv.values, 32, "v fp8 values")
        assert (_v_by_token(qz.v)[:, :, rv.values.shape[2]:] == 0).all()
        torch.testing.assert_close(qz.v_scale, rv.scale, rtol=2e-6, atol=0)
    elif cfg.smooth_v:
        # V - vbar is rounded to bf16/fp16 afresh: a last-bit difference in vbar flips that
        # rounding for values near a boundary, more often for small |V - vbar| (seen: 0.16%
        # of values in bf16 at 63 tokens), always by one step.
        mine = qz.v.float()
        _values_close(mine, rv.values[:, :, :nk], 2 ** -6 * rv.values.abs().max(), "smoothed v", max_fraction=1e-2)
    if cfg.smooth_v:
        _vbar_close(qz.vbar, rv.vbar, v, cfg, layout)


def _vbar_close(mine: torch.Tensor, ref: torch.Tensor, v: torch.Tensor, cfg: AttnConfig, layout: str) -> None:
    """vbar is the channel mean rounded to V's grid (numerics.md §1.5). The quantizer sums in
    another order than the reference, so a mean within float32 summation error of a half-way
    point may round one grid step the other way; nothing else may differ."""
    x, _, n, _, _ = R._keys_fp32(v, cfg, layout, smooth=False)
    mean, amax = R._channel_mean(x, n), x.abs().amax(dim=2)
    slack = 1e-5 * mean.abs() + 1e-6  # far above float32 summation error over these lengths
    lo = R.mean_on_input_grid(mean - slack, amax, v.dtype)
    hi = R.mean_on_input_grid(mean + slack, amax, v.dtype)
    close = lambda a, b: (a - b).abs() <= 1e-6 * b.abs() + 1e-7
    ok = close(mine, ref) | close(mine, lo) | close(mine, hi)
    flips = int((~close(mine, ref)).sum())
    log({"kind": "quant_mismatch", "what": "vbar", "count": flips, "of": mine.numel()})
    assert ok.all(), ("vbar", float((mine - ref).abs().max()))
    assert flips <= max(2, 1e-2 * mine.numel()), ("vbar grid flips", flips, mine.numel())


# ---------------------------------------------------------------------------------------
# Every QK x PV x granularity x smoothing combination, small lengths

COMBOS = [(p, g, s) for p in PRECISIONS for g in ("per_thread", "per_warp", "per_block") for s in SMOOTHINGS]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("precision,gran,smoothing", COMBOS)
def test_every_combination(precision, gran, smoothing, d, causal):
    i = COMBOS.index((precision, gran, smoothing)) + d + int(causal)
    dtype = (torch.bfloat16, torch.float16)[i % 2]
    layout = ("HND", "NHD")[(i // 2) % 2]
    nq, nk = ((65, 130), (130, 63), (200, 200))[i % 3]
    q, k, v = make_qkv(1, 4, (1, 2, 4)[i % 3], nq, nk, d, dtype=dtype, device=DEV, layout=layout, v_bias=1.0)
    check(q, k, v, make_cfg(precision, gran, smoothing), layout=layout, causal=causal,
          case=f"{precision}/{gran}/{smoothing}/d{d}/causal{int(causal)}/{nq}x{nk}")


# ---------------------------------------------------------------------------------------
# Lengths and head dims (tails, padding, native 256)

LENGTHS = [1, 63, 64, 65, 4096 + 77]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("d", [64, 80, 128, 160, 256])
@pytest.mark.parametrize("precision", ["int8+fp16", "int8+fp8"])
def test_lengths_and_head_dims(precision, d, n, causal):
    dtype = torch.bfloat16 if (d + n) % 2 else torch.float16
    q, k, v = make_qkv(1, 2, 2, n, n, d, dtype=dtype, device=DEV)
    check(q, k, v, make_cfg(precision), causal=causal, case=f"{precision}/d{d}/n{n}/causal{int(causal)}",
          exact_dtype=torch.float32 if n > 1000 else torch.float64)


@pytest.mark.parametrize("n", [65, 4096 + 77])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("precision", ["int4+fp8", "int4+fp16"])
def test_int4_lengths(precision, d, n):
    q, k, v = make_qkv(1, 2, 1, n, n, d, dtype=torch.bfloat16, device=DEV, layout="NHD")
    check(q, k, v, make_cfg(precision, smoothing="kq"), layout="NHD", causal=n < 100,
          case=f"{precision}/d{d}/n{n}", exact_dtype=torch.float32 if n > 1000 else torch.float64)


# ---------------------------------------------------------------------------------------
# Layouts, strides, GQA, sm_scale


@pytest.mark.parametrize("precision", ["int8+fp16", "int8+fp8", "int4+fp8"])
@pytest.mark.parametrize("d,pad", [(128, 0), (72, 8), (40, 4)])
def test_noncontiguous_gqa(precision, d, pad):
    """Views with padded channels (row stride d + pad) and every other token, NHD and HND;
    pad 4 makes rows 8-byte but not 16-byte aligned, so 16-bit V takes the copy path."""
    cfg = make_cfg(precision, smoothing="kq")
    need(cfg)
    for layout in ("HND", "NHD"):
        q0, k0, v0 = make_qkv(2, 6, 2, 2 * 150, 2 * 97, d + pad, dtype=torch.float16, device=DEV, layout=layout)
        tok = (slice(None), slice(None, None, 2)) if layout == "NHD" else (slice(None), slice(None), slice(None, None, 2))
        q, k, v = (x[tok][..., :d] for x in (q0, k0, v0))
        assert not q.is_contiguous() and q.stride(-1) == 1
        check(q, k, v, cfg, layout=layout, causal=False, case=f"strided/{precision}/{layout}/d{d}+{pad}")


def test_sm_scale_and_lse_against_exact():
    cfg = make_cfg("int8+fp8" if HAS_FP8 else "int8+fp16")
    q, k, v = make_qkv(1, 2, 2, 333, 517, 128, dtype=torch.bfloat16, device=DEV)
    o, l, _ = run_kernel(q, k, v, cfg, lse=True, sm_scale=0.05)
    ref_o, ref_l = reference_attention(q, k, v, cfg, sm_scale=0.05, return_lse=True)
    _, ex_l = exact_attention(q, k, v, sm_scale=0.05, return_lse=True)
    assert error_metrics(o, ref_o)["rel_l1"] <= 2e-3
    assert float((l - ref_l).abs().max()) <= 2e-3
    assert float((l - ex_l).abs().max()) <= 5e-2  # quantization error only, the K-mean term included


# ---------------------------------------------------------------------------------------
# INT4 on Hopper, declines


@pytest.mark.skipif(CAP != (9, 0), reason="INT4 is emulated only on Hopper")
def test_int4_runs_int8_on_hopper_unless_forced():
    q, k, v = make_qkv(1, 2, 2, 200, 200, 128, dtype=torch.bfloat16, device=DEV)
    cfg4 = make_cfg("int4+fp16", smoothing="kq")
    plain = lambda c, **kw: mma.attention(q, k, v, layout="HND", cfg=c, is_causal=False, sm_scale=None,
                                          return_lse=False, **kw)[0]
    as_int8 = plain(cfg4)
    assert torch.equal(as_int8, plain(cfg4.with_(qk_dtype=QKDType.INT8)))
    forced = plain(cfg4, force_int4_emulation=True)
    ref4, _ = reference_attention(q, k, v, cfg4)
    assert error_metrics(forced, ref4)["rel_l1"] <= 2e-3
    assert not torch.equal(forced, as_int8)


def test_unsupported_reasons():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 64, dtype=torch.bfloat16, device=DEV)
    cfg = make_cfg("int8+fp16")
    assert mma.unsupported_reason(q, k, v, layout="HND", cfg=cfg, is_causal=False) is None
    big = torch.zeros(1, 2, 16, 320, dtype=torch.bfloat16, device=DEV)
    assert "head dim" in mma.unsupported_reason(big, big, big, layout="HND", cfg=cfg, is_causal=False)
    assert "CUDA" in mma.unsupported_reason(q.cpu(), k.cpu(), v.cpu(), layout="HND", cfg=cfg, is_causal=False)
    assert "dtype" in mma.unsupported_reason(q.float(), k.float(), v.float(), layout="HND", cfg=cfg,
                                             is_causal=False)
    fp8 = mma.unsupported_reason(q, k, v, layout="HND", cfg=make_cfg("int8+fp8"), is_causal=False)
    assert (fp8 is None) == HAS_FP8
    rotated = cfg.with_(hadamard=True)  # the rotating quantizers: tests/gpu/test_hadamard_kernels.py
    assert mma.unsupported_reason(q, k, v, layout="HND", cfg=rotated, is_causal=False) is None


# ---------------------------------------------------------------------------------------
# FP16 P.V accumulation (pv_accum="fp16", numerics.md §2.6)

ACC16_CASES = [
    # (precision, d, n, causal, dtype, smoothing)
    ("int8+fp8", 128, 4096 + 77, False, torch.bfloat16, "k"),
    ("int8+fp8", 64, 4096 + 77, True, torch.float16, "kqv"),
    ("int8+fp8", 256, 1000, False, torch.bfloat16, "k"),
    ("int8+fp8", 80, 65, True, torch.float16, "none"),
    ("int4+fp8", 128, 4096 + 77, False, torch.bfloat16, "kq"),
    ("int4+fp8", 64, 200, True, torch.float16, "kq"),
    ("int8+fp16", 128, 4096 + 77, False, torch.float16, "k"),
    ("int8+fp16", 64, 4096 + 77, True, torch.float16, "kqv"),
    ("int8+fp16", 256, 1000, False, torch.float16, "k"),
    ("int4+fp16", 128, 1000, True, torch.float16, "kq"),
]


@pytest.mark.parametrize("precision,d,n,causal,dtype,smoothing", ACC16_CASES)
def test_fp16_accumulation(precision, d, n, causal, dtype, smoothing):
    """Kernel against the reference's fp16-accumulator model (rounded after every k-step). The
    hardware's internal order and rounding are not documented (and on Hopper FP8 mma.sync is
    emulated), so the same-operand bound allows a few fp16 roundings per tile: 3e-3 rel L1,
    against ~5e-5 with fp32 accumulation."""
    cfg = make_cfg(precision, smoothing=smoothing, pv_accum="fp16")
    q, k, v = make_qkv(1, 4, 2, n, n, d, dtype=dtype, device=DEV, v_bias=1.0)
    check(q, k, v, cfg, causal=causal, case=f"acc16/{precision}/d{d}/n{n}/causal{int(causal)}",
          exact_dtype=torch.float32 if n > 1000 else torch.float64, same_rel_l1=3e-3)


@pytest.mark.parametrize("precision", ["int8+fp8", "int8+fp16"])
def test_fp16_accumulator_cannot_overflow(precision):
    """Every key at the row max and V at +-its largest magnitude (fp16 60000 for 16-bit PV):
    the fp16 tile sums must stay finite and O must be V."""
    cfg = make_cfg(precision, smoothing="none", pv_accum="fp16")
    need(cfg)
    n, d = 256, 128
    q = torch.zeros(1, 2, n, d, dtype=torch.float16, device=DEV)
    v = torch.full_like(q, 60000.0)
    v[..., 1::2] = -60000.0
    o, _, _ = run_kernel(q, q, v, cfg)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), v.float(), rtol=2e-3, atol=0)


@pytest.mark.parametrize("smoothing", ["k", "kv"])
def test_fp8_v_for_fp16_accumulation(smoothing):
    """pv_accum='fp16' quantizes V to |V_hat| <= 2 (the quantizer's fp8_max): scales equal the
    reference's, every stored E4M3 value lies in [-2, 2] and the top one reaches 2."""
    sk, sq, sv = QUANT_SMOOTHINGS[smoothing]
    cfg = AttnConfig(qk_dtype="int8", pv_dtype="fp8", smooth_k=sk, smooth_q=sq, smooth_v=sv, pv_accum="fp16")
    need(cfg)
    q, k, v = make_qkv(1, 4, 2, 300, 333, 128, dtype=torch.bfloat16, device=DEV, v_bias=1.0)
    poison_allocator()
    qz = mma.quantize(q, k, v, layout="HND", cfg=cfg, dk=LIB)
    torch.cuda.synchronize()
    rv = quantize_v(v, cfg, tensor_layout="HND")
    torch.testing.assert_close(qz.v_scale, rv.scale, rtol=2e-6, atol=0)
    mine = _v_by_token(qz.v)[:, :, : rv.values.shape[2]]
    assert mine.abs().max() == 2.0, float(mine.abs().max())
    _values_close(mine, rv.values, 2 ** -3, "v fp8 values (|V_hat| <= 2)")  # one E4M3 step in [1, 2)


def test_dispatch_default_accumulator_and_launch_smem():
    """The arch table's accumulator is what dispatch runs (FP8 PV in fp16 on sm_89/120/121), the
    16-bit P.V kernels take their row sums from an MMA exactly where the table says, and
    a launch without Q smoothing asks for the smaller shared memory (two CTAs per GeForce SM at
    D = 128)."""
    from sageattn2 import dispatch

    acc = dispatch.default_pv_accum(CAP, PVDType.FP8)
    assert (acc.value == "fp16") == LIB.arch.fp8_pv_fp16_accum
    # 16-bit P.V with an fp32 accumulator takes its row sums from the MMA where that runs at full rate.
    for pv_cfg, dtype in ((make_cfg("int8+fp16"), torch.bfloat16), (make_cfg("int8+fp16"), torch.float16)):
        kernel = LIB.get(mma.attention_kernel_for(pv_cfg, dtype, 64))
        assert kernel.info["row_sums_by_mma"] == int(LIB.arch.fp32_accum_full_rate), kernel.name
    if LIB.arch.fp8_mma:
        assert LIB.get(mma.attention_kernel_for(make_cfg("int8+fp8"), torch.bfloat16, 64)).info["row_sums_by_mma"] == 0
    for smooth_q in (False, True):
        cfg = make_cfg("int8+fp16", smoothing="kq" if smooth_q else "k")
        kernel = LIB.get(mma.attention_kernel_for(cfg, torch.float16, 128))
        assert kernel.info["smem_no_qbar"] < kernel.info["smem"]
        assert mma._attention_smem(kernel, smooth_q) == kernel.info["smem" if smooth_q else "smem_no_qbar"]
    if CAP in ((8, 6), (8, 9), (12, 0), (12, 1)):
        assert kernel.info["smem_no_qbar"] <= 48 * 1024


def test_fp16_accumulation_declines_bf16_16bit_pv():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, dtype=torch.bfloat16, device=DEV)
    why = mma.unsupported_reason(q, k, v, layout="HND", cfg=make_cfg("int8+fp16", pv_accum="fp16"), is_causal=False)
    assert why and "fp16" in why


# ---------------------------------------------------------------------------------------
# Accuracy of each precision level against exact attention (numbers for docs/notes-mma.md)


@pytest.mark.parametrize("shape", [(1, 24, 4096, 128), (1, 24, 8192, 64)])
def test_accuracy_table(shape):
    """h100-baseline.md data: randn, K + 3 randn per-channel bias, a few large Q channels."""
    B, H, N, D = shape
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=torch.bfloat16, device=DEV)
    ex_o, _ = exact_attention(q, k, v, compute_dtype=torch.float32)
    results = {}
    levels = [(p, "fp32") for p in PRECISIONS] + [("int8+fp8", "fp16"), ("int4+fp8", "fp16")]
    for precision, acc in levels:
        cfg = make_cfg(precision, smoothing="kq" if precision.startswith("int4") else "k", pv_accum=acc)
        if cfg.pv_dtype is PVDType.FP8 and not HAS_FP8:
            continue
        precision = precision if acc == "fp32" else f"{precision} acc16"
        o, _, _ = run_kernel(q, k, v, cfg)
        ref_o, _ = reference_attention(q, k, v, cfg)
        m, r = error_metrics(o, ex_o), error_metrics(ref_o, ex_o)
        log({"kind": "accuracy", "precision": precision, "shape": "x".join(map(str, shape)),
             "cos": m["cos"], "rel_l1": m["rel_l1"], "ref_cos": r["cos"], "ref_rel_l1": r["rel_l1"]})
        results[precision] = (m, r)
    for precision, (m, r) in results.items():
        assert m["rel_l1"] <= 1.05 * r["rel_l1"] + 5e-3, (precision, m, r)
        # INT4 on this data (Q outlier channels 8x) is far from exact in the reference too:
        # its numbers go to the notes, only INT8 has an absolute bar.
        if precision.startswith("int8"):
            assert m["cos"] >= 0.99, (precision, m)
