"""GPU tests of the Hadamard rotation (AttnConfig(hadamard=True), docs/numerics.md §1.6): the
rotating fused quantizers (quant_kernels.cuh, kHadamard) and both attention families on their
operands, on data with outlier channels (2 Q channels x10, 2 other K channels x20).

- Quantizers against reference.quantize_q / quantize_k with the rotation: equal codes without
  smoothing (the kernel does the reference's fp32 operations in the reference's order); with K or
  Q means (summed in another order) rare one-step code differences, as in the mma suite. k-bar
  and q . k-bar stay unrotated (the lse term).
- mma attention, INT8 and INT4 (INT4 is emulated on Hopper: correctness only): the mma suite's
  `check` (kernel vs the reference on its own operands, vs the reference, vs float64 exact; the
  allocator poisoned with NaN; synchronize surfaces CUDA errors), and the rotation's gain over
  the same kernel without it, lse included.
- wgmma attention (Hopper, INT8): against the reference (13-bit FP8 accumulator) and float64
  exact attention, outputs poisoned with NaN, and the gain over the unrotated kernel.
- The public API (`sageattn(..., hadamard=True)`): dispatch keeps the flag for the family it picks
  (wgmma for INT8 on Hopper), the result is that backend's rotated one bit for bit, the gain over
  the same call without it, and the rotating quantizers come from the product build.
Metrics go to $SA2_TEST_LOG (JSON lines).
"""
from __future__ import annotations

import secrets

import pytest
import torch

import sageattn2
from conftest import error_metrics, make_qkv
from sageattn2 import archs, dispatch, kernels
from sageattn2.config import AttnConfig, Family, QKDType
from sageattn2.reference import exact_attention, quantize_k, quantize_q, reference_attention, unpack_int4
from test_mma_kernels import CAP, DEV, LIB, _values_close, check, log, mma, need, poison_allocator, run_kernel


def outlier_qkv(b, hq, hkv, nq, nk, d, *, dtype=torch.bfloat16, layout="HND", seed=None):
    """make_qkv's data (randn, K + 3 randn channel bias) with 2 random Q channels x10 and 2 other
    K channels x20, on the GPU."""
    seed = secrets.randbits(31) if seed is None else seed
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32, layout=layout, seed=seed, q_outlier_channels=0)
    channels = torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:4]
    q[..., channels[:2]] *= 10
    k[..., channels[2:]] *= 20
    return tuple(x.to(dtype).to(DEV) for x in (q, k, v))


def rotated_cfg(precision: str, smooth_q: bool, family="mma", **kw) -> AttnConfig:
    qk, pv = precision.split("+")
    return AttnConfig(qk_dtype=qk, pv_dtype=pv, smooth_q=smooth_q, family=family, hadamard=True, **kw)


# ---------------------------------------------------------------------------------------
# Quantizers

QUANT_CASES = [
    # (d, nq, nk, precision, smooth_k, smooth_q, dtype, layout, family)
    (128, 300, 200, "int8+fp16", False, False, torch.bfloat16, "HND", "mma"),
    (64, 129, 63, "int8+fp16", False, False, torch.float16, "NHD", "mma"),
    (256, 70, 64, "int4+fp16", False, False, torch.bfloat16, "HND", "mma"),
    (80, 65, 130, "int4+fp16", False, False, torch.float16, "NHD", "mma"),  # padded to 128, then rotated
    (128, 1000, 3000, "int8+fp16", True, False, torch.bfloat16, "NHD", "mma"),
    (256, 513, 700, "int4+fp16", True, True, torch.bfloat16, "HND", "mma"),
    (64, 200, 333, "int4+fp8", True, True, torch.float16, "HND", "mma"),
    (40, 33, 77, "int8+fp16", True, True, torch.float16, "NHD", "mma"),  # d % 8 != 0: scalar loads
    (128, 300, 200, "int8+fp8", True, False, torch.bfloat16, "NHD", "wgmma"),  # the Hopper groups
    (64, 129, 1000, "int8+fp16", False, False, torch.float16, "HND", "wgmma"),
]


@pytest.mark.parametrize("d,nq,nk,precision,smooth_k,smooth_q,dtype,layout,family", QUANT_CASES)
def test_rotating_quantizers_match_reference(d, nq, nk, precision, smooth_k, smooth_q, dtype, layout, family):
    cfg = rotated_cfg(precision, smooth_q, family, smooth_k=smooth_k)
    need(cfg)
    q, k, v = outlier_qkv(2, 4, 2, nq, nk, d, dtype=dtype, layout=layout)
    poison_allocator()
    qz = mma.quantize(q, k, v, layout=layout, cfg=cfg, with_q_dot_kbar=smooth_k, dk=LIB)
    torch.cuda.synchronize()
    rq, rk = quantize_q(q, cfg, tensor_layout=layout), quantize_k(k, cfg, tensor_layout=layout)
    unpack = unpack_int4 if cfg.qk_dtype is QKDType.INT4 else (lambda x: x)
    pairs = [("q values", unpack(qz.q), rq.values), ("k values", unpack(qz.k), rk.values),
             ("q scales", qz.q_scale, rq.scale), ("k scales", qz.k_scale, rk.scale)]
    if smooth_q:
        pairs += [("qbar values", qz.qbar, rq.qbar_values), ("qbar scales", qz.qbar_scale, rq.qbar_scale)]
    unrotated = quantize_q(q, cfg.with_(hadamard=False), tensor_layout=layout).values
    assert not torch.equal(unpack(qz.q), unrotated), "the codes are the unrotated ones"
    for what, mine, ref in pairs:
        if "scales" in what:  # torch's CUDA tensor / scalar multiplies by the reciprocal: 1 ulp
            torch.testing.assert_close(mine, ref, rtol=2e-6, atol=0, msg=what)
        elif not (smooth_k or smooth_q):  # the same fp32 operations in the same order: equal codes
            assert mine.shape == ref.shape and torch.equal(mine, ref), what
        else:
            _values_close(mine, ref, 1, what)
    if smooth_k:  # unrotated: the lse adds sm_scale * q . k-bar with the caller's q
        torch.testing.assert_close(qz.kbar, rk.kbar, rtol=1e-5, atol=1e-5)
        q_h = q if layout == "HND" else q.transpose(1, 2)
        kv_head = torch.arange(q_h.shape[1], device=DEV) // (q_h.shape[1] // rk.kbar.shape[1])
        dot = (q_h.float() @ rk.kbar[:, kv_head, :d, None]).squeeze(-1)
        torch.testing.assert_close(qz.q_dot_kbar[:, :, :nq], dot, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------
# mma attention: INT8 and INT4

ATTN_CASES = [
    # (precision, d, n, causal, dtype)
    ("int8+fp16", 128, 1024, False, torch.bfloat16),
    ("int8+fp16", 64, 1000, True, torch.float16),
    ("int8+fp8", 128, 4096 + 77, True, torch.bfloat16),
    ("int8+fp8", 256, 700, False, torch.bfloat16),
    ("int8+fp16", 80, 333, False, torch.bfloat16),
    ("int4+fp16", 128, 1024, False, torch.bfloat16),
    ("int4+fp8", 64, 1000, True, torch.bfloat16),
    ("int4+fp8", 128, 4096 + 77, False, torch.bfloat16),
]


def _vs_exact(out, lse, exact_o, exact_l) -> dict:
    return {**error_metrics(out, exact_o), "lse_err": float((lse.double() - exact_l.double()).abs().max())}


@pytest.mark.parametrize("precision,d,n,causal,dtype", ATTN_CASES)
def test_mma_attention_with_rotation(precision, d, n, causal, dtype):
    """INT4 smooths Q as it does by default (numerics.md §1.2); INT8 does not."""
    cfg = rotated_cfg(precision, smooth_q=precision.startswith("int4"))
    need(cfg)
    q, k, v = outlier_qkv(1, 4, 2, n, n, d, dtype=dtype)
    case = f"hadamard/{precision}/d{d}/n{n}/causal{int(causal)}"
    check(q, k, v, cfg, causal=causal, case=case)
    o_rot, l_rot, _ = run_kernel(q, k, v, cfg, causal=causal, lse=True)
    o_plain, l_plain, _ = run_kernel(q, k, v, cfg.with_(hadamard=False), causal=causal, lse=True)
    ex_o, ex_l = exact_attention(q, k, v, is_causal=causal, return_lse=True)
    rot, plain = _vs_exact(o_rot, l_rot, ex_o, ex_l), _vs_exact(o_plain, l_plain, ex_o, ex_l)
    record = {"kind": "hadamard_gain", "case": case, "rotated": rot, "plain": plain}
    log(record)
    # Reference on 1x2x1024x128 (tests/test_hadamard.py): INT8 cos 0.989 -> 0.9996, INT4 0.29 -> 0.88.
    assert rot["rel_l1"] <= 0.8 * plain["rel_l1"] and rot["cos"] >= plain["cos"], record
    if cfg.qk_dtype is QKDType.INT8:
        assert rot["cos"] >= 0.998, record
    else:
        assert rot["cos"] >= plain["cos"] + 0.1, record
    # k-bar unrotated: a rotated one would move the lse by order 10.
    assert rot["lse_err"] <= plain["lse_err"] + 1e-2, record


def test_mma_plan_path_matches_quantize_and_launch():
    """mma.attention's cached plan (one workspace, templates) runs the rotating quantizers too:
    bit for bit the quantize() + launch() result."""
    cfg = rotated_cfg("int8+fp16", smooth_q=False)
    q, k, v = outlier_qkv(2, 4, 2, 500, 700, 128, layout="NHD")
    o_ref, l_ref, _ = run_kernel(q, k, v, cfg, layout="NHD", lse=True)
    poison_allocator()
    o, l = mma.attention(q, k, v, layout="NHD", cfg=cfg, is_causal=False, sm_scale=None, return_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(o, o_ref) and torch.equal(l, l_ref)


def test_backends_take_the_rotation():
    q, k, v = outlier_qkv(1, 2, 2, 64, 64, 64)
    assert mma.unsupported_reason(q, k, v, layout="HND", cfg=AttnConfig(hadamard=True), is_causal=False) is None
    if CAP == (9, 0):
        from sageattn2.backends import wgmma

        cfg = AttnConfig(family=Family.WGMMA, hadamard=True)
        assert wgmma.unsupported_reason(q, k, v, layout="HND", cfg=cfg, is_causal=False) is None
        assert "INT4" in wgmma.unsupported_reason(q, k, v, layout="HND", cfg=cfg.with_(qk_dtype="int4"),
                                                  is_causal=False)


# ---------------------------------------------------------------------------------------
# wgmma attention (Hopper)

WGMMA_CASES = [
    # (pv, d, n, causal, layout)
    ("fp8", 128, 4096 + 77, False, "HND"),
    ("fp8", 64, 1000, True, "NHD"),
    ("fp16", 128, 1024, True, "HND"),
    ("fp16", 80, 333, False, "NHD"),
]


@pytest.mark.skipif(CAP != (9, 0), reason="the wgmma family needs Hopper")
@pytest.mark.parametrize("pv,d,n,causal,layout", WGMMA_CASES)
def test_wgmma_attention_with_rotation(pv, d, n, causal, layout):
    from sageattn2.backends import wgmma

    cfg = AttnConfig(pv_dtype=pv, family=Family.WGMMA, hadamard=True)
    q, k, v = outlier_qkv(1, 4, 2, n, n, d, layout=layout)
    scale = d**-0.5

    def run(c):
        poison_allocator()
        prep = wgmma.prepare(q, k, v, layout=layout, cfg=c, is_causal=causal, sm_scale=scale, return_lse=True)
        out = torch.full_like(q, float("nan"))
        b, nq, hq = q.shape[0], n, q.shape[1 if layout == "HND" else 2]
        lse = torch.full((b, hq, nq), float("nan"), device=DEV)
        out, lse = wgmma.run(prep, return_lse=True, out=out, lse=lse)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "unwritten or non-finite output"
        return out, lse

    o_rot, l_rot = run(cfg)
    o_plain, l_plain = run(cfg.with_(hadamard=False))
    kw = dict(tensor_layout=layout, is_causal=causal, sm_scale=scale, return_lse=True)
    ref_o, ref_l = reference_attention(q, k, v, cfg, fp8_acc_mantissa_bits=13 if pv == "fp8" else None, **kw)
    ex_o, ex_l = exact_attention(q, k, v, **kw)
    same = {**error_metrics(o_rot, ref_o), "lse_err": float((l_rot - ref_l).abs().max())}
    rot, plain = _vs_exact(o_rot, l_rot, ex_o, ex_l), _vs_exact(o_plain, l_plain, ex_o, ex_l)
    record = {"kind": "hadamard_wgmma", "case": f"{pv}/d{d}/n{n}/causal{int(causal)}/{layout}", "vs_ref": same,
              "rotated": rot, "plain": plain}
    log(record)
    # The wgmma suite's bounds against the reference (test_wgmma_kernels.TOL / LSE_TOL).
    assert same["cos"] >= 0.9999 and same["rel_l1"] <= 0.006 and same["lse_err"] <= 5e-2, record
    assert rot["rel_l1"] <= 0.8 * plain["rel_l1"] and rot["cos"] >= max(plain["cos"], 0.995), record
    assert rot["lse_err"] <= plain["lse_err"] + 1e-2, record


# ---------------------------------------------------------------------------------------
# The public API


@pytest.mark.parametrize("precision,layout", [("int8+fp8", "HND"), ("int8+fp16", "NHD"), ("int4+fp8", "HND"),
                                              ("int4+fp16", "NHD")])
def test_public_api_serves_the_rotation(precision, layout):
    q, k, v = outlier_qkv(1, 4, 2, 2048 + 33, 2048 + 33, 128, layout=layout)
    opts = dict(layout=layout, precision=precision, granularity="per_thread", smooth_k=True, smooth_q=None,
                smooth_v=False, is_causal=False)
    p = dispatch.plan(q, k, v, hadamard=True, **opts)
    if p.backend == "exact":
        pytest.skip(p.note)
    assert p.cfg.hadamard and p.backend == dispatch.plan(q, k, v, **opts).backend
    if CAP == (9, 0) and p.cfg.qk_dtype is QKDType.INT8 and not p.cfg.smooth_q:
        assert p.backend == "wgmma"
    product = {kn.name for kn in kernels.product_kernels(archs.arch(*CAP))}
    assert {f"quant-bf16-d128-{kind}-hadamard" for kind in kernels.QUANT_ROW_KINDS} <= product
    poison_allocator()
    o_rot, l_rot = sageattn2.sageattn(q, k, v, tensor_layout=layout, return_lse=True, precision=precision,
                                      hadamard=True)
    o_direct, l_direct = dispatch.backend_module(p.backend).attention(
        q, k, v, layout=layout, cfg=p.cfg, is_causal=False, sm_scale=128 ** -0.5, return_lse=True)
    o_plain, l_plain = sageattn2.sageattn(q, k, v, tensor_layout=layout, return_lse=True, precision=precision)
    torch.cuda.synchronize()
    assert torch.equal(o_rot, o_direct) and torch.equal(l_rot, l_direct)
    ex_o, ex_l = exact_attention(q, k, v, tensor_layout=layout, return_lse=True)
    rot, plain = _vs_exact(o_rot, l_rot, ex_o, ex_l), _vs_exact(o_plain, l_plain, ex_o, ex_l)
    record = {"kind": "hadamard_api", "case": f"{p.backend}/{precision}->{p.cfg.precision}/{layout}",
              "rotated": rot, "plain": plain}
    log(record)
    assert rot["rel_l1"] <= 0.8 * plain["rel_l1"] and rot["cos"] >= plain["cos"], record
    assert rot["lse_err"] <= plain["lse_err"] + 1e-2, record
