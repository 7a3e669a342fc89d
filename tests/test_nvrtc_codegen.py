"""What NVRTC makes of the kernels' shared constants, checked in PTX without a GPU.

INFINITY (csrc/include/sa2/common.cuh) must be a folded constant: spelt as a division it
became an IEEE division with a slow-path subroutine at every masking site, and spelt as
__int_as_float() a call that kept the masking selects as branches. Neither is a wrong result,
so only the generated code shows it.

The A/B switches of the mma kernel are checked the same way: each must change its kernel's PTX.
"""
from __future__ import annotations

import re

import pytest

from sageattn2 import abi, archs, kernels, nvrtc

NV, _ = nvrtc.load()
pytestmark = pytest.mark.skipif(NV is None, reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")

PROBE = r"""
#include "sa2/common.cuh"
extern "C" __global__ void probe(float* x, const int* key, int nk) {
  const int i = threadIdx.x;
  float v = x[i];
  if (key[i] >= nk) v = -INFINITY;    // the kernels' key mask
  x[i] = v < INFINITY ? v : 0.0f;     // the quantizers' finite check
}
"""


def ptx_of(source: str, arch: tuple[int, int] = (9, 0), extra: tuple[str, ...] = (), name: str = "probe.cu") -> str:
    """PTX for the arch's virtual target through the same headers and options as the kernels."""
    opts = [o for o in kernels.options(archs.arch(*arch), extra) if not o.startswith("--gpu-architecture")]
    return NV.ptx(source, name, kernels.headers(), opts + [f"--gpu-architecture=compute_{arch[0]}{arch[1]}"])


def test_infinity_is_a_folded_constant():
    ptx = ptx_of(PROBE)
    body = ptx[ptx.index(".entry probe"):]
    assert "0fFF800000" in body  # -inf as an immediate
    assert "0f7F800000" in body  # +inf as an immediate
    assert "div." not in body and "call" not in body


# The A/B switches of the mma kernel (the `#ifndef SA2_MMA_*` block of attn_mma.cuh, set through
# SAGEATTN2_NVRTC_FLAGS by tests/gpu/rtx_round.sh): each must still compile and change the code
# of a kernel it is meant for, or a device A/B would time the default twice. A new switch needs a
# row here.
SWITCH_PROBES = {
    "TWO_BARRIERS": ("1", (8, 9), 128),  # only kernels with one V stage (100 KB SMs, D=128)
    "MIN_CTAS_D64": ("2", (9, 0), 64),
    "INT_ROW_MAX": ("1", (9, 0), 64),
    "KSCALE_AHEAD": ("1", (9, 0), 64),
    "TILE_UNROLL": ("2", (9, 0), 64),
}


def header_switches() -> dict[str, str]:
    text = kernels.headers()["sa2/attn_mma.cuh"]
    return dict(re.findall(r"#ifndef SA2_MMA_(\w+)\n#define SA2_MMA_\1 (\d+)", text))


def kernel_ptx(arch: tuple[int, int], head_dim: int, extra: tuple[str, ...] = ()) -> str:
    k = kernels.mma_kernel(head_dim, False, abi.PV_FP16)
    return ptx_of(k.source() + f"template __global__ void {k.expr}(const {k.params_c});\n", arch, extra, f"{k.name}.cu")


def test_every_switch_has_a_probe():
    assert set(header_switches()) == set(SWITCH_PROBES)


@pytest.mark.parametrize("switch", sorted(SWITCH_PROBES))
def test_switch_changes_its_kernel(switch):
    value, arch, head_dim = SWITCH_PROBES[switch]
    assert header_switches()[switch] != value
    assert kernel_ptx(arch, head_dim, (f"-DSA2_MMA_{switch}={value}",)) != kernel_ptx(arch, head_dim)
