"""CPU tests of FP16 P.V accumulation in the reference (numerics.md §2.6, "SageAttention2++"):
exact fp16 rounding after every MMA k-step, operand scales under which the fp16 tile
accumulator cannot overflow, and the error it adds on the h100-baseline.md data."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from conftest import error_metrics, make_qkv
from sageattn2.config import AttnConfig, PVAccum
from sageattn2.reference import _tile_pv_fp16_acc, exact_attention, quantize_v, reference_attention, round_to_fp16

# The module the reference reads (sys.modules), not the package attribute: the node tests load the
# pack's `sageattn2.config` as a second module and that copy replaces the attribute.
C = importlib.import_module("sageattn2.config")

FP8_ACC16 = AttnConfig(pv_dtype="fp8", pv_accum="fp16")
FP16_ACC16 = AttnConfig(pv_dtype="fp16", pv_accum="fp16")


def baseline_qkv(h, n, d, dtype=torch.bfloat16, seed=None):
    """h100-baseline.md data: randn, K + 3 randn per-channel bias, no Q outlier channels."""
    return make_qkv(1, h, h, n, n, d, dtype=dtype, q_outlier_channels=0, seed=seed)


def test_round_to_fp16_is_one_rounding_to_nearest_even():
    two = 2.0
    cases = {
        1 + two ** -11 + two ** -40: 1 + two ** -10,  # above the tie: up (a cast through fp32 gives 1)
        1 + two ** -11: 1.0,  # tie: to even
        1 + 3 * two ** -11: 1 + two ** -9,  # tie: to even (up)
        65519.99: 65504.0,
        65520.0: math.inf,  # the tie past the largest finite value
        -65520.0: -math.inf,
        two ** -25: 0.0,  # half the smallest subnormal, tie to even (0)
        3 * two ** -26: two ** -24,
        two ** -14 - two ** -25: two ** -14,  # subnormal range rounds on the 2^-24 grid
        0.0: 0.0,
    }
    x = torch.tensor(list(cases), dtype=torch.float64)
    assert round_to_fp16(x).tolist() == list(cases.values())
    # Values that fit in fp32: torch's fp32 -> fp16 cast is a single correct rounding.
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-26, 17, (100_000,), generator=g))).double()
    assert torch.equal(round_to_fp16(y), y.float().half().double())


def test_fp16_accumulator_rounds_after_every_k_step():
    """2048 + 1 is not an fp16 value: each k-step's sum lands on 2048 again, so the tile sum
    stays 2048 where an fp32 accumulator gives 2048 + steps."""
    for pv, k_step in (("fp8", 32), ("fp16", 16)):
        p = torch.zeros(1, 64)
        v = torch.zeros(64, 1)
        p[0, 0], v[0, 0] = 1.0, 2048.0
        for start in range(0, 64, k_step):
            p[0, start + 1], v[start + 1, 0] = 1.0, 1.0
        assert C.MMA_K_STEP[C.PVDType(pv)] == k_step
        assert _tile_pv_fp16_acc(p, v, k_step).item() == 2048.0
        assert (p @ v).item() == 2048.0 + 64 // k_step
        # One rounding per step, not per product: 2048 + 0.5 + 0.5 + 1 in one 16-key step is 2050.
        p2, v2 = torch.zeros(1, 16), torch.zeros(16, 1)
        p2[0, :4] = 1.0
        v2[:4, 0] = torch.tensor([2048.0, 0.5, 0.5, 1.0])
        assert _tile_pv_fp16_acc(p2, v2, 16).item() == 2050.0


def test_fp8_v_is_scaled_to_the_fp16_accumulation_bound():
    q, k, v = baseline_qkv(2, 130, 64)
    vq = quantize_v(v, FP8_ACC16)
    assert vq.values.abs().amax() == C.FP8_V_MAX_FP16_ACC
    # Dequantized, V is still V to E4M3's precision (half a step: 2^-4 relative; a subnormal
    # step 2^-9 of the scale below 2^-6).
    deq = (vq.values * vq.scale[:, :, None])[:, :, :130, :64]
    torch.testing.assert_close(deq, v.float(), rtol=2 ** -4 + 1e-6, atol=2 ** -10 * float(vq.scale.max()))
    # The bound numerics.md argues: 64 products of P <= 448 and V <= 2 sum to an fp16 value.
    bound = C.tile_shape(C.Family.MMA, 128).k_tile * C.FP8_MAX * C.FP8_V_MAX_FP16_ACC
    assert bound <= C.FP16_MAX and round_to_fp16(torch.tensor(bound, dtype=torch.float64)) == bound


@pytest.mark.parametrize("cfg", [FP8_ACC16, FP16_ACC16], ids=lambda c: c.uri)
def test_worst_case_tile_cannot_overflow(cfg, monkeypatch):
    """Every key of a tile at the row max (P at its largest) and V at its largest magnitude:
    the fp16 tile sums stay finite and the output is V. With the fp32 path's scales instead
    (P up to 1 for 16-bit PV, V up to 448 for FP8) the same tile overflows."""
    n, d = 64, 64
    q = torch.zeros(1, 1, n, d, dtype=torch.float16)
    k = torch.zeros_like(q)
    big = 60000.0 if cfg.pv_dtype is C.PVDType.FP16 else 1.0
    v = torch.full_like(q, big)
    v[..., 1::2] = -big
    out, lse = reference_attention(q, k, v, cfg.with_(smooth_k=False), return_lse=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), v.float(), rtol=2e-3, atol=0)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(n)), rtol=0, atol=1e-5)
    if cfg.pv_dtype is C.PVDType.FP16:
        monkeypatch.setattr(C, "P_LOG2_MAX_FP16_ACC_16BIT", 0.0)
    else:
        monkeypatch.setattr(C, "FP8_V_MAX_FP16_ACC", C.FP8_MAX)
    out_unscaled, _ = reference_attention(q, k, v, cfg.with_(smooth_k=False))
    assert not torch.isfinite(out_unscaled).all()


def test_int8_fp8_fp16_accumulation_within_budget_on_baseline_data():
    """The accuracy budget of issue 15 (cos >= 0.9992, rel L1 <= 0.039 for int8+fp8) holds with
    FP16 accumulation, and it adds almost nothing to FP8 PV's own error."""
    # Eight heads: the error varies mostly with each head's K bias draw, so more heads narrow
    # the spread (2 x 2048 keys crossed 0.039 in about 1 of 25 draws, 8 x 1024 stayed at
    # 0.0365-0.0376 over 48).
    q, k, v = baseline_qkv(8, 1024, 128)
    ex, _ = exact_attention(q, k, v, compute_dtype=torch.float32)
    acc32, _ = reference_attention(q, k, v, AttnConfig(pv_dtype="fp8"))
    acc16, _ = reference_attention(q, k, v, FP8_ACC16)
    m32, m16 = error_metrics(acc32, ex), error_metrics(acc16, ex)
    print("int8+fp8 fp32 acc", m32, "fp16 acc", m16)
    assert m16["cos"] >= 0.9992 and m16["rel_l1"] <= 0.039, m16
    # Over fresh data (48 draws) the ratio ran 0.989-1.005, so 1.03 leaves room for sampling spread.
    assert m16["rel_l1"] <= 1.03 * m32["rel_l1"], (m16, m32)
    assert not torch.equal(acc16, acc32)  # the fp16 rounding is really applied


def test_fp16_pv_fp16_accumulation_error_is_small():
    q, k, v = baseline_qkv(2, 1024, 64, dtype=torch.float16)
    ex, ex_lse = exact_attention(q, k, v, compute_dtype=torch.float64, return_lse=True)
    acc32, _ = reference_attention(q, k, v, AttnConfig(pv_dtype="fp16"))
    acc16, lse16 = reference_attention(q, k, v, FP16_ACC16, return_lse=True)
    m32, m16 = error_metrics(acc32, ex), error_metrics(acc16, ex)
    print("int8+fp16 fp32 acc", m32, "fp16 acc", m16)
    assert m16["rel_l1"] <= 1.1 * m32["rel_l1"] + 1e-3, (m16, m32)
    assert float((lse16 - ex_lse).abs().max()) <= 2e-2  # P's 2^-7 scale is removed from the lse


def test_sharp_attention_keeps_small_probabilities():
    """Peaked rows (scores 6x the baseline's): P keeps its full FP8 range (it is V that is
    scaled for the fp16 bound), so FP16 accumulation costs no more here than on flat rows."""
    q, k, v = baseline_qkv(2, 1024, 64)
    q = (q.float() * 6).bfloat16()
    ex, _ = exact_attention(q, k, v, compute_dtype=torch.float32)
    m32 = error_metrics(reference_attention(q, k, v, AttnConfig(pv_dtype="fp8"))[0], ex)
    m16 = error_metrics(reference_attention(q, k, v, FP8_ACC16)[0], ex)
    assert m16["rel_l1"] <= 1.05 * m32["rel_l1"], (m16, m32)


def test_int4_fp8_fp16_accumulation_error_is_known():
    """INT4+FP8 with FP16 accumulation (the fastest level on Ada/Blackwell): on the baseline
    data its error is INT4's, FP16 accumulation adds < 2 % to it."""
    q, k, v = baseline_qkv(2, 1024, 128)
    ex, _ = exact_attention(q, k, v, compute_dtype=torch.float32)
    cfg = AttnConfig(qk_dtype="int4", pv_dtype="fp8", smooth_q=True)
    m32 = error_metrics(reference_attention(q, k, v, cfg)[0], ex)
    m16 = error_metrics(reference_attention(q, k, v, cfg.with_(pv_accum="fp16"))[0], ex)
    print("int4+fp8 fp32 acc", m32, "fp16 acc", m16)
    # Over fresh data (6 seeds) the ratio ran 0.98-1.016, so 1.03 leaves room for sampling spread.
    assert m16["rel_l1"] <= 1.03 * m32["rel_l1"], (m16, m32)


def test_invalid_fp16_accumulation_requests():
    q, k, v = baseline_qkv(1, 64, 64)  # bf16
    with pytest.raises(ValueError, match="fp16 inputs"):
        reference_attention(q, k, v, FP16_ACC16)
    with pytest.raises(ValueError, match="fp16"):
        reference_attention(q, k, v, FP8_ACC16, fp8_acc_mantissa_bits=13)
    with pytest.raises(ValueError, match="mma family"):
        AttnConfig(pv_accum="fp16", family="wgmma")
    with pytest.raises(ValueError, match="pv_accum"):
        AttnConfig(pv_accum="fp8")
    assert "acc-fp16" in FP8_ACC16.uri and "acc" not in AttnConfig().uri
    assert FP8_ACC16.pv_accum is PVAccum.FP16
