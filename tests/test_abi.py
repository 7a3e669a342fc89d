"""The kernel boundary, checked without a GPU.

- NVRTC compiles the ABI header with the static_asserts of sageattn2/abi.py (every offset and
  size of every parameter struct, every enum code) and refuses a deliberately wrong layout.
- The quantizer's group rules are ones the kernel evaluates as config.py says.
- Launch arguments are built per call: threads launching the same plan concurrently, through a
  launcher that releases the GIL mid-launch, each launch with their own pointers.
"""
from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch

from sageattn2 import abi, archs, kernels, nvrtc
from sageattn2.backends import mma
from sageattn2.config import (
    NATIVE_HEAD_DIMS,
    AttnConfig,
    Family,
    Granularity,
    k_group_of_key,
    q_group_of_row,
    tile_shape,
)

NV, _ = nvrtc.load()
needs_nvrtc = pytest.mark.skipif(NV is None, reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")
STRUCTS = [(abi.MmaAttnParams, "sa2::MmaAttnParams"), (abi.WgmmaAttnParams, "sa2::WgmmaAttnParams"),
           (abi.QuantizeParams, "sa2::QuantizeParams"), (abi.SmoothV16Params, "sa2::SmoothV16Params")]


def compile_abi(extra_source: str = "") -> None:
    source = "\n".join(['#include "sa2/abi.cuh"', abi.enum_asserts()]
                       + [abi.layout_asserts(s, c) for s, c in STRUCTS] + [extra_source])
    NV.compile(source, "abi_check.cu", kernels.headers(), kernels.options(archs.arch(8, 0)), [])


@needs_nvrtc
def test_nvrtc_accepts_the_python_layouts():
    compile_abi()


@needs_nvrtc
def test_nvrtc_refuses_a_layout_python_would_fill_differently():
    class Swapped(ctypes.Structure):  # SmoothV16Params with two int fields in the wrong order
        _fields_ = [(n, t) for n, t in abi.SmoothV16Params._fields_]
        _fields_[1], _fields_[2] = _fields_[2], _fields_[1]

    with pytest.raises(nvrtc.NvrtcError, match="ABI: sa2::SmoothV16Params::heads"):
        compile_abi(abi.layout_asserts(Swapped, "sa2::SmoothV16Params"))
    with pytest.raises(nvrtc.NvrtcError, match="ABI: int\\(sa2::PVType::kFp8\\)"):
        compile_abi('static_assert(int(sa2::PVType::kFp8) == 0, "ABI: int(sa2::PVType::kFp8) differs");')


def test_every_kernel_unit_carries_the_checks():
    for a in (archs.arch(*cc) for cc in archs.PRODUCT_ARCHS):
        for k in kernels.product_kernels(a):
            src = k.source()
            assert f"sizeof({k.params_c})" in src and "sa2::PVType::kFp8" in src, k.name


def test_product_builds_hold_what_dispatch_reaches():
    names = {cc: {k.name for k in kernels.product_kernels(archs.arch(*cc))} for cc in archs.PRODUCT_ARCHS}
    hopper = names[(9, 0)]
    assert sorted(n for n in hopper if n.startswith("wgmma")) == [
        "wgmma-d128-bf16-overlap", "wgmma-d128-fp16-overlap", "wgmma-d128-fp8-sequential3wg",
        "wgmma-d64-bf16-sequential3wg", "wgmma-d64-fp16-sequential3wg", "wgmma-d64-fp8-sequential3wg"]
    # Emulated INT4 (Hopper, sm_120) compiles only when forced.
    assert not any("int4" in n for n in hopper | names[(12, 0)])
    assert not any("fp8" in n for n in names[(8, 6)]) and not any("wgmma" in n for n in names[(8, 9)])
    # FP8 PV accumulates in fp16 on GeForce Ada/Blackwell (archs.py), in fp32 on Hopper's mma path.
    assert "mma-d256-int4-fp8-acc16" in names[(8, 9)] and "mma-d256-int4-fp8" not in names[(8, 9)]
    assert "mma-d256-int8-fp8-acc16" in names[(12, 0)] and "mma-d256-int8-fp8" not in names[(12, 0)]
    assert "mma-d128-int8-fp8" in hopper and not any(n.endswith("acc16") for n in hopper)
    # No product build holds fp16 accumulation of 16-bit PV (dispatch never picks it).
    assert not any(n.endswith("fp16-acc16") for cc in names for n in names[cc])
    # Every kernel that may exist has a layout the ABI check accepts; bf16 cannot accumulate in fp16.
    with pytest.raises(ValueError, match="bf16"):
        kernels.mma_kernel(128, False, abi.PV_BF16, True)


def test_mma_pv_accum_reaches_the_kernel_unit():
    """The accumulator is a template argument of the unit (not only a name) and a field the
    host fills; the launch constants include the shared memory without Q smoothing."""
    k16 = kernels.mma_kernel(128, False, abi.PV_FP8, True)
    k32 = kernels.mma_kernel(128, False, abi.PV_FP8)
    assert "sa2::PVAccum::kFp16>" in k16.expr and "sa2::PVAccum::kFp32>" in k32.expr
    assert k16.name != k32.name and k16.source() != k32.source()
    assert dict(k16.info)["smem_no_qbar"] == "SA2_T::kQbarOffset"
    assert "pv_accum" in [name for name, _ in abi.MmaAttnParams._fields_]
    assert "fp8_max" in [name for name, _ in abi.StatsJob._fields_]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("for_q", [True, False], ids=["q", "k"])
@pytest.mark.parametrize("gran", list(Granularity), ids=lambda g: g.value)
@pytest.mark.parametrize("family,dpad", [(fam, d) for fam in Family for d in NATIVE_HEAD_DIMS[fam]])
def test_group_rule_shifts_reproduce_config_groups(family, dpad, gran, for_q):
    """The quantizer evaluates GroupRule with shifts (slice_rows and mod_div powers of two):
    every tile in config.py must give config's group of every row (two blocks, so the block
    offset is checked too)."""
    tile = tile_shape(family, dpad)
    slice_rows, mod_groups, mod_div = mma._group_rule(gran, tile, for_q)
    block = tile.cta_q if for_q else tile.k_tile
    assert slice_rows >= 8 and slice_rows & (slice_rows - 1) == 0 and block % slice_rows == 0
    assert mod_div in (1, 2, 4, 8) and 1 <= mod_groups <= 8
    slice_shift, div_shift = slice_rows.bit_length() - 1, mod_div.bit_length() - 1
    per_block = (block >> slice_shift) * mod_groups
    group_of = q_group_of_row if for_q else k_group_of_key
    for row in range(2 * block):
        r = row % block
        local = (r >> slice_shift) * mod_groups + ((r & 7) >> div_shift)
        assert (row // block) * per_block + local == group_of(row, tile, gran), row


# ---------------------------------------------------------------------------------------------


class YieldingKernel:
    """A launcher that releases the GIL between reading its arguments' address and copying
    them (as ctypes does around the driver call), and records what it copied."""

    def __init__(self, info):
        self.info, self.threads, self.smem = info, 256, 0
        self.seen = []

    def launch(self, grid, kernel_params, stream, smem=None):
        struct_addr = ctypes.c_void_p.from_buffer_copy(kernel_params).value  # abi.param_pointer bytes
        time.sleep(0.0005)
        self.seen.append((threading.get_ident(), ctypes.string_at(struct_addr, ctypes.sizeof(abi.QuantizeParams))))


class FakeDeviceKernels:
    tag = "sm_89"
    arch = archs.arch(8, 9)

    def __init__(self):
        self.kernel = YieldingKernel({"threads": 256, "stats_chunk_rows": 256, "stats_stage_bytes": 32768,
                                      "v_tile_tokens": 64})

    def get(self, kernel, max_dynamic_smem=None):
        return self.kernel


def test_concurrent_launches_of_one_plan_keep_their_own_pointers():
    dk = FakeDeviceKernels()
    q = torch.empty(1, 2, 256, 64, dtype=torch.float16)
    cfg = AttnConfig(pv_dtype="fp16", smooth_k=False)
    plan = mma._QkvPlan(dk, q, q, q, cfg, tile_shape(Family.MMA, 64), 64, None, False)
    q_ptr_word = plan.launches[0][3].slot("rows[0].x.ptr")
    expected = {}

    def worker(i):
        base = (i + 1) << 32
        expected[threading.get_ident()] = base
        for _ in range(25):
            plan.enqueue(base, base + 16, base + 32, base + 4096, 0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(dk.kernel.seen) == 8 * 25
    for ident, raw in dk.kernel.seen:
        words = (ctypes.c_uint64 * (len(raw) // 8)).from_buffer_copy(raw)
        assert words[q_ptr_word] == expected[ident]

