"""GPU: the thu-ml compatible interface (sageattn2/compat.py) on our kernels.

Each entry point is compared with sageattn2.reference for the config the dispatcher chose (the
same numerics computed in PyTorch) and with float64 exact attention, output and lse. When
thu-ml's own `sageattention` is importable (tests/gpu/build_thuml.sh), its lse and output for
the same call are compared with ours: the lse convention must be the same. Skipped without a
CUDA GPU and built kernels. Metrics go to $SA2_TEST_LOG (JSON lines).
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import secrets

import pytest
import torch

from sageattn2 import compat, dispatch
from sageattn2.config import Family, PVDType
from sageattn2.reference import exact_attention, reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ENTRY = {
    # name: (extra kwargs, precision and granularity it maps to)
    "sageattn": ({}, None, "per_thread"),
    "sageattn_qk_int8_pv_fp16_cuda": ({"pv_accum_dtype": "fp32"}, "int8+fp16", "per_thread"),
    "sageattn_qk_int8_pv_fp8_cuda": ({"pv_accum_dtype": "fp32+fp32"}, "int8+fp8", "per_thread"),
    "sageattn_qk_int8_pv_fp8_cuda_sm90": ({}, "int8+fp8", "per_thread"),
    "sageattn_qk_int8_pv_fp16_triton": ({}, "int8+fp16", "per_block"),
    "per_warp": ({"qk_quant_gran": "per_warp"}, "int8+fp8", "per_warp"),
}


def _log(**fields):
    path = os.environ.get("SA2_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def inputs(b, h, n_q, n_k, d, layout, seed=None):
    if seed is None:
        seed = secrets.randbits(31)
    print(f"inputs seed={seed}")
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device="cuda") for n in (n_q, n_k, n_k))
    k = k + 3 * torch.randn(1, h, 1, d, generator=g, device="cuda")
    q[..., :2] *= 8
    out = [t.to(torch.bfloat16) for t in (q, k, v)]
    return out if layout == "HND" else [t.transpose(1, 2).contiguous() for t in out]


def served_plan(q, k, v, layout, precision, granularity, causal):
    p = dispatch.plan(q, k, v, layout=layout, precision=precision, granularity=granularity, smooth_k=True,
                      smooth_q=None, smooth_v=False, is_causal=causal)
    if p.backend == "exact":
        pytest.skip(f"no kernel serves {precision}/{granularity}: {p.note}")
    return p


def metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    return float(o @ r / (o.norm() * r.norm())), float((o - r).abs().sum() / r.abs().sum())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("name", sorted(ENTRY))
def test_entry_point_on_the_kernels(name, layout, causal):
    kwargs, precision, gran = ENTRY[name]
    fn = getattr(compat, "sageattn_qk_int8_pv_fp8_cuda" if name == "per_warp" else name)
    q, k, v = inputs(2, 4, 1000, 1500 if not causal else 1000, 128, layout)
    precision = precision or dispatch.default_precision(torch.cuda.get_device_capability())
    p = served_plan(q, k, v, layout, precision, gran, causal)
    scale = 0.08
    o, lse = fn(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale, return_lse=True, **kwargs)
    torch.cuda.synchronize()
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (2, 4, 1000) and lse.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    wgmma_fp8 = p.cfg.family is Family.WGMMA and p.cfg.pv_dtype is PVDType.FP8
    o_ref, lse_ref = reference_attention(q, k, v, p.cfg, tensor_layout=layout, is_causal=causal, sm_scale=scale,
                                         return_lse=True, fp8_acc_mantissa_bits=13 if wgmma_fp8 else None)
    o64, lse64 = exact_attention(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale, return_lse=True)
    cos_ref, l1_ref = metrics(o, o_ref)
    cos_ex, l1_ex = metrics(o, o64)
    lse_ref_err = (lse - lse_ref).abs().max().item()
    lse_ex_err = (lse.double() - lse64).abs().max().item()
    _log(kind="compat", name=name, layout=layout, causal=causal, plan=p.cfg.uri, cos_ref=cos_ref, rel_l1_ref=l1_ref,
         cos_exact=cos_ex, rel_l1_exact=l1_ex, lse_err_ref=lse_ref_err, lse_err_exact=lse_ex_err)
    # Bounds of the kernel suites: vs reference (same numerics) and vs exact (quantization).
    assert cos_ref > 0.9999 and l1_ref < 0.006, (cos_ref, l1_ref)
    assert cos_ex > 0.995 and l1_ex < 0.08, (cos_ex, l1_ex)
    assert lse_ref_err < 5e-2 and lse_ex_err < 0.3, (lse_ref_err, lse_ex_err)


def test_yunchang_style_call():
    # What yunchang's ring does: partial(sageattn, tensor_layout="NHD", return_lse=True) called
    # with flash-attn keywords; causal and softmax_scale must be honoured.
    q, k, v = inputs(1, 8, 4096, 4096, 128, "NHD")
    served_plan(q, k, v, "NHD", "int8+fp8", "per_thread", True)
    fn = functools.partial(compat.sageattn_qk_int8_pv_fp8_cuda_sm90, pv_accum_dtype="fp32+fp32", tensor_layout="NHD",
                           return_lse=True)
    o, lse = fn(q, k, v, dropout_p=0.0, softmax_scale=0.07, causal=True, window_size=(-1, -1), softcap=0.0,
                alibi_slopes=None, return_softmax=False)
    o64, lse64 = exact_attention(q, k, v, tensor_layout="NHD", is_causal=True, sm_scale=0.07, return_lse=True)
    assert metrics(o, o64)[0] > 0.998
    assert (lse.double() - lse64).abs().max() < 0.3


def test_varlen_on_the_kernels():
    lengths = [4096, 77, 1500, 1]
    h, d = 8, 128
    total = sum(lengths)
    q, k, v = (t[0] for t in inputs(1, h, total, total, d, "NHD"))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    out = compat.sageattn_varlen(q, k, v, cu, cu, max(lengths), max(lengths), is_causal=True)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        o64, _ = exact_attention(q[None, a:b], k[None, a:b], v[None, a:b], tensor_layout="NHD", is_causal=True)
        assert metrics(out[a:b], o64[0])[0] > 0.998, (a, b)


def test_wan_shape_with_lse():
    # WAN 14B 720p self-attention of one GPU (75,600 tokens, 40 heads, hd128) as a ring rank
    # would call it: NHD, return_lse. Compared on a slice of query rows.
    n, h = 75600, 40
    q, k, v = inputs(1, h, n, n, 128, "NHD")
    served_plan(q, k, v, "NHD", "int8+fp8", "per_thread", False)
    o, lse = compat.sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, "NHD", return_lse=True)
    rows = slice(n - 1000, n)
    o64, lse64 = exact_attention(q[:, rows], k, v, tensor_layout="NHD", return_lse=True)
    cos, l1 = metrics(o[:, rows], o64)
    lse_err = (lse[..., rows].double() - lse64).abs().max().item()
    _log(kind="compat_wan", cos_exact=cos, rel_l1_exact=l1, lse_err_exact=lse_err)
    assert cos > 0.998 and l1 < 0.07 and lse_err < 0.05, (cos, l1, lse_err)  # int8+fp8's floor, numerics.md §5


def _thu_ml():
    try:
        module = importlib.import_module("sageattention")
    except ImportError:
        return None
    return None if getattr(module, "__provider__", None) == compat.PROVIDER else module


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_lse_convention_matches_thu_ml(layout):
    thu = _thu_ml()
    if thu is None or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("thu-ml's sageattention (sm90 build) is not importable")
    q, k, v = inputs(1, 8, 4096, 4096, 128, layout)
    served_plan(q, k, v, layout, "int8+fp8", "per_thread", False)
    o_t, lse_t = thu.sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout=layout, return_lse=True)
    o, lse = compat.sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout=layout, return_lse=True)
    assert lse.shape == lse_t.shape
    lse_diff = (lse - lse_t.float()).abs().max().item()
    cos, _ = metrics(o, o_t)
    _log(kind="compat_vs_thuml", layout=layout, lse_diff=lse_diff, cos=cos)
    assert lse_diff < 0.05 and cos > 0.999, (lse_diff, cos)


def test_mask_runs_exact_attention_on_the_gpu():
    # ComfyUI's --use-sage-attention call shape, with a key-padding style float mask.
    q, k, v = inputs(2, 8, 1024, 1536, 128, "NHD")
    mask = torch.zeros(2, 1, 1, 1536, device="cuda")
    mask[..., 1400:] = float("-inf")
    o = compat.sageattn(q, k, v, attn_mask=mask, is_causal=False, tensor_layout="NHD")
    o64, _ = exact_attention(q, k[:, :1400], v[:, :1400], tensor_layout="NHD")
    assert metrics(o, o64)[0] > 0.99999
