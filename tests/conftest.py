"""Shared test data: attention inputs with the outliers real diffusion models have.

Import from tests as `from conftest import make_qkv, error_metrics`.
"""
from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

try:
    import torch
except ModuleNotFoundError:
    pytest.exit("torch is not installed in this environment: `python tests/install_deps.py` installs "
                "its CPU build (the tests need no GPU)", returncode=4)

# Let `import sageattn2` work however pytest is started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    Nq: int,
    Nk: int,
    D: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    layout: str = "HND",
    seed: int | None = None,
    k_bias: float = 3.0,
    q_outlier_channels: int = 2,
    q_outlier_scale: float = 8.0,
    v_bias: float = 0.0,
):
    """q, k, v = randn, plus a per-channel bias k_bias * randn(1, Hkv, 1, D) in K (and
    v_bias * randn(...) in V) and `q_outlier_channels` random Q channels scaled by
    `q_outlier_scale`. A fresh seed is drawn unless given; it is printed so that a failing
    test's captured output says how to reproduce it."""
    if seed is None:
        seed = secrets.randbits(31)
    print(f"make_qkv(B={B}, Hq={Hq}, Hkv={Hkv}, Nq={Nq}, Nk={Nk}, D={D}, dtype={dtype}, seed={seed})")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    q = randn(B, Hq, Nq, D)
    k = randn(B, Hkv, Nk, D) + k_bias * randn(1, Hkv, 1, D)
    v = randn(B, Hkv, Nk, D) + v_bias * randn(1, Hkv, 1, D)
    outliers = torch.randperm(D, generator=gen)[: min(q_outlier_channels, D)]
    q[..., outliers] *= q_outlier_scale

    def finish(x):
        x = x.to(dtype)
        if layout == "NHD":
            x = x.transpose(1, 2)
        elif layout != "HND":
            raise ValueError(f"layout must be 'HND' or 'NHD', got {layout!r}")
        return x.contiguous().to(device)

    return finish(q), finish(k), finish(v)


def error_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity, relative L1 (sum|o - ref| / sum|ref|) and RMSE over the whole
    tensor, in float64."""
    o = out.detach().to(torch.float64).flatten().cpu()
    r = ref.detach().to(torch.float64).flatten().cpu()
    diff = o - r
    return {
        "cos": float((o @ r) / (o.norm() * r.norm())),
        "rel_l1": float(diff.abs().sum() / r.abs().sum()),
        "rmse": float(diff.square().mean().sqrt()),
    }


@pytest.fixture(autouse=True)
def fresh_sageattn_calls():
    """`sageattn` remembers how it serves each call signature (sageattn2/api.py `_calls`); a test
    that swaps what serves a call (monkeypatched plans or backends) must not meet an earlier
    test's memory. Cleared in every loaded copy of the package (the pack imports it as a
    subpackage too)."""
    for name, mod in list(sys.modules.items()):
        if name == "sageattn2.api" or name.endswith(".sageattn2.api"):
            mod._calls.clear()
    # The node tests' record of what reached stock attention starts empty in every test.
    support = sys.modules.get("test_nodes_support")
    if support is not None:
        support.STOCK.calls.clear()
