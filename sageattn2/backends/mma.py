"""mma.sync backend (sm80/86/89/120; Hopper runs it too, with INT4/FP8 emulated by the compiler).

`attention()` = `quantize()` (the fused quantizers, csrc/include/sa2/quant_kernels.cuh) +
`launch()` (one attention kernel, csrc/include/sa2/attn_mma.cuh). Both halves are public: the
Hopper backend reuses `quantize()` with its own tile shape, and benchmarks can time the kernel
alone.

Kernels are compiled by NVRTC and launched through the driver API on the current CUDA stream
(sageattn2/loader.py); no torch C++ extension. A call fills a fresh copy of a per-shape
parameter template (sageattn2/abi.py), so concurrent calls never share an argument buffer.

Where the hardware lacks a precision (sageattn2/archs.py):
- FP8 PV needs e4m3 mma.sync (sm_89+). Elsewhere `unsupported_reason` declines fp8 PV with a
  reason saying so; the dispatcher then runs fp16 PV (docs/numerics.md §4).
- INT4 QK is emulated on Hopper (about 10x slower than INT8), so there an int4 request runs
  the INT8 kernel (logged once) unless the caller passes `force_int4_emulation=True`.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass

import torch

from .. import abi, kernels
from ..config import (
    NATIVE_HEAD_DIMS,
    AttnConfig,
    Family,
    Granularity,
    PVAccum,
    PVDType,
    QKDType,
    TileShape,
    num_k_groups,
    num_q_groups,
    padded_head_dim,
    tile_shape,
)
from ..loader import DeviceKernels, KernelBuildError, kernels_for_device
from . import KernelError, calls, input_reason

# Largest dynamic shared memory a quantizer launch may ask for (every product arch has it).
QUANT_MAX_SMEM = 96 * 1024
V_TILE_TOKENS = 64  # FP8 V^T token rows are padded to a multiple of this (checked against the kernel)


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _stream(device) -> int:
    return calls.current_stream(device.index)


def _group_rule(gran: Granularity, tile: TileShape, for_q: bool) -> tuple[int, int, int]:
    """(slice_rows, mod_groups, mod_div) of abi GroupRule for config.q_group_of_row /
    k_group_of_key."""
    if for_q:
        if gran is Granularity.PER_THREAD:
            return tile.warp_q, 8, 1
        return (tile.warp_q if gran is Granularity.PER_WARP else tile.cta_q), 1, 8
    return (tile.k_tile, 4, 2) if gran is Granularity.PER_THREAD else (tile.k_tile, 1, 8)


def _strides_vec_ok(x_hnd: torch.Tensor) -> bool:
    """16-byte loads of whole rows are legal given these strides (the base is checked per call)."""
    return x_hnd.shape[-1] % 8 == 0 and all(s % 8 == 0 for s in x_hnd.stride()[:3])


# The kernel's tile offsets are 32-bit: a 64-key tile of V^T (FP8, padded_head_dim rows of
# v_pad tokens) or of 16-bit V (64 rows of 2 * stride_n bytes) must stay below 2^31.
_MAX_TILE_OFFSET = 1 << 31


def _v16_strides_ok(v_hnd: torch.Tensor) -> bool:
    """16-bit V strides the kernel can read in place (16-byte rows, 32-bit tile offsets)."""
    return _strides_vec_ok(v_hnd) and 2 * 64 * v_hnd.stride(2) < _MAX_TILE_OFFSET


def _v16_direct_ok(v_hnd: torch.Tensor) -> bool:
    """The kernel reads 16-bit V in place with 16-byte cp.async: rows must be aligned."""
    return _v16_strides_ok(v_hnd) and v_hnd.data_ptr() % 16 == 0


def _log2_exact(x: int) -> int:
    if x <= 0 or x & (x - 1):
        raise KernelError(f"{x} is not a power of two")
    return x.bit_length() - 1


def _check_input(x_hnd: torch.Tensor, dpad: int) -> None:
    b, h, n, d = x_hnd.shape
    if b < 1 or h < 1 or n < 1:
        raise KernelError(f"empty input: batch {b} heads {h} tokens {n}")
    if b > 65535 or h > 65535 or n >= 2**31:
        raise KernelError("input too large")
    if not (1 <= d <= dpad and dpad in (64, 128, 256)):
        raise KernelError(f"bad head dims d {d} D {dpad} (D must be 64, 128 or 256)")


# ---------------------------------------------------------------------------------------
# Quantization


@dataclass
class Quantized:
    """Device buffers one attention launch reads (all HND, zero-padded, on q's device).

    q, k          int8 (B, H, N_pad, D) or INT4-packed (B, H, N_pad, D/2), low nibble = even channel
    q_scale       float32 (B, Hq, num_q_groups); k_scale float32 (B, Hkv, num_k_groups)
    kbar          float32 (B, Hkv, D) key mean (K smoothing) or None
    qbar, qbar_scale  int8 (B, Hq, Nq_pad / q_mean_rows, D) and float32 (B, Hq, blocks): Q
                  smoothing's block means quantized to INT8, or None
    q_dot_kbar    float32 (B, Hq, Nq_pad): q_row . kbar for the lse, or None
    v             FP8 PV: uint8 E4M3 V^T (B, Hkv, D, v_pad), tokens in V_TOKEN_ORDER inside
                  every 16; 16-bit PV: V as (B, Hkv, Nk, d or D) in the input dtype, possibly a
                  strided view of the caller's tensor
    v_scale       float32 (B, Hkv, D) FP8 dequant scale, or None
    vbar          float32 (B, Hkv, D) V mean on V's grid (V smoothing), or None
    """

    tile: TileShape
    head_dim: int
    padded_head_dim: int
    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    kbar: torch.Tensor | None
    qbar: torch.Tensor | None
    qbar_scale: torch.Tensor | None
    q_dot_kbar: torch.Tensor | None
    v: torch.Tensor
    v_scale: torch.Tensor | None
    vbar: torch.Tensor | None


_ALIGN = 256  # byte alignment of each operand inside the workspace (TMA needs 16)
_counter_sets: dict = {}  # (device index, stream) -> int32 tickets, zero between launches
_retired_counters: list = []


_counters_lock = threading.Lock()


def _counters(device, stream: int, slots: int) -> int:
    """Ticket counters for the statistics' last-CTA finalize: one zeroed set per stream (the
    kernel leaves them zero), so calls on different streams never share one. Under a lock: two
    threads meeting a stream together must not each make a set and drop the other's, whose
    address a plan may already hold."""
    key = (device.index, stream)
    with _counters_lock:
        t = _counter_sets.get(key)
        if t is None or t.numel() < slots:
            if t is not None:
                _retired_counters.append(t)  # plans keep its address: never freed
            t = torch.zeros(max(slots, 4096), dtype=torch.int32, device=device)
            _counter_sets[key] = t
        return t.data_ptr()


_KIND_STATS, _KIND_Q, _KIND_KV = 0, 1, 2


class _QkvPlan:
    """The quantizer launches for one (shapes, strides, dtype, cfg, tile): workspace layout,
    kernels, grids and parameter templates; `enqueue` fills in the pointers of one call."""

    def __init__(self, dk: DeviceKernels, q_h, k_h, v_h, cfg: AttnConfig, tile: TileShape, dpad: int,
                 v_pad_multiple: int | None, with_q_dot_kbar: bool):
        for x in (q_h, k_h, v_h):
            _check_input(x, dpad)
        b, hq, nq, d = q_h.shape
        hk, nk = k_h.shape[1], k_h.shape[2]
        if (k_h.shape[0], v_h.shape[0]) != (b, b) or v_h.shape[1:3] != (hk, nk) or hq % hk:
            raise KernelError("q, k, v shapes disagree")
        int4 = cfg.qk_dtype is QKDType.INT4
        width = dpad // 2 if int4 else dpad
        bf16 = q_h.dtype == torch.bfloat16
        self.tile, self.head_dim, self.dpad = tile, d, dpad
        self.nq_pad, self.nk_pad = _round_up(nq, tile.cta_q), _round_up(nk, tile.k_tile)
        self.fp8 = cfg.pv_dtype is PVDType.FP8
        if self.fp8 and not dk.arch.fp8_mma:
            raise KernelError(f"FP8 V needs the e4m3 conversion of sm_89+; {dk.tag} has none")
        # Launch constants come from the kernel itself (quant_kernels.cuh).
        probe = dk.get(kernels.quant_kernel(bf16, dpad, "kvq"), QUANT_MAX_SMEM).info
        threads, chunk_rows = probe["threads"], probe["stats_chunk_rows"]
        stage_bytes, v_tile = probe["stats_stage_bytes"], probe["v_tile_tokens"]
        if v_tile != V_TILE_TOKENS:
            raise KernelError(f"the quantizer's V tile is {v_tile} tokens, this code expects {V_TILE_TOKENS}")
        self.v_pad = 0
        if self.fp8:
            multiple = v_pad_multiple or tile.k_tile
            if multiple % v_tile:
                raise ValueError(f"v_pad_multiple must be a multiple of {v_tile}, got {multiple}")
            self.v_pad = _round_up(nk, multiple)
        smooth_k = cfg.smooth_k
        stats_jobs = int(smooth_k) + int(self.fp8 or cfg.smooth_v)
        chunks = -(-nk // chunk_rows)
        stats_floats = b * hk * chunks * 3 * dpad
        f32, i8, u8 = torch.float32, torch.int8, torch.uint8
        parts = [
            ("q", (b, hq, self.nq_pad, width), i8),
            ("q_scale", (b, hq, num_q_groups(nq, tile, cfg.granularity)), f32),
            ("k", (b, hk, self.nk_pad, width), i8),
            ("k_scale", (b, hk, num_k_groups(nk, tile, cfg.granularity)), f32),
        ]
        with_dot = with_q_dot_kbar and smooth_k
        if smooth_k:
            parts.append(("kbar", (b, hk, dpad), f32))
            if with_dot:
                parts.append(("q_dot_kbar", (b, hq, self.nq_pad), f32))
        if cfg.smooth_v:
            parts.append(("vbar", (b, hk, dpad), f32))
        if self.fp8:
            parts += [("v", (b, hk, dpad, self.v_pad), u8), ("v_scale", (b, hk, dpad), f32),
                      ("v_inv", (b, hk, dpad), f32)]
        if stats_jobs:
            parts.append(("stats", (stats_jobs * stats_floats,), f32))
        self.q_mean_rows = tile.q_mean_rows if cfg.smooth_q else 0
        if cfg.smooth_q:
            blocks = self.nq_pad // tile.q_mean_rows
            parts += [("qbar", (b, hq, blocks, dpad), i8), ("qbar_scale", (b, hq, blocks), f32)]
        self.parts, self.offsets, size = parts, {}, 0
        for name, shape, dtype in parts:
            self.offsets[name] = size
            size += _round_up(math.prod(shape) * dtype.itemsize, _ALIGN)
        self.nbytes = size
        slots = b * hk
        self.counter_slots = 2 * slots

        # The parameter struct, every per-call-constant field set.
        p = abi.QuantizeParams()
        rows_smem = []
        for i, (x, block, n_pad, for_q) in enumerate(((q_h, tile.cta_q, self.nq_pad, True),
                                                      (k_h, tile.k_tile, self.nk_pad, False))):
            rows_per_pass = threads * 8 // dpad
            if not (8 <= block <= 256 and block % rows_per_pass == 0 and n_pad % block == 0):
                raise KernelError(f"bad block_rows {block} for head dim {dpad}")
            slice_rows, mod_groups, mod_div = _group_rule(cfg.granularity, tile, for_q)
            job = p.rows[i]
            job.x.stride_b, job.x.stride_h, job.x.stride_n = x.stride()[:3]
            job.heads, job.n, job.block_rows = x.shape[1], x.shape[2], block
            job.blocks_per_head, job.n_pad = n_pad // block, n_pad
            job.rule.slice_shift, job.rule.mod_groups = _log2_exact(slice_rows), mod_groups
            job.rule.div_shift = _log2_exact(mod_div)
            job.groups_per_block = (block >> job.rule.slice_shift) * mod_groups
            mean_blocks = 1
            if for_q and self.q_mean_rows:
                if self.q_mean_rows < 8 or block % self.q_mean_rows:
                    raise KernelError(f"q_mean_rows {self.q_mean_rows} must divide block_rows {block}")
                job.mean_shift = _log2_exact(self.q_mean_rows)
                mean_blocks = block // self.q_mean_rows
            rows_smem.append(2 * block * dpad + 4 * ((mean_blocks + 1) * dpad + 2 * job.groups_per_block))
        p.rows[0].dot_heads = hk
        p.d, p.int4, p.kv_heads = d, int(int4), slots
        v_smem = 0
        if self.fp8:
            vj = p.v
            vj.x.stride_b, vj.x.stride_h, vj.x.stride_n = v_h.stride()[:3]
            vj.heads, vj.n, vj.tiles_per_head, vj.n_pad = hk, nk, self.v_pad // v_tile, self.v_pad
            v_smem = (2 * v_tile + 2 * 4) * dpad
        stats_inputs = []
        if smooth_k:
            stats_inputs.append("k")
        if cfg.smooth_v or self.fp8:
            stats_inputs.append("v")
        sp = p.stats
        sp.jobs, sp.heads, sp.n, sp.chunks = len(stats_inputs), hk, nk, chunks
        for i, which in enumerate(stats_inputs):
            src = k_h if which == "k" else v_h
            sp.job[i].x.stride_b, sp.job[i].x.stride_h, sp.job[i].x.stride_n = src.stride()[:3]
            if which == "v" and self.fp8:
                sp.job[i].fp8_max = cfg.v_fp8_max  # 448, or 2 for an fp16 P.V accumulator
            if which == "v" and cfg.smooth_v:  # vbar on V's grid (reference.mean_on_input_grid)
                sp.job[i].mean_grid_bits = -round(math.log2(torch.finfo(v_h.dtype).eps))  # 7 bf16, 10 fp16

        q_seg = (_KIND_Q, b * hq * p.rows[0].blocks_per_head)
        kv_seg = (_KIND_KV, slots * (p.rows[1].blocks_per_head + p.v.tiles_per_head))
        stats_seg = (_KIND_STATS, slots * len(stats_inputs) * chunks)
        q_smem, kv_smem = rows_smem[0], max(rows_smem[1], v_smem)
        if not stats_inputs:
            launches = [((q_seg, kv_seg), max(q_smem, kv_smem))]
        elif with_dot:  # the Q blocks need k-bar: after the statistics
            launches = [((stats_seg,), stage_bytes), ((kv_seg, q_seg), max(q_smem, kv_smem))]
        else:  # Q first, so the statistics' K / V reads are the freshest traffic for launch 2
            launches = [((q_seg, stats_seg), max(q_smem, stage_bytes)), ((kv_seg,), kv_smem)]

        self.launches = []
        for segments, smem in launches:
            if smem > QUANT_MAX_SMEM:
                raise KernelError(f"quantize_qkv needs {smem} bytes of shared memory")
            ctas = sum(c for _, c in segments)
            if ctas == 0:
                continue
            if ctas >= 2**31:
                raise KernelError("input too large for one grid")
            kinds = 0
            for kind, _ in segments:
                kinds |= 1 << kind
            name = "stats" if kinds == 1 << _KIND_STATS else "qstats" if kinds & (1 << _KIND_STATS) else "kvq"
            lp = abi.QuantizeParams.from_buffer_copy(p)
            lp.segments = len(segments)
            for j, (kind, c) in enumerate(segments):
                lp.segment[j].kind, lp.segment[j].ctas = kind, c
            rotate = cfg.hadamard and name in kernels.QUANT_ROW_KINDS  # numerics.md §1.6
            kernel = dk.get(kernels.quant_kernel(bf16, dpad, name, rotate), QUANT_MAX_SMEM)
            self.launches.append((kernel, (ctas, 1, 1), smem, abi.ParamTemplate(lp)))

        # Per-call fields, as word slots of the first launch's template; a later launch's bytes
        # are the previous launch's, patched where its template differs (the segments).
        first = self.launches[0][3]
        templates = [t for _, _, _, t in self.launches]
        self._patches = [()] + [a.diff(b) for a, b in zip(templates, templates[1:])]
        self.device = q_h.device
        slot = first.slot
        inputs = {"q": ["rows[0].x.ptr"], "k": ["rows[1].x.ptr"], "v": ["v.x.ptr"] if self.fp8 else []}
        vec_words = {"q": ["rows[0].vec"], "k": ["rows[1].vec"], "v": ["v.vec"]}
        from_base = [("rows[0].out", "q"), ("rows[0].scale", "q_scale"), ("rows[1].out", "k"),
                     ("rows[1].scale", "k_scale"), ("rows[0].qbar", "qbar"), ("rows[0].qbar_scale", "qbar_scale"),
                     ("rows[0].dot_out", "q_dot_kbar"), ("rows[1].mean", "kbar"), ("v.mean", "vbar"),
                     ("v.inv", "v_inv"), ("v.out", "v")]
        if with_dot:
            from_base.append(("rows[0].dot_vec", "kbar"))
        per_job = b * hk * chunks * 3 * dpad * 4  # bytes of one statistics job's partials
        base_slots, counter_slots = [], []
        for i, which in enumerate(stats_inputs):
            j = f"stats.job[{i}]."
            inputs[which].append(j + "x.ptr")
            vec_words[which].append(j + "vec")
            base_slots.append((slot(j + "partial"), self.offsets["stats"] + i * per_job))
            counter_slots.append((slot(j + "counter"), i * slots * 4))
            from_base.append((j + "mean", "kbar" if which == "k" else "vbar"))
            if which == "v" and self.fp8:
                from_base += [(j + "fp8_scale", "v_scale"), (j + "fp8_inv", "v_inv")]
        base_slots += [(slot(path), self.offsets[part]) for path, part in from_base if part in self.offsets]
        self._base_slots = tuple(base_slots)
        self._counter_slots = tuple(counter_slots)
        self._input_slots = tuple(tuple(slot(p) for p in inputs[x]) for x in ("q", "k", "v"))
        self._vec_slots = tuple(tuple(first.word_slot(p) for p in vec_words[x]) for x in ("q", "k", "v"))
        self._vec_strides = (_strides_vec_ok(q_h), _strides_vec_ok(k_h), _strides_vec_ok(v_h))
        self._counters_of: dict[int, int] = {}  # stream -> its ticket counters (kept alive in _counter_sets)

    def pointer(self, base: int, name: str) -> int | None:
        off = self.offsets.get(name)
        return None if off is None else base + off

    def params(self, stream: int, base: int, q_ptr: int, k_ptr: int, v_ptr: int) -> list[bytes]:
        """Each launch's parameter bytes for one call: the workspace at `base`, the inputs at
        the pointers, the ticket counters of `stream`."""
        buf = self.launches[0][3].new()
        for i, off in self._base_slots:
            buf[i] = base + off
        if self._counter_slots:
            counters = self._counters_of.get(stream)
            if counters is None:
                counters = self._counters_of[stream] = _counters(self.device, stream, self.counter_slots)
            for i, off in self._counter_slots:
                buf[i] = counters + off
        for ptr, slots, vec_slots, strides_ok in zip((q_ptr, k_ptr, v_ptr), self._input_slots, self._vec_slots,
                                                     self._vec_strides):
            vec = int(strides_ok and ptr % 16 == 0)
            for i in slots:
                buf[i] = ptr
            for i in vec_slots:
                buf[i] = vec
        out = []
        for patch in self._patches:
            for i, value in patch:
                buf[i] = value
            out.append(bytes(buf))
        return out

    def enqueue(self, q_ptr: int, k_ptr: int, v_ptr: int, base: int, stream: int):
        """The quantizer launches of one call (`quantize()`; attention plans memoise `params`)."""
        blobs = self.params(stream, base, q_ptr, k_ptr, v_ptr)
        for (kernel, grid, smem, _), blob in zip(self.launches, blobs):
            kernel.launch(grid, abi.param_pointer(blob), stream, smem)

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor | None:
        for part, shape, dtype in self.parts:
            if part == name:
                off = self.offsets[name]
                return buf[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        return None


def _device_kernels(device) -> DeviceKernels:
    dk, why = kernels_for_device(device)
    if dk is None:
        raise KernelError(why)
    return dk


def _smooth_v16(dk: DeviceKernels, v_h: torch.Tensor, dpad: int, vbar: torch.Tensor | None, stream: int):
    """V - vbar (or a plain copy) as (B, Hkv, Nk, D) contiguous in V's dtype, zero-padded."""
    b, h, n, d = v_h.shape
    out = torch.empty((b, h, n, dpad), dtype=v_h.dtype, device=v_h.device)
    p = abi.SmoothV16Params()
    p.x.ptr = v_h.data_ptr()
    p.x.stride_b, p.x.stride_h, p.x.stride_n = v_h.stride()[:3]
    p.heads, p.n, p.d, p.D = h, n, d, dpad
    p.mean = None if vbar is None else vbar.data_ptr()
    p.out, p.vec = out.data_ptr(), int(_v16_direct_ok(v_h))
    kernel = dk.get(kernels.smooth_v16_kernel(v_h.dtype == torch.bfloat16))
    blocks = min(-(-(n * (dpad // 8)) // kernel.threads), 1024)
    kernel.launch_struct((blocks, h, b), p, stream, 0)
    return out


def quantize(q, k, v, *, layout: str, cfg: AttnConfig, tile: TileShape | None = None,
             v_pad_multiple: int | None = None, with_q_dot_kbar: bool = False,
             dk: DeviceKernels | None = None) -> Quantized:
    """Runs the fused quantizers on q, k, v (fp16/bf16, `layout` HND or NHD, any strides with a
    contiguous last dim) for `cfg`, on the current stream; for 16-bit PV with V smoothing or a
    V that cannot be read in place, also the V copy kernel.

    `tile` defaults to `tile_shape(cfg.family, D)` and sets the groups (the Hopper family passes
    its own); `v_pad_multiple` the FP8 V^T token padding (default tile.k_tile, a multiple of
    64); `with_q_dot_kbar` also returns q . kbar for the lse (needs smooth_k).
    """
    dk = dk or _device_kernels(q.device)
    d = q.shape[-1]
    dpad = padded_head_dim(d, cfg.family)
    tile = tile or tile_shape(cfg.family, dpad)
    q_h, k_h, v_h = (_hnd(x, layout) for x in (q, k, v))
    stream = _stream(q.device)
    dk.drv.ensure_context(dk.index)
    try:
        plan = _QkvPlan(dk, q_h, k_h, v_h, cfg, tile, dpad, v_pad_multiple, with_q_dot_kbar)
    except KernelBuildError as e:
        raise KernelError(str(e)) from None
    buf = torch.empty(plan.nbytes, dtype=torch.uint8, device=q.device)
    plan.enqueue(q.data_ptr(), k.data_ptr(), v.data_ptr(), buf.data_ptr(), stream)
    vbar = plan.view(buf, "vbar")
    if plan.fp8:
        v_op = plan.view(buf, "v")
    elif cfg.smooth_v or not _v16_direct_ok(v_h):
        v_op = _smooth_v16(dk, v_h, dpad, vbar, stream)
    else:
        v_op = v_h
    view = functools.partial(plan.view, buf)
    return Quantized(tile, d, dpad, view("q"), view("q_scale"), view("k"), view("k_scale"), view("kbar"),
                     view("qbar"), view("qbar_scale"), view("q_dot_kbar"), v_op, view("v_scale"), vbar)


# ---------------------------------------------------------------------------------------
# Backend interface


def _shape_reason(q, k, v, layout) -> str | None:
    return input_reason(q, k, v, layout, NATIVE_HEAD_DIMS[Family.MMA][-1])


def attention_kernel_for(cfg: AttnConfig, dtype: torch.dtype, head_dim: int) -> kernels.Kernel:
    pv = abi.PV_FP8 if cfg.pv_dtype is PVDType.FP8 else abi.PV_16BIT[dtype]
    return kernels.mma_kernel(padded_head_dim(head_dim, Family.MMA), cfg.qk_dtype is QKDType.INT4, pv,
                              cfg.pv_accum is PVAccum.FP16)


def unsupported_reason(q, k, v, *, layout, cfg, is_causal):
    why = _shape_reason(q, k, v, layout)
    if why:
        return why
    if cfg.family is not Family.MMA:
        return f"config is laid out for the {cfg.family.value} family"
    if cfg.pv_accum is PVAccum.FP16 and cfg.pv_dtype is PVDType.FP16 and q.dtype != torch.float16:
        return f"an fp16 P.V accumulator multiplies fp16 V; {q.dtype} inputs need pv_accum='fp32'"
    dk, why = kernels_for_device(q.device)
    if dk is None:
        return why
    if "mma" not in dk.families:
        return f"{dk.tag} has no mma family"
    if cfg.pv_dtype is PVDType.FP8 and not dk.arch.fp8_mma:
        return f"FP8 PV needs e4m3 mma.sync (sm_89+); {dk.tag} has none: use fp16 PV"
    if cfg.pv_dtype is PVDType.FP8:
        nk = _hnd(k, layout).shape[2]
        dpad = padded_head_dim(q.shape[-1], cfg.family)
        if dpad * _round_up(nk, V_TILE_TOKENS) >= _MAX_TILE_OFFSET:
            return f"FP8 V^T of {nk} keys at head dim {dpad} exceeds the kernel's 32-bit tile offsets"
    return dk.available(attention_kernel_for(cfg, q.dtype, q.shape[-1]))


_int4_note_logged = False


def _contiguous_bhn_strides(shape, layout: str) -> tuple[int, int, int]:
    """(B, H, N) element strides of a new contiguous tensor of `shape` in `layout`."""
    s3 = shape[3]
    s2 = shape[2] * s3
    st = (shape[1] * s2, s2, s3)
    return st if layout == "HND" else (st[0], st[2], st[1])


# Per-call plans, keyed by everything except data pointers. Bounded: a workflow uses a few
# shapes; anything beyond the bound starts over.
_MAX_PLANS = 256


def plan_key(q, k, v, *rest) -> tuple:
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device) + rest


def _attention_params(cfg: AttnConfig, q_h, k_h, dpad: int, tile: TileShape, nq_pad: int, nk_pad: int, v_pad: int,
                      v_strides, o_strides, is_causal: bool, sm_scale: float) -> abi.MmaAttnParams:
    b, hq, nq, d = q_h.shape
    hk, nk = k_h.shape[1], k_h.shape[2]
    a = abi.MmaAttnParams()
    a.batch, a.heads_q, a.heads_kv, a.nq, a.nk, a.head_dim, a.padded_head_dim = b, hq, hk, nq, nk, d, dpad
    a.nq_pad, a.nk_pad, a.v_pad = nq_pad, nk_pad, v_pad
    a.v_stride_b, a.v_stride_h, a.v_stride_n = v_strides
    a.o_stride_b, a.o_stride_h, a.o_stride_n = o_strides
    a.qk_int4 = int(cfg.qk_dtype is QKDType.INT4)
    a.pv_type = abi.PV_FP8 if cfg.pv_dtype is PVDType.FP8 else abi.PV_16BIT[q_h.dtype]
    a.pv_accum = abi.PV_ACCUM_CODES[cfg.pv_accum]
    a.out_bf16 = int(q_h.dtype == torch.bfloat16)
    a.granularity = abi.GRANULARITY_CODES[cfg.granularity]
    a.smooth_q, a.q_mean_rows, a.causal, a.sm_scale = int(cfg.smooth_q), tile.q_mean_rows, int(is_causal), sm_scale
    return a


def _attention_grid(kernel, nq_pad: int, hq: int, b: int) -> tuple[int, int, int]:
    """One CTA per `cta_q` query rows (the quantizer's block)."""
    return -(-nq_pad // kernel.info["cta_q"]), hq, b


def _attention_smem(kernel, smooth_q: bool) -> int:
    """Dynamic shared memory of one attention launch: without Q smoothing the q-bar and Delta-S
    rows are left out (48 KB instead of 49.5 KB at D = 128, so two CTAs fit the ~100 KB of an
    sm_86/89/120 SM)."""
    return kernel.info["smem"] if smooth_q else kernel.info["smem_no_qbar"]


def _check_attention(a: abi.MmaAttnParams, kernel, arch) -> None:
    """What the kernel assumes of its arguments (checked once per plan)."""
    if a.pv_type == abi.PV_FP8 and not arch.fp8_mma:
        raise KernelError(f"FP8 PV needs e4m3 mma.sync (sm_89 or newer); this GPU is {arch.target}")
    if a.pv_accum not in abi.PV_ACCUM_CODES.values():
        raise KernelError(f"bad pv_accum {a.pv_accum}")
    if a.pv_accum == abi.PV_ACCUM_CODES[PVAccum.FP16] and a.pv_type == abi.PV_BF16:
        raise KernelError("an fp16 P.V accumulator needs fp16 or FP8 operands, not bf16")
    if a.heads_q % a.heads_kv:
        raise KernelError(f"heads_q {a.heads_q} is not a multiple of heads_kv {a.heads_kv}")
    if a.batch > 65535 or a.heads_q > 65535:
        raise KernelError("batch and heads must be <= 65535")
    if a.nq >= 2**31 or a.nk >= 2**31:
        raise KernelError("sequence lengths must fit in 31 bits")
    if a.nq_pad % kernel.info["cta_q"] or a.nk_pad % kernel.info["k_tile"]:
        raise KernelError("padded lengths must be whole tiles")
    if a.smooth_q and (a.q_mean_rows <= 0 or a.q_mean_rows % kernel.info["warp_q"]):
        raise KernelError(f"q_mean_rows {a.q_mean_rows} must be a multiple of warp_q {kernel.info['warp_q']}")
    if a.pv_type == abi.PV_FP8:
        if a.v_pad % V_TILE_TOKENS or a.v_pad < a.nk_pad:
            raise KernelError("FP8 V^T needs v_pad covering the keys in whole tiles")
        if a.padded_head_dim * a.v_pad >= 2**31:
            raise KernelError("FP8 V^T tile offsets must fit in 31 bits")
    elif 2 * 64 * a.v_stride_n >= 2**31:
        raise KernelError("V token stride too large for 32-bit tile offsets")


class _AttentionPlan(calls.CallPlan):
    """mma.attention for one key: the quantizer plan, the attention kernel, its grid and
    parameter template, and the output layout. Calls whose 16-bit V cannot be read in place take
    the general path."""

    def __init__(self, dk: DeviceKernels, q, k, v, layout, cfg: AttnConfig, is_causal, sm_scale, return_lse):
        self.dk, self.index, self.layout, self.cfg = dk, dk.index, layout, cfg
        self.is_causal, self.sm_scale, self.return_lse = is_causal, sm_scale, return_lse
        q_h, k_h, v_h = (_hnd(x, layout) for x in (q, k, v))
        b, hq, nq, d = q_h.shape
        dpad = padded_head_dim(d, cfg.family)
        tile = tile_shape(cfg.family, dpad)
        fp8 = cfg.pv_dtype is PVDType.FP8
        # 16-bit V read in place needs 16-byte rows: the strides are fixed by the key, the
        # base address is checked per call.
        self.fast = fp8 or (not cfg.smooth_v and _v16_strides_ok(v_h))
        if not self.fast:
            return
        self.qkv = _QkvPlan(dk, q_h, k_h, v_h, cfg, tile, dpad, None, return_lse and cfg.smooth_k)
        self.fp8 = fp8
        self.device, self.nbytes = q.device, self.qkv.nbytes
        self.out_shape, self.dtype, self.lse_shape = q.shape, q.dtype, (b, hq, nq)
        self.kernel = dk.get(attention_kernel_for(cfg, q.dtype, d))
        v_pad, v_strides = (self.qkv.v_pad, (0, 0, 0)) if fp8 else (0, tuple(v_h.stride()[:3]))
        a = _attention_params(cfg, q_h, k_h, dpad, tile, self.qkv.nq_pad, self.qkv.nk_pad, v_pad, v_strides,
                              _contiguous_bhn_strides(q.shape, layout), is_causal, float(sm_scale))
        _check_attention(a, self.kernel, dk.arch)
        grid = _attention_grid(self.kernel, self.qkv.nq_pad, hq, b)
        self.template = abi.ParamTemplate(a)
        t, offsets = self.template, self.qkv.offsets
        self.base_slots = tuple((t.slot(field), offsets[part]) for field, part in (
            ("q", "q"), ("k", "k"), ("q_scale", "q_scale"), ("k_scale", "k_scale"), ("q_dot_kbar", "q_dot_kbar"),
            ("qbar", "qbar"), ("qbar_scale", "qbar_scale"), ("v_scale", "v_scale"), ("v_mean", "vbar"))
            if part in offsets)
        self.v_slot, self.v_offset = t.slot("v"), offsets.get("v", 0)
        self.out_slot, self.lse_slot = t.slot("out"), t.slot("lse")
        self.launches = calls.Launches(
            [(kernel, grid, smem) for kernel, grid, smem, _ in self.qkv.launches]
            + [(self.kernel, grid, _attention_smem(self.kernel, cfg.smooth_q))], self._params)

    def _params(self, stream, base, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr) -> list[bytes]:
        a = self.template.new()
        for i, off in self.base_slots:
            a[i] = base + off
        a[self.v_slot] = base + self.v_offset if self.fp8 else v_ptr
        a[self.out_slot], a[self.lse_slot] = out_ptr, lse_ptr
        return self.qkv.params(stream, base, q_ptr, k_ptr, v_ptr) + [bytes(a)]

    def run(self, q, k, v):
        v_ptr = v.data_ptr()
        if not self.fast or (not self.fp8 and v_ptr % 16):
            qz = quantize(q, k, v, layout=self.layout, cfg=self.cfg, dk=self.dk,
                          with_q_dot_kbar=self.return_lse and self.cfg.smooth_k)
            return launch(self.dk, qz, q, k, layout=self.layout, cfg=self.cfg, is_causal=self.is_causal,
                          sm_scale=self.sm_scale, return_lse=self.return_lse)
        _, out, lse = self.launch_fast(q, k, v_ptr)
        return out, lse


_attention_plans: dict = {}


def attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation=False):
    return attention_plan(q, k, v, layout=layout, cfg=cfg, is_causal=is_causal, sm_scale=sm_scale,
                          return_lse=return_lse, force_int4_emulation=force_int4_emulation)(q, k, v)


def attention_plan(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation=False):
    """`attention` of calls with these tensors' shapes, strides, dtypes and device and these
    options, as a callable (q, k, v) -> (O, lse) that any such call may use. Built once per key."""
    key = plan_key(q, k, v, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation)
    plan = _attention_plans.get(key)
    if plan is None:
        plan = _make_plan(q, k, v, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation)
        if len(_attention_plans) >= _MAX_PLANS:
            _attention_plans.clear()
        _attention_plans[key] = plan
    return plan


def _make_plan(q, k, v, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation):
    """Validates once per key (the dispatcher already asked `unsupported_reason`; a direct
    caller gets the same ValueError as before)."""
    global _int4_note_logged
    dk = _device_kernels(q.device)
    if cfg.qk_dtype is QKDType.INT4 and not dk.arch.int4_mma and not force_int4_emulation:
        if not _int4_note_logged:
            logging.getLogger("sageattn2").info(
                f"[sageattn2] {dk.tag} has no INT4 tensor cores: the mma backend runs int4 requests with INT8 QK")
            _int4_note_logged = True
        cfg = cfg.with_(qk_dtype=QKDType.INT8)
    why = unsupported_reason(q, k, v, layout=layout, cfg=cfg, is_causal=is_causal)
    if why:
        raise ValueError(f"mma backend cannot run this call: {why}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    with torch.cuda.device(q.device):
        try:
            return _AttentionPlan(dk, q, k, v, layout, cfg, is_causal, sm_scale, return_lse)
        except KernelBuildError as e:
            raise KernelError(str(e)) from None


def launch(dk: DeviceKernels, qz: Quantized, q, k, *, layout, cfg, is_causal, sm_scale, return_lse):
    """One attention kernel over `quantize()`'s buffers; allocates O (q's dtype and layout,
    contiguous) and lse (B, Hq, Nq) float32."""
    q_h, k_h = _hnd(q, layout), _hnd(k, layout)
    b, hq, nq, d = q_h.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_h = _hnd(out, layout)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device) if return_lse else None
    fp8 = cfg.pv_dtype is PVDType.FP8
    if fp8:
        v_pad, v_strides = qz.v.shape[-1], (0, 0, 0)
    else:
        v_pad, v_strides = 0, tuple(qz.v.stride()[:3])
        # Rows are read in whole 16-byte chunks: d % 8 == 0, or a padded copy whose rows hold them.
        sb, sh, sn = v_strides
        if not ((d % 8 == 0 or sn >= _round_up(d, 8)) and sb % 8 == 0 and sh % 8 == 0 and sn % 8 == 0
                and qz.v.data_ptr() % 16 == 0):
            raise KernelError("16-bit V needs head_dim % 8 == 0, strides % 8 == 0 and a 16-byte aligned pointer")
    try:
        kernel = dk.get(attention_kernel_for(cfg, q.dtype, d))
    except KernelBuildError as e:
        raise KernelError(str(e)) from None
    a = _attention_params(cfg, q_h, k_h, qz.padded_head_dim, qz.tile, qz.q.shape[2], qz.k.shape[2], v_pad,
                          v_strides, tuple(out_h.stride()[:3]), is_causal, float(sm_scale))
    _check_attention(a, kernel, dk.arch)
    for name, t in (("q", qz.q), ("k", qz.k), ("q_scale", qz.q_scale), ("k_scale", qz.k_scale),
                    ("qbar", qz.qbar), ("qbar_scale", qz.qbar_scale), ("q_dot_kbar", qz.q_dot_kbar), ("v", qz.v),
                    ("v_scale", qz.v_scale), ("v_mean", qz.vbar), ("out", out), ("lse", lse)):
        setattr(a, name, None if t is None else t.data_ptr())
    dk.drv.ensure_context(dk.index)
    kernel.launch_struct(_attention_grid(kernel, qz.q.shape[2], hq, b), a, _stream(q.device),
                         _attention_smem(kernel, cfg.smooth_q))
    return out, lse
