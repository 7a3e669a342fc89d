"""The quantization error over long, nearly uniform attention (docs/numerics.md §1.5 and §5,
"Long sequences"): the output is an average over ~N_eff keys, so its size shrinks like
1/sqrt(N_eff) while an error shared by every key does not; the method must have none.
Float64 exact attention against the PyTorch reference of each level, on CPU."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from sageattn2.config import AttnConfig
from sageattn2.reference import exact_attention, mean_on_input_grid, reference_attention

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
import fuzz_attention  # noqa: E402


def _shared_rounding_error(v: torch.Tensor, vbar: torch.Tensor) -> torch.Tensor:
    """Per channel: the mean over keys of (V - vbar rounded to V's dtype) - (V - vbar), in
    units of the channel's standard deviation / sqrt(N) (the size of a mean of N keys)."""
    x = v.float() - vbar
    err = (x.to(v.dtype).float() - x).mean(dim=0)
    return err.abs() / (v.float().std(dim=0) / v.shape[0] ** 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [0.0, 2.0])
def test_v_mean_on_the_input_grid_subtracts_without_a_shared_error(dtype, bias):
    g = torch.Generator().manual_seed(3)
    n, d = 1 << 16, 64
    v = (torch.randn(n, d, generator=g) + bias * torch.randn(d, generator=g)).to(dtype)
    plain = v.float().mean(dim=0)
    on_grid = mean_on_input_grid(plain, v.float().abs().amax(dim=0), dtype)
    assert _shared_rounding_error(v, on_grid).max() < 0.02
    if dtype is torch.bfloat16:  # the plain mean's shared error (fp16's is smaller, bf16's the issue)
        assert _shared_rounding_error(v, plain).mean() > 0.05
    # It still removes the channel mean, to within half a spacing at max|V|.
    spacing = 2.0 ** (torch.floor(torch.log2(v.float().abs().amax(dim=0))) - (7 if dtype is torch.bfloat16 else 10))
    assert ((on_grid - plain).abs() <= spacing / 2).all()


def test_mean_on_input_grid_edges():
    amax = torch.tensor([4.5, 1.0, 0.99, 0.0, float("inf"), 2.0 ** -130])
    mean = torch.tensor([0.013, 0.003, 0.003, 0.0, 1.0, 2.0 ** -139])
    got = mean_on_input_grid(mean, amax, torch.bfloat16).tolist()
    assert got == [0.0, 0.0, 2.0 ** -8, 0.0, 1.0, 2.0 ** -137 * 0]  # spacing 2^-5, 2^-7, 2^-8; 2^-137
    assert mean_on_input_grid(torch.tensor([0.013]), torch.tensor([4.5]), torch.float16).item() == 12 * 2.0 ** -10


LEVELS = [("int8", "fp16", "fp32"), ("int8", "fp8", "fp32"), ("int8", "fp8", "fp16"), ("int4", "fp8", "fp32")]


@pytest.mark.parametrize("qk, pv, accum", LEVELS)
def test_reference_error_does_not_grow_with_the_keys(qk, pv, accum):
    """Zero-mean V (the fuzz's `normal` data, bf16) over 1K to 32K keys, V smoothing on: the
    rel L1 stays flat and under the level's floor (fuzz case #674 reached 0.089 at 53K keys
    with int8+fp16, against 0.012 without V smoothing)."""
    floors = fuzz_attention.load_floors()
    base = fuzz_attention.make_case(1, 674, 131072, 1 << 31)
    cfg = AttnConfig(qk, pv, "per_thread", smooth_k=True, smooth_q=qk == "int4", smooth_v=True, pv_accum=accum)
    errors = []
    for n_k in (1024, 8192, 32768):
        case = dataclasses.replace(base, heads_q=1, heads_kv=1, n_q=16, n_k=n_k, head_dim=64, layout="HND",
                                   view="contiguous", dtype="bfloat16", data="normal")
        q, k, v = fuzz_attention.make_inputs(case, 1, torch.device("cpu"))
        ref, _ = exact_attention(q, k, v)
        o, _ = reference_attention(q, k, v, cfg)
        errors.append(fuzz_attention.metrics(o, ref)["rel_l1"])
    floor = floors[(f"{qk}+{pv}", "normal")]["rel_l1"]
    assert max(errors) <= floor, errors
    assert errors[-1] <= 1.25 * errors[0] + 0.002, errors
