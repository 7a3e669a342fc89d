"""CPU tests of the Hadamard rotation option (AttnConfig(hadamard=True), numerics.md §1.6): an
orthonormal Walsh-Hadamard transform of Q and K over the head dim inside the quantizer leaves
Q K^T unchanged and spreads outlier channels, which rescues INT8 and INT4 Q K^T on data with
10x Q and 20x K channel outliers."""
from __future__ import annotations

import torch

from conftest import error_metrics, make_qkv
from sageattn2.config import AttnConfig
from sageattn2.reference import exact_attention, hadamard_rotate, reference_attention


def outlier_qkv(n=1024, d=128, seed=None):
    """h100-baseline data (randn, K + 3 randn channel bias) with 2 Q channels x10 and 2 other
    K channels x20."""
    q, k, v = make_qkv(1, 2, 2, n, n, d, q_outlier_channels=0, seed=seed)
    channels = torch.randperm(d)[:4]
    q, k = q.float(), k.float()
    q[..., channels[:2]] *= 10
    k[..., channels[2:]] *= 20
    return q.bfloat16(), k.bfloat16(), v


def test_rotation_is_orthonormal_and_keeps_qk():
    x = torch.randn(3, 5, 128, dtype=torch.float64)
    y = torch.randn(3, 7, 128, dtype=torch.float64)
    torch.testing.assert_close(hadamard_rotate(hadamard_rotate(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_rotate(x) @ hadamard_rotate(y).transpose(-1, -2), x @ y.transpose(-1, -2),
                               rtol=0, atol=1e-11)
    # Sylvester order: row i of H has sign (-1)^popcount(i & j) at column j.
    eye = torch.eye(8, dtype=torch.float64)
    signs = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(8)] for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(hadamard_rotate(eye), signs / 8 ** 0.5, rtol=0, atol=1e-15)


def test_rotation_spreads_outliers_for_int8_and_int4():
    q, k, v = outlier_qkv()
    ex, ex_lse = exact_attention(q, k, v, compute_dtype=torch.float32, return_lse=True)
    results, lse_err = {}, {}
    for qk, smooth_q in (("int8", False), ("int4", True)):
        for had in (False, True):
            cfg = AttnConfig(qk_dtype=qk, pv_dtype="fp16", smooth_q=smooth_q, hadamard=had)
            out, lse = reference_attention(q, k, v, cfg, return_lse=True)
            results[qk, had] = error_metrics(out, ex)
            lse_err[qk, had] = float((lse - ex_lse).abs().max())
            print(qk, "hadamard" if had else "plain", results[qk, had], "lse err", lse_err[qk, had])
    # The lse adds q . kbar with the unrotated q and kbar: a rotated kbar would be off by ~10.
    assert lse_err["int8", True] <= lse_err["int8", False]
    # Measured (1x2x1024x128): INT8 cos 0.9889 -> 0.99961, INT4 0.29 -> 0.88.
    assert results["int8", True]["cos"] >= 0.999 and results["int8", False]["cos"] <= 0.998
    assert results["int8", True]["rel_l1"] <= 0.5 * results["int8", False]["rel_l1"]
    assert results["int4", True]["cos"] >= results["int4", False]["cos"] + 0.3


def test_rotation_costs_nothing_without_outliers():
    q, k, v = make_qkv(1, 2, 2, 512, 512, 64, q_outlier_channels=0)
    ex, _ = exact_attention(q, k, v, compute_dtype=torch.float32)
    plain = error_metrics(reference_attention(q, k, v, AttnConfig(pv_dtype="fp16"))[0], ex)
    rotated = error_metrics(reference_attention(q, k, v, AttnConfig(pv_dtype="fp16", hadamard=True))[0], ex)
    assert rotated["rel_l1"] <= 1.2 * plain["rel_l1"], (rotated, plain)
