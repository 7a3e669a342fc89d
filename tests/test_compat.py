"""CPU tests of the thu-ml compatible interface (sageattn2/compat.py): each entry point runs the
level it maps to (checked against sageattn2.reference with that config), the lse convention,
flash-attn style keywords, logging of what cannot be honoured, varlen, masks, and how the
`sageattention` module is provided (function, env var at pack import, PYTHONPATH shim)."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import error_metrics, make_qkv
from sageattn2 import compat, dispatch
from sageattn2.config import AttnConfig
from sageattn2.reference import exact_attention, reference_attention

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_log_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())


@pytest.fixture
def no_sageattention_module(monkeypatch):
    """Whatever a test installs as `sageattention` is removed afterwards."""
    monkeypatch.delitem(sys.modules, "sageattention", raising=False)
    monkeypatch.delitem(sys.modules, "sageattention.core", raising=False)


def exact64(q, k, v, layout="HND", **kwargs):
    return exact_attention(q.double(), k.double(), v.double(), tensor_layout=layout, return_lse=True, **kwargs)


# ---------------------------------------------------------------------------------------
# Each entry point runs the level it names


ENTRY_POINTS = {
    # name: (call kwargs, the reference config it must equal)
    "sageattn": ({}, AttnConfig("int8", "fp8")),
    "sageattn_qk_int8_pv_fp16_cuda": ({"qk_quant_gran": "per_warp"}, AttnConfig("int8", "fp16", "per_warp")),
    "sageattn_qk_int8_pv_fp8_cuda": ({"smooth_v": True, "pv_accum_dtype": "fp32"},
                                     AttnConfig("int8", "fp8", smooth_v=True)),
    "sageattn_qk_int8_pv_fp8_cuda_sm90": ({"smooth_k": False}, AttnConfig("int8", "fp8", smooth_k=False)),
    "sageattn_qk_int8_pv_fp16_triton": ({}, AttnConfig("int8", "fp16", "per_block")),
}


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_runs_its_level(name, layout):
    kwargs, cfg = ENTRY_POINTS[name]
    q, k, v = make_qkv(1, 4, 2, 200, 330, 64, layout=layout)
    o, lse = getattr(compat, name)(q, k, v, tensor_layout=layout, is_causal=True, sm_scale=0.1, return_lse=True,
                                   backend="reference", **kwargs)
    o_ref, lse_ref = reference_attention(q, k, v, cfg, tensor_layout=layout, is_causal=True, sm_scale=0.1,
                                         return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (1, 4, 200) and lse.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    # Bit-equal to the reference of that config: another level, granularity or smoothing
    # would quantize differently. And the reference is attention:
    assert error_metrics(o, exact64(q, k, v, layout, is_causal=True, sm_scale=0.1)[0])["cos"] > 0.99


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_lse_is_natural_log_of_the_unsmoothed_scores(layout):
    # thu-ml returns its base-2 kernel lse divided by log2(e), plus sm_scale * q.kbar with
    # smooth_k: the natural-log logsumexp of sm_scale * q k^T. K carries a large channel bias
    # (k_bias=3): dropping the smoothing term or keeping base 2 misses by far more than 0.05.
    q, k, v = make_qkv(2, 4, 4, 130, 260, 128, layout=layout, k_bias=3.0)
    scale = 0.3 / math.sqrt(128)
    _, lse = compat.sageattn_qk_int8_pv_fp8_cuda(q, k, v, layout, sm_scale=scale, return_lse=True, backend="reference")
    _, lse64 = exact64(q, k, v, layout, sm_scale=scale)
    assert (lse.double() - lse64).abs().max() < 0.05
    assert (lse.double() * math.log2(math.e) - lse64).abs().max() > 1.0  # base 2 would be visibly off


def test_auto_backend_on_cpu_runs_exact_attention_with_lse(caplog):
    q, k, v = make_qkv(1, 2, 2, 90, 120, 64, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="sageattn2"):
        o, lse = compat.sageattn(q, k, v, return_lse=True)
    o64, lse64 = exact64(q, k, v)
    torch.testing.assert_close(o.double(), o64.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse64.double(), rtol=1e-5, atol=1e-5)
    assert "cpu tensors have no quantized kernel" in caplog.text


# ---------------------------------------------------------------------------------------
# Arguments


def test_flash_attn_keywords_are_honoured_as_yunchang_passes_them():
    # yunchang's ring calls partial(sageattention.sageattn, tensor_layout="NHD", return_lse=True)
    # with flash-attn keywords; causal and softmax_scale must take effect.
    q, k, v = make_qkv(1, 2, 2, 128, 128, 64, layout="NHD")
    flash_kwargs = dict(dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_softmax=False)
    o, lse = compat.sageattn(q, k, v, tensor_layout="NHD", return_lse=True, backend="reference",
                             softmax_scale=0.05, causal=True, **flash_kwargs)
    o_ref, lse_ref = compat.sageattn(q, k, v, "NHD", is_causal=True, sm_scale=0.05, return_lse=True,
                                     backend="reference")
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    o_full = compat.sageattn(q, k, v, "NHD", sm_scale=0.05, backend="reference")
    assert (o.float() - o_full.float()).abs().max() > 0.1  # the causal mask made a difference


def test_conflicting_aliases_raise():
    q, k, v = make_qkv(1, 1, 1, 64, 64, 64)
    with pytest.raises(ValueError, match="conflicts"):
        compat.sageattn(q, k, v, is_causal=True, causal=False, backend="reference")
    with pytest.raises(ValueError, match="conflicts"):
        compat.sageattn(q, k, v, sm_scale=0.1, softmax_scale=0.2, backend="reference")


def test_unhonoured_arguments_are_logged_once_per_reason(caplog):
    q, k, v = make_qkv(1, 1, 1, 64, 64, 64)
    with caplog.at_level(logging.INFO, logger="sageattn2"):
        for _ in range(3):
            compat.sageattn(q, k, v, backend="reference", dropout_p=0.1, window_size=(128, 128), mystery=1)
            compat.sageattn_qk_int8_pv_fp8_cuda(q, k, v, pv_accum_dtype="fp32+fp16", backend="reference")
    lines = [r.getMessage() for r in caplog.records]
    for needle in ("dropout_p=0.1 cannot be honoured", "window_size=(128, 128) cannot be honoured",
                   "unknown argument 'mystery'", "pv_accum_dtype='fp32+fp16' runs our FP8 PV accumulation"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)


@pytest.mark.parametrize("capability,pv,expected", [
    ((8, 9), "fp8", "fp32+fp16"), ((12, 0), "fp8", "fp32+fp16"),  # SA2++: FP16 inside a tile
    ((9, 0), "fp8", "fp32+fp32"), (None, "fp8", "fp32+fp32"), ((8, 9), "fp16", "fp32"),
])
def test_reported_accumulation_follows_the_arch_table(capability, pv, expected):
    assert compat.our_accumulation(pv, capability) == expected


@pytest.mark.parametrize("fn,kwargs,match", [
    ("sageattn_qk_int8_pv_fp16_cuda", {"qk_quant_gran": "per_block"}, "qk_quant_gran"),
    ("sageattn_qk_int8_pv_fp16_cuda", {"pv_accum_dtype": "fp32+fp32"}, "pv_accum_dtype"),
    ("sageattn_qk_int8_pv_fp8_cuda", {"pv_accum_dtype": "fp16"}, "pv_accum_dtype"),
    ("sageattn_qk_int8_pv_fp8_cuda_sm90", {"pv_accum_dtype": "fp32+fp16"}, "pv_accum_dtype"),
    ("sageattn_qk_int8_pv_fp16_triton", {"quantization_backend": "cutlass"}, "quantization_backend"),
    ("sageattn", {"tensor_layout": "BHSD"}, "tensor_layout"),
])
def test_bad_arguments_raise_clear_errors(fn, kwargs, match):
    q, k, v = make_qkv(1, 1, 1, 64, 64, 64)
    with pytest.raises(ValueError, match=match):
        getattr(compat, fn)(q, k, v, backend="reference", **kwargs)


# ---------------------------------------------------------------------------------------
# varlen and masks


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_matches_per_sequence_attention(is_causal):
    lengths_q, lengths_k = [70, 0, 130, 1], [70, 5, 190, 64]
    if is_causal:
        lengths_k = list(lengths_q[:1]) + [5, 130, 1]
    q = make_qkv(1, 4, 2, sum(lengths_q), sum(lengths_k), 64, layout="NHD")[0][0]  # (total_q, 4, 64)
    _, k, v = (t[0] for t in make_qkv(1, 2, 2, 1, sum(lengths_k), 64, layout="NHD"))  # (total_k, 2, 64)
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    out = compat.sageattn_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), is_causal=is_causal,
                                 backend="reference")
    assert out.shape == q.shape
    cfg = AttnConfig("int8", "fp16", "per_block")
    for i in range(len(lengths_q)):
        a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if a == b:
            continue
        args = (q[None, a:b], k[None, c:e], v[None, c:e])
        o_ref, _ = reference_attention(*args, cfg, tensor_layout="NHD", is_causal=is_causal)
        torch.testing.assert_close(out[a:b], o_ref[0], rtol=0, atol=0)
        o64, _ = exact64(*args, "NHD", is_causal=is_causal)
        assert error_metrics(out[a:b], o64[0])["cos"] > 0.998


def test_varlen_rejects_inconsistent_cu_seqlens():
    q, k, v = (torch.randn(100, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    good = torch.tensor([0, 40, 100], dtype=torch.int32)
    with pytest.raises(ValueError, match="rise from 0 to 100"):
        compat.sageattn_varlen(q, k, v, torch.tensor([0, 40, 90]), good, 60, 60, backend="reference")
    with pytest.raises(ValueError, match="sequences"):
        compat.sageattn_varlen(q, k, v, good, torch.tensor([0, 10, 20, 100]), 60, 80, backend="reference")
    with pytest.raises(ValueError, match="integer"):
        compat.sageattn_varlen(q, k, v, good.float(), good, 60, 60, backend="reference")
    with pytest.raises(ValueError, match="no keys"):
        compat.sageattn_varlen(q, k, v, good, torch.tensor([0, 0, 100]), 60, 100, backend="reference")


@pytest.mark.parametrize("return_lse", [True, False])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("name", ["sageattn", "sageattn_qk_int8_pv_fp16_triton", "sageattn_qk_int8_pv_fp8_cuda"])
def test_a_mask_runs_exact_attention(name, kind, return_lse):
    # ComfyUI's --use-sage-attention passes attn_mask to `sageattn` (thu-ml's CUDA path drops it).
    q, k, v = make_qkv(2, 4, 2, 96, 150, 64, layout="NHD")
    keep = torch.rand(2, 1, 96, 150) > 0.3
    keep[..., 0] = True
    mask = keep if kind == "bool" else torch.where(keep, 0.0, -1e4) + 0.1 * torch.randn(2, 1, 96, 150)
    result = getattr(compat, name)(q, k, v, "NHD", attn_mask=mask, return_lse=return_lse, backend="reference")
    o, lse = result if return_lse else (result, None)
    qh, kh, vh = (t.transpose(1, 2).double().repeat_interleave(4 // t.shape[2], dim=1) for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) / 8.0
    s = s.masked_fill(~keep, float("-inf")) if kind == "bool" else s + mask.double()
    lse64 = torch.logsumexp(s, dim=-1)
    o64 = (torch.softmax(s, dim=-1) @ vh).transpose(1, 2)
    torch.testing.assert_close(o.double(), o64, rtol=2e-2, atol=2e-2)
    assert error_metrics(o, o64)["cos"] > 0.9999
    if return_lse:
        torch.testing.assert_close(lse.double(), lse64, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Merging partial outputs by lse, as ring attention does (reference emulation of each level)

# Level budgets against float64 exact attention (tests/test_reference.py measured them on the
# same make_qkv data): min cosine, max relative L1.
LEVEL_BUDGET = {"int8+fp16": (0.9989, 0.05), "int8+fp8": (0.9980, 0.07), "int4+fp16": (0.72, 0.85),
                "int4+fp8": (0.72, 0.85)}
MERGE_CONFIGS = {
    "mma-int8+fp16": AttnConfig("int8", "fp16"),
    "mma-int8+fp8": AttnConfig("int8", "fp8"),
    "mma-int4+fp16": AttnConfig("int4", "fp16", smooth_q=True),
    "mma-int4+fp8": AttnConfig("int4", "fp8", smooth_q=True),
    "wgmma-int8+fp16": AttnConfig("int8", "fp16", family="wgmma"),
    "wgmma-int8+fp8": AttnConfig("int8", "fp8", family="wgmma"),
}


def drifting_qkv(n_q, n_k, d, layout="HND"):
    """make_qkv data whose K mean drifts along the sequence (as video tokens do), so every
    shard has its own K mean: a shard lse without the K-smoothing term merges wrongly."""
    q, k, v = make_qkv(1, 2, 2, n_q, n_k, d, dtype=torch.float32)
    ramp = torch.linspace(-2.0, 2.0, n_k)[None, None, :, None] * torch.randn(1, 2, 1, d)
    k = (k + ramp).to(torch.bfloat16)
    q, v = q.to(torch.bfloat16), v.to(torch.bfloat16)
    return (q, k, v) if layout == "HND" else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def shard_bounds(n, shards):
    edges = [round(i * n / shards) for i in range(shards + 1)]
    return list(zip(edges, edges[1:]))


def check_merge(merged, merged_lse, whole, whole_lse, o64, lse64, level):
    """Merged shards against the unsharded call of the same level, both against exact."""
    min_cos, max_l1 = LEVEL_BUDGET[level]
    e_merged, e_whole = error_metrics(merged, o64), error_metrics(whole, o64)
    lse_merged, lse_whole = ((x.double() - lse64).abs().max().item() for x in (merged_lse, whole_lse))
    msg = f"merged {e_merged} lse {lse_merged:.4f}; whole {e_whole} lse {lse_whole:.4f}"
    print(msg)
    # Within the level's budget, or (data harder than the budget's) no worse than unsharded.
    assert e_merged["cos"] > min(min_cos, e_whole["cos"]) and e_merged["rel_l1"] < max(max_l1, e_whole["rel_l1"]), msg
    # Sharding changes the quantization groups (per-shard K mean, V scale), not the accuracy.
    assert e_merged["rel_l1"] < 1.25 * e_whole["rel_l1"] + 0.003, msg
    assert error_metrics(merged, whole)["cos"] > min_cos, msg
    assert lse_merged < 1.5 * lse_whole + 0.02, msg


@pytest.mark.parametrize("shards", [2, 3, 8])
@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_merged_kv_shards_match_the_unsharded_call(name, shards):
    cfg = MERGE_CONFIGS[name]
    q, k, v = drifting_qkv(128, 1000, 64)  # 1000 keys: shards are ragged, not whole key tiles
    whole, whole_lse = reference_attention(q, k, v, cfg, return_lse=True)
    parts = [reference_attention(q, k[:, :, a:b], v[:, :, a:b], cfg, return_lse=True) for a, b in shard_bounds(1000, shards)]
    merged, merged_lse = compat.merge_by_lse([o for o, _ in parts], [lse for _, lse in parts])
    o64, lse64 = exact64(q, k, v)
    check_merge(merged, merged_lse, whole, whole_lse, o64, lse64, cfg.precision)


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("name", ["mma-int8+fp8", "mma-int8+fp16", "mma-int4+fp8", "wgmma-int8+fp8"])
def test_causal_ring_merge_matches_the_unsharded_causal_call(name, ranks):
    # As yunchang's ring: rank r holds query shard r; key shard r is causal (the diagonal),
    # shards before it are full, shards after it are skipped.
    cfg = MERGE_CONFIGS[name]
    n = 512
    q, k, v = drifting_qkv(n, n, 64, layout="NHD")
    whole, whole_lse = reference_attention(q, k, v, cfg, tensor_layout="NHD", is_causal=True, return_lse=True)
    o64, lse64 = exact64(q, k, v, "NHD", is_causal=True)
    bounds = shard_bounds(n, ranks)
    outs, lses = [], []
    for r, (a, b) in enumerate(bounds):
        parts = [reference_attention(q[:, a:b], k[:, c:e], v[:, c:e], cfg, tensor_layout="NHD",
                                     is_causal=(j == r), return_lse=True) for j, (c, e) in enumerate(bounds[: r + 1])]
        o, lse = compat.merge_by_lse([p[0] for p in parts], [p[1] for p in parts], "NHD")
        outs.append(o)
        lses.append(lse)
    check_merge(torch.cat(outs, dim=1), torch.cat(lses, dim=2), whole, whole_lse, o64, lse64, cfg.precision)


def test_merge_is_exact_on_exact_partials():
    # The merge itself (independent of quantization): exact shards merge to exact attention.
    q, k, v = (torch.randn(1, 2, n, 32, dtype=torch.float64) for n in (50, 300, 300))
    parts = [exact_attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True, compute_dtype=torch.float64)
             for a, b in shard_bounds(300, 7)]
    merged, lse = compat.merge_by_lse([p[0] for p in parts], [p[1].double() for p in parts])
    o64, lse64 = exact_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(merged.double(), o64, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Providing `sageattention`


def _fake_thu_ml(tmp_path):
    pkg = tmp_path / "sageattention"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("MARK = 'thu-ml'\ndef sageattn(*a, **k):\n    return 'thu-ml'\n")
    (pkg / "core.py").write_text("")
    return tmp_path


def test_install_when_absent_and_not_over_thu_ml(no_sageattention_module, tmp_path, monkeypatch, caplog):
    assert not compat.thu_ml_present()
    assert compat.install_as_sageattention()
    import sageattention

    assert sageattention.__provider__ == "sageattn2" and sageattention.sageattn is compat.sageattn
    assert set(compat.THU_ML_NAMES) <= set(dir(sageattention))
    from sageattention.core import sageattn_qk_int8_pv_fp8_cuda_sm90  # where thu-ml defines them

    assert sageattn_qk_int8_pv_fp8_cuda_sm90 is compat.sageattn_qk_int8_pv_fp8_cuda_sm90

    del sys.modules["sageattention"], sys.modules["sageattention.core"]
    monkeypatch.syspath_prepend(str(_fake_thu_ml(tmp_path)))
    with caplog.at_level(logging.INFO, logger="sageattn2"):
        assert not compat.install_as_sageattention()
    assert "left in place" in caplog.text and "sageattention" not in sys.modules
    with caplog.at_level(logging.INFO, logger="sageattn2"):
        assert compat.install_as_sageattention(force=True)
    assert "replacing thu-ml" in caplog.text and sys.modules["sageattention"].__provider__ == "sageattn2"


@pytest.mark.parametrize("value,expect", [("", False), ("0", False), ("1", True), ("force", True), ("yes please", False)])
def test_provide_from_env(no_sageattention_module, monkeypatch, value, expect):
    monkeypatch.setenv(compat.ENV_PROVIDE, value)
    assert compat.provide_from_env() is expect
    assert ("sageattention" in sys.modules) is expect


def _python(code, env_extra, cwd="/"):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", compat.ENV_PROVIDE)}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_pack_import_provides_sageattention_when_asked():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pk', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pk'] = m; spec.loader.exec_module(m)\n"
        "import sageattention; print(getattr(sageattention, '__provider__', None))\n"
    )
    assert _python(code, {compat.ENV_PROVIDE: "1"}).strip() == "sageattn2"
    off = _python(code.replace("import sageattention; print(getattr(sageattention, '__provider__', None))",
                               "print('sageattention' in sys.modules)"), {})
    assert off.strip() == "False"


def test_pythonpath_shim_serves_ours_and_defers_to_thu_ml(tmp_path):
    code = ("import sageattention, sageattention.core, torch\n"
            "print(getattr(sageattention, '__provider__', getattr(sageattention, 'MARK', None)))\n"
            "q = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)\n"
            "o = sageattention.sageattn(q, q, q, tensor_layout='NHD')\n"
            "print(o if isinstance(o, str) else tuple(o.shape))\n")
    shim = str(ROOT / "shim")
    assert _python(code, {"PYTHONPATH": shim}).split("\n")[:2] == ["sageattn2", "(1, 64, 2, 64)"]
    fake = str(_fake_thu_ml(tmp_path))
    assert _python(code, {"PYTHONPATH": f"{shim}:{fake}"}).split("\n")[:2] == ["thu-ml", "thu-ml"]
    forced = _python(code, {"PYTHONPATH": f"{shim}:{fake}", compat.ENV_PROVIDE: "force"})
    assert forced.split("\n")[:2] == ["sageattn2", "(1, 64, 2, 64)"]


# ---------------------------------------------------------------------------------------
# yunchang's ring / Ulysses / USP on CPU (gloo), with these functions as its `sageattention`


@pytest.mark.parametrize("world,topologies,shapes", [
    (2, "ring,ulysses", "small,small_causal"),
    (4, "usp", "small_causal"),
])
def test_yunchang_sequence_parallel_on_gloo(tmp_path, world, topologies, shapes):
    # tests/gpu/seqpar_yunchang.py itself, on spawned CPU ranks: yunchang imports our module
    # (reference emulation of the kernels), shards the sequence, merges by our lse; the script
    # fails unless the gathered output matches our single-process call and exact attention.
    pytest.importorskip("yunchang")
    script = ROOT / "tests" / "gpu" / "seqpar_yunchang.py"
    cmd = [sys.executable, str(script), "--spawn", str(world), "--topologies", topologies, "--shapes", shapes,
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "seqpar.jsonl")]
    seen = {(r["shape"], r["topology"], r["attn"]) for r in rows}
    for shape in shapes.split(","):
        for top in topologies.split(","):
            for attn in ("SAGE_FP8_SM90", "SAGE_FP16"):
                assert (shape, top, attn) in seen, (shape, top, attn, seen)


def test_comfyui_use_sage_attention_runs_ours_through_the_shim():
    # Stock ComfyUI's --use-sage-attention imports `sageattention` at start-up and calls
    # sageattn(q, k, v, attn_mask=..., is_causal=False, tensor_layout=...): with the shim on
    # PYTHONPATH that is ours (on CPU: exact attention, the mask honoured).
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set")
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, r'{ROOT / 'tests' / 'comfy'}')\n"
        "import comfy_env\n"
        f"comfy_env.setup(r'{os.path.abspath(comfy)}', cpu=True)\n"
        "import comfy.ldm.modules.attention as a\n"
        "assert a.SAGE_ATTENTION_IS_AVAILABLE and sys.modules['sageattention'].__provider__ == 'sageattn2'\n"
        "q, k, v = torch.randn(2, 100, 256), torch.randn(2, 120, 256), torch.randn(2, 120, 256)\n"
        "mask = torch.zeros(2, 100, 120); mask[..., 90:] = float('-inf')\n"
        "for m in (None, mask):\n"
        "    out, ref = a.attention_sage(q, k, v, 4, mask=m), a.attention_pytorch(q, k, v, 4, mask=m)\n"
        "    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-4, (out - ref).abs().max()\n"
        "print('ok')\n"
    )
    assert _python(code, {"PYTHONPATH": str(ROOT / "shim")}).strip().endswith("ok")
