"""What the backends hand the driver, without a GPU: the quantizer's launches (kernels, grids,
shared memory, every field of the parameter struct) and the Hopper TMA descriptors, against
values worked out by hand from the kernels' contracts (quant_kernels.cuh, attn_wgmma.cuh)."""
from __future__ import annotations

import ctypes

import torch

from sageattn2 import abi, archs
from sageattn2.backends import mma, wgmma
from sageattn2.config import AttnConfig, Family, tile_shape

QUANT_INFO = {"threads": 256, "stats_chunk_rows": 256, "stats_stage_bytes": 32768, "v_tile_tokens": 64}


class RecordingKernel:
    """Copies the parameter struct when launched, as the driver does."""

    def __init__(self, name, info, params=abi.QuantizeParams):
        self.name, self.info, self.threads, self.smem = name, info, info["threads"], info.get("smem", 0)
        self.params, self.calls = params, []

    def launch(self, grid, kernel_params, stream, smem=None):
        addr = ctypes.c_void_p.from_buffer_copy(kernel_params).value  # abi.param_pointer bytes
        self.calls.append((grid, smem, self.params.from_buffer_copy(ctypes.string_at(addr, ctypes.sizeof(self.params)))))


class FakeDeviceKernels:
    tag, index = "sm_90a", 0
    arch = archs.arch(9, 0)

    def __init__(self, info=QUANT_INFO):
        self.kernels, self.info = {}, info

    def get(self, kernel, max_dynamic_smem=None):
        if kernel.name not in self.kernels:
            self.kernels[kernel.name] = RecordingKernel(kernel.name, dict(self.info))
        return self.kernels[kernel.name]


def test_quantizer_launches_for_int8_fp8_with_k_smoothing():
    dk = FakeDeviceKernels()
    q = torch.empty(1, 4, 300, 128, dtype=torch.bfloat16)
    kv = torch.empty(1, 2, 200, 128, dtype=torch.bfloat16)
    plan = mma._QkvPlan(dk, q, kv, kv, AttnConfig(pv_dtype="fp8"), tile_shape(Family.MMA, 128), 128, None, False)
    assert (plan.nq_pad, plan.nk_pad, plan.v_pad) == (384, 256, 256)
    # Launch 1: Q blocks (4 heads x 3) then the K and V statistics (2 heads x 2 jobs x 1 chunk);
    # launch 2: K blocks and V^T tiles (2 heads x (4 + 4)).
    (k1, grid1, smem1, t1), (k2, grid2, smem2, t2) = plan.launches
    assert (k1.name, grid1, smem1) == ("quant-bf16-d128-qstats", (16, 1, 1), 2 * 128 * 128 + 4 * (2 * 128 + 2 * 32))
    assert (k2.name, grid2, smem2) == ("quant-bf16-d128-kvq", (16, 1, 1), 2 * 64 * 128 + 4 * (2 * 128 + 2 * 4))
    base, q_ptr, k_ptr, v_ptr = 1 << 40, 0x1000, 0x2008, 0x3000  # K misaligned: no 16-byte loads
    plan.enqueue(q_ptr, k_ptr, v_ptr, base, 7)
    p1 = k1.calls[0][2]
    seg1 = [(p1.segment[i].kind, p1.segment[i].ctas) for i in range(p1.segments)]
    assert seg1 == [(1, 12), (0, 4)]
    p2 = k2.calls[0][2]
    assert [(p2.segment[i].kind, p2.segment[i].ctas) for i in range(p2.segments)] == [(2, 16)]
    at = lambda name: base + plan.offsets[name]
    for p in (p1, p2):  # the same call's pointers in both launches
        q_rows, k_rows, sp, v = p.rows[0], p.rows[1], p.stats, p.v
        assert (q_rows.x.ptr, q_rows.vec, q_rows.out, q_rows.scale, q_rows.mean) == (q_ptr, 1, at("q"), at("q_scale"), None)
        assert (q_rows.block_rows, q_rows.blocks_per_head, q_rows.groups_per_block, q_rows.n, q_rows.n_pad) == (128, 3, 32, 300, 384)
        assert (q_rows.rule.slice_shift, q_rows.rule.mod_groups, q_rows.rule.div_shift) == (5, 8, 0)
        assert (k_rows.x.ptr, k_rows.vec, k_rows.out, k_rows.mean) == (k_ptr, 0, at("k"), at("kbar"))
        assert (k_rows.rule.slice_shift, k_rows.rule.mod_groups, k_rows.rule.div_shift) == (6, 4, 1)
        assert q_rows.dot_vec is None and q_rows.mean_shift == 0
        assert (sp.jobs, sp.heads, sp.n, sp.chunks) == (2, 2, 200, 1)
        assert (sp.job[0].x.ptr, sp.job[0].mean, sp.job[0].fp8_scale, sp.job[0].vec) == (k_ptr, at("kbar"), None, 0)
        assert (sp.job[1].x.ptr, sp.job[1].mean, sp.job[1].fp8_scale, sp.job[1].fp8_inv) == (
            v_ptr, None, at("v_scale"), at("v_inv"))
        assert sp.job[1].partial - sp.job[0].partial == 2 * 1 * 3 * 128 * 4
        assert sp.job[1].counter - sp.job[0].counter == 2 * 4
        assert (v.x.ptr, v.tiles_per_head, v.n_pad, v.inv, v.out, v.vec) == (v_ptr, 4, 256, at("v_inv"), at("v"), 1)
        assert (p.d, p.int4, p.kv_heads) == (128, 0, 2)


def test_quantizer_with_q_dot_kbar_runs_statistics_first():
    dk = FakeDeviceKernels()
    q = torch.empty(2, 2, 64, 64, dtype=torch.float16)
    plan = mma._QkvPlan(dk, q, q, q, AttnConfig(pv_dtype="fp16"), tile_shape(Family.WGMMA, 64), 64, None, True)
    (k1, grid1, smem1, _), (k2, grid2, _, _) = plan.launches
    assert (k1.name, grid1, smem1) == ("quant-fp16-d64-stats", (4, 1, 1), 32768)  # 2 x 2 heads, K only
    assert k2.name == "quant-fp16-d64-kvq" and grid2 == (2 * 2 * 1 + 2 * 2 * 1, 1, 1)
    plan.enqueue(16, 32, 48, 1 << 40, 0)
    p2 = k2.calls[0][2]
    assert p2.rows[0].dot_vec == (1 << 40) + plan.offsets["kbar"] and p2.v.tiles_per_head == 0
    assert [(p2.segment[i].kind, p2.segment[i].ctas) for i in range(2)] == [(2, 4), (1, 4)]


class FakeDriver:
    def __init__(self):
        self.maps = []

        def encode(dst, dtype, rank, base, dims, strides, box, elem, interleave, swizzle, l2, oob):
            self.maps.append((dtype, base.value, list(dims), list(strides), list(box)[:2], swizzle))
            return 0

        self.encode_tiled = encode

    def ensure_context(self, index):
        pass


def test_wgmma_tensor_maps_and_scalars():
    dk = FakeDeviceKernels()
    dk.drv = FakeDriver()
    kernel = RecordingKernel("wgmma-d128-fp8-sequential3wg", {"threads": 512, "smem": 200000, "cta_q": 192,
                                                              "k_tile": 128}, abi.WgmmaAttnParams)
    launch = wgmma._Launch(dk, kernel, b=2, hq=8, hk=2, nq=1000, nk=999, dpad=128, d=128, pv=abi.PV_FP8,
                           bf16_out=True, causal=True, sm_scale=0.125, q_strides=(8 * 1024 * 128, 1024 * 128, 128),
                           k_strides=(2 * 1024 * 128, 1024 * 128, 128), v_strides=(2 * 128 * 1024, 128 * 1024, 1024),
                           qs_strides=(8 * 64, 64), ks_strides=(2 * 32, 32), vs_strides=(256, 128),
                           o_strides=(8 * 1000 * 128, 128, 8 * 128), lse_strides=(8000, 1000), out_align=0)
    assert launch.grid == (6, 8, 2)
    launch(0x10000, 0x20000, 0x30000, 1, 2, 3, 0x40000, 0x50000, 0)
    q_map, k_map, v_map = dk.drv.maps
    assert q_map == (0, 0x10000, [128, 1000, 8, 2], [128, 1024 * 128, 8 * 1024 * 128], [128, 192], 3)
    assert k_map == (0, 0x20000, [128, 999, 2, 2], [128, 1024 * 128, 2 * 1024 * 128], [128, 128], 3)
    assert v_map == (0, 0x30000, [1008, 128, 2, 2], [1024, 128 * 1024, 2 * 128 * 1024], [128, 128], 3)
    a = kernel.calls[0][2]
    p = a.p
    assert (p.q_scale, p.k_scale, p.v_scale, p.out, p.lse) == (1, 2, 3, 0x40000, 0x50000)
    assert (p.num_q, p.num_k, p.group_size, p.head_dim, p.causal, p.out_bf16, p.out_vec2, p.out_rows16) == (
        1000, 999, 4, 128, 1, 1, 1, 1)
    assert p.scale_log2 == ctypes.c_float(ctypes.c_float(0.125).value * ctypes.c_float(1.4426950408889634).value).value
    launch(0x10000, 0x20000, 0x30000, 1, 2, 3, 0x40000, 0, 0)  # same pointers: descriptors reused
    assert len(dk.drv.maps) == 3
    b = kernel.calls[1][2]
    assert bytes(b.tm_q) == bytes(a.tm_q) and b.p.lse is None


def test_wgmma_16bit_v_map_reads_the_callers_layout():
    dk = FakeDeviceKernels()
    dk.drv = FakeDriver()
    kernel = RecordingKernel("k", {"threads": 384, "smem": 200000, "cta_q": 128, "k_tile": 128}, abi.WgmmaAttnParams)
    launch = wgmma._Launch(dk, kernel, b=1, hq=2, hk=2, nq=64, nk=77, dpad=128, d=120, pv=abi.PV_FP16,
                           bf16_out=False, causal=False, sm_scale=0.1, q_strides=(2 * 128 * 128, 128 * 128, 128),
                           k_strides=(2 * 128 * 128, 128 * 128, 128), v_strides=(77 * 2 * 120, 120, 2 * 120),
                           qs_strides=(16, 8), ks_strides=(8, 4), vs_strides=(0, 0), o_strides=(2 * 64 * 120, 120, 240),
                           lse_strides=(0, 0), out_align=4)
    launch(0x10000, 0x20000, 0x30000, 1, 2, 0, 0x40004, 0, 0)
    assert dk.drv.maps[2] == (6, 0x30000, [120, 77, 2, 1], [480, 240, 77 * 2 * 240], [64, 128], 3)
    p = kernel.calls[0][2].p
    assert (p.out_vec2, p.out_rows16, p.out_bf16) == (1, 0, 0)
