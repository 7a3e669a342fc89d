"""What NVRTC makes of the kernels' shared constants, checked in PTX without a GPU.

INFINITY (csrc/include/sa2/common.cuh) must be a folded constant: spelt as a division it
became an IEEE division with a slow-path subroutine at every masking site, and spelt as
__int_as_float() a call that kept the masking selects as branches. Neither is a wrong result,
so only the generated code shows it.
"""
from __future__ import annotations

import pytest

from sageattn2 import archs, kernels, nvrtc

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


def ptx_of(source: str) -> str:
    """PTX for compute_90 through the same headers and options as the kernels."""
    opts = [o for o in kernels.options(archs.arch(9, 0)) if not o.startswith("--gpu-architecture")]
    return NV.ptx(source, "probe.cu", kernels.headers(), opts + ["--gpu-architecture=compute_90"])


def test_infinity_is_a_folded_constant():
    ptx = ptx_of(PROBE)
    body = ptx[ptx.index(".entry probe"):]
    assert "0fFF800000" in body  # -inf as an immediate
    assert "0f7F800000" in body  # +inf as an immediate
    assert "div." not in body and "call" not in body
