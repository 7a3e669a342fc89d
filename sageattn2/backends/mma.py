"""mma.sync backend (sm80/86/89/120; Hopper runs it with INT4/FP8 emulated by the compiler).

`attention()` = `quantize()` (the fused CUDA quantizers of csrc/quant.cu) + `launch()` (one
kernel of csrc/attn_mma.cu). Both halves are public: the Hopper backend reuses `quantize()`
with its own tile shape, and benchmarks can time the kernel alone.

Everything runs on the current CUDA stream through ctypes; no torch C++ extension. Every
library call returns 0 or an error code, turned into `KernelError(lib.last_error())`.

Where the hardware lacks a precision:
- FP8 PV needs e4m3 mma.sync (sm_89+). On sm80/86 `unsupported_reason` declines fp8 PV with
  a reason saying so; the dispatcher then runs fp16 PV (docs/numerics.md §4).
- INT4 QK is native on sm80-sm89/sm120 but emulated on Hopper (about 10x slower than INT8),
  so there an int4 request runs the INT8 kernel (logged once) unless the caller passes
  `force_int4_emulation=True`.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
from dataclasses import dataclass

import torch

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
from ..loader import Library, library_for_device
from . import KernelError, input_reason

SYMBOL = "sa2_mma_attention"
QUANT_SYMBOLS = ("sa2_quantize_qkv", "sa2_smooth_v16")
PV_CODES = {torch.float16: 0, torch.bfloat16: 1}  # AttnMmaArgs.pv_type for 16-bit PV; FP8 is 2
PV_FP8 = 2
PV_ACCUM_CODES = {PVAccum.FP32: 0, PVAccum.FP16: 1}  # AttnMmaArgs.pv_accum (sa2::PVAccum)
GRANULARITY_CODES = {Granularity.PER_THREAD: 0, Granularity.PER_WARP: 1, Granularity.PER_BLOCK: 2}
# V^T (FP8) token rows are padded to a multiple of this (one quantizer CTA = 64 tokens).
V_TILE_TOKENS = 64

# ---------------------------------------------------------------------------------------
# C ABI mirrors (csrc/quant.cu, csrc/include/sa2/attn_mma.cuh): all fields 8 bytes, same order.

_p = ctypes.c_void_p
_i = ctypes.c_int64


class _Input(ctypes.Structure):
    _fields_ = [("ptr", _p), ("batch", _i), ("heads", _i), ("tokens", _i), ("head_dim", _i),
                ("stride_b", _i), ("stride_h", _i), ("stride_n", _i), ("is_bf16", _i)]


class _SmoothV16Args(ctypes.Structure):
    _fields_ = [("x", _Input), ("padded_head_dim", _i), ("mean", _p), ("out", _p), ("stream", _p)]


class _QkvRows(ctypes.Structure):
    _fields_ = [("padded_tokens", _i), ("block_rows", _i), ("slice_rows", _i), ("mod_groups", _i),
                ("mod_div", _i), ("out", _p), ("scale", _p)]


class _QuantizeQkvArgs(ctypes.Structure):
    _fields_ = [("q", _Input), ("k", _Input), ("v", _Input), ("padded_head_dim", _i), ("int4", _i),
                ("q_rows", _QkvRows), ("k_rows", _QkvRows), ("q_mean_rows", _i), ("qbar", _p),
                ("qbar_scale", _p), ("kbar", _p), ("q_dot_kbar", _p), ("vbar", _p),
                ("v_out", _p), ("v_padded_tokens", _i), ("v_scale", _p), ("v_inv", _p), ("v_fp8_max", _i),
                ("workspace", _p), ("workspace_floats", _i), ("counters", _p), ("counter_slots", _i),
                ("stream", _p)]


class _AttnMmaArgs(ctypes.Structure):
    _fields_ = [("q", _p), ("k", _p), ("q_scale", _p), ("k_scale", _p), ("qbar", _p),
                ("qbar_scale", _p), ("q_dot_kbar", _p), ("v", _p), ("v_scale", _p), ("v_mean", _p),
                ("out", _p), ("lse", _p), ("stream", _p),
                ("batch", _i), ("heads_q", _i), ("heads_kv", _i), ("nq", _i), ("nk", _i),
                ("head_dim", _i), ("padded_head_dim", _i), ("nq_pad", _i), ("nk_pad", _i),
                ("v_pad", _i), ("v_stride_b", _i), ("v_stride_h", _i), ("v_stride_n", _i),
                ("o_stride_b", _i), ("o_stride_h", _i), ("o_stride_n", _i), ("qk_int4", _i),
                ("pv_type", _i), ("out_bf16", _i), ("granularity", _i), ("smooth_q", _i),
                ("q_mean_rows", _i), ("causal", _i), ("sm_scale", ctypes.c_double), ("pv_accum", _i)]


_configured: set[int] = set()


def _functions(lib: Library):
    """Declares argtypes/restype once per library (ctypes would otherwise guess int)."""
    if id(lib) not in _configured:
        c = lib.cdll
        for name, args in (("sa2_quantize_qkv", _QuantizeQkvArgs), ("sa2_smooth_v16", _SmoothV16Args),
                           ("sa2_mma_attention", _AttnMmaArgs)):
            if lib.has(name):
                fn = getattr(c, name)
                fn.argtypes = [ctypes.POINTER(args)]
                fn.restype = ctypes.c_int
        if lib.has("sa2_mma_has_fp8_pv"):
            c.sa2_mma_has_fp8_pv.restype = ctypes.c_int
        _configured.add(id(lib))
    return lib.cdll


def _call(lib: Library, name: str, args) -> None:
    rc = getattr(_functions(lib), name)(ctypes.byref(args))
    if rc != 0:
        raise KernelError(f"{name} failed ({rc}): {lib.last_error()}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def _input(x_hnd: torch.Tensor) -> _Input:
    b, h, n, d = x_hnd.shape
    sb, sh, sn, _ = x_hnd.stride()
    return _Input(x_hnd.data_ptr(), b, h, n, d, sb, sh, sn, int(x_hnd.dtype == torch.bfloat16))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device) -> int:
    if _raw_stream is not None and device.index is not None:
        return _raw_stream(device.index)  # the same handle, without building a Stream object
    return torch.cuda.current_stream(device).cuda_stream


def _group_rule(gran: Granularity, tile: TileShape, for_q: bool) -> tuple[int, int, int]:
    """(slice_rows, mod_groups, mod_div) of quant::GroupRule for config.q_group_of_row /
    k_group_of_key."""
    if for_q:
        if gran is Granularity.PER_THREAD:
            return tile.warp_q, 8, 1
        return (tile.warp_q if gran is Granularity.PER_WARP else tile.cta_q), 1, 8
    return (tile.k_tile, 4, 2) if gran is Granularity.PER_THREAD else (tile.k_tile, 1, 8)


def _v16_direct_ok(v_hnd: torch.Tensor) -> bool:
    """The kernel reads 16-bit V in place with 16-byte cp.async: rows must be aligned."""
    return (v_hnd.shape[-1] % 8 == 0 and all(s % 8 == 0 for s in v_hnd.stride()[:3])
            and v_hnd.data_ptr() % 16 == 0)


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
    vbar          float32 (B, Hkv, D) V mean (V smoothing), or None
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


# ---------------------------------------------------------------------------------------
# sa2_quantize_qkv: two launches (statistics, then K / V), one workspace allocation, and a
# plan per shape so a call only fills in data pointers.

_ALIGN = 256  # byte alignment of each operand inside the workspace (TMA needs 16)
_counter_sets: dict = {}  # (device index, stream) -> int32 tickets, zero between launches


def _counters(device, stream: int, slots: int) -> int:
    """Ticket counters for the statistics' last-CTA finalize: one zeroed set per stream (the
    kernel leaves them zero), so calls on different streams never share one."""
    key = (device.index, stream)
    t = _counter_sets.get(key)
    if t is None or t.numel() < slots:
        t = torch.zeros(max(slots, 4096), dtype=torch.int32, device=device)
        _counter_sets[key] = t
    return t.data_ptr()


def fused_eligible(lib: Library, cfg: AttnConfig) -> bool:
    """Whether `lib` has sa2_quantize_qkv, which serves every configuration (`cfg` is
    accepted for the callers that ask per configuration)."""
    return lib.has("sa2_quantize_qkv")


class _QkvPlan:
    """Sizes, workspace offsets and the argument struct of sa2_quantize_qkv for one
    (shapes, strides, dtype, cfg, tile); `enqueue` fills in the pointers."""

    def __init__(self, q_h, k_h, v_h, cfg: AttnConfig, tile: TileShape, dpad: int,
                 v_pad_multiple: int | None, with_q_dot_kbar: bool):
        b, hq, nq, d = q_h.shape
        hk, nk = k_h.shape[1], k_h.shape[2]
        int4 = cfg.qk_dtype is QKDType.INT4
        width = dpad // 2 if int4 else dpad
        self.tile, self.head_dim, self.dpad = tile, d, dpad
        self.nq_pad, self.nk_pad = _round_up(nq, tile.cta_q), _round_up(nk, tile.k_tile)
        self.fp8 = cfg.pv_dtype is PVDType.FP8
        self.v_pad = 0
        if self.fp8:
            multiple = v_pad_multiple or tile.k_tile
            if multiple % V_TILE_TOKENS:
                raise ValueError(f"v_pad_multiple must be a multiple of {V_TILE_TOKENS}, got {multiple}")
            self.v_pad = _round_up(nk, multiple)
        stats_jobs = int(cfg.smooth_k) + int(self.fp8 or cfg.smooth_v)
        stats_floats = b * hk * (-(-nk // 256)) * 3 * dpad  # 256-token partials (quant.cu kStatsChunkRows)
        f32, i8, u8 = torch.float32, torch.int8, torch.uint8
        parts = [
            ("q", (b, hq, self.nq_pad, width), i8),
            ("q_scale", (b, hq, num_q_groups(nq, tile, cfg.granularity)), f32),
            ("k", (b, hk, self.nk_pad, width), i8),
            ("k_scale", (b, hk, num_k_groups(nk, tile, cfg.granularity)), f32),
        ]
        if cfg.smooth_k:
            parts.append(("kbar", (b, hk, dpad), f32))
            if with_q_dot_kbar:
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
        self.counter_slots = 2 * b * hk

        self.args = a = _QuantizeQkvArgs()
        for field, x in (("q", q_h), ("k", k_h), ("v", v_h)):
            setattr(a, field, _input(x))
        a.padded_head_dim, a.int4, a.q_mean_rows = dpad, int(int4), self.q_mean_rows
        for field, block, n_pad, for_q in (("q_rows", tile.cta_q, self.nq_pad, True),
                                           ("k_rows", tile.k_tile, self.nk_pad, False)):
            rows = getattr(a, field)
            rows.padded_tokens, rows.block_rows = n_pad, block
            rows.slice_rows, rows.mod_groups, rows.mod_div = _group_rule(cfg.granularity, tile, for_q)
        a.v_padded_tokens = self.v_pad
        a.v_fp8_max = int(cfg.v_fp8_max) if self.fp8 else 0
        a.workspace_floats = stats_jobs * stats_floats
        a.counter_slots = self.counter_slots

    def pointer(self, base: int, name: str) -> int | None:
        off = self.offsets.get(name)
        return None if off is None else base + off

    def enqueue(self, lib: Library, q_ptr: int, k_ptr: int, v_ptr: int, base: int, device, stream: int):
        a, ptr = self.args, self.pointer
        a.q.ptr, a.k.ptr, a.v.ptr = q_ptr, k_ptr, v_ptr
        a.q_rows.out, a.q_rows.scale = ptr(base, "q"), ptr(base, "q_scale")
        a.k_rows.out, a.k_rows.scale = ptr(base, "k"), ptr(base, "k_scale")
        a.qbar, a.qbar_scale = ptr(base, "qbar"), ptr(base, "qbar_scale")
        a.kbar, a.q_dot_kbar, a.vbar = ptr(base, "kbar"), ptr(base, "q_dot_kbar"), ptr(base, "vbar")
        a.v_out, a.v_scale, a.v_inv = ptr(base, "v"), ptr(base, "v_scale"), ptr(base, "v_inv")
        a.workspace = ptr(base, "stats")
        a.counters = _counters(device, stream, self.counter_slots) if a.workspace else None
        a.stream = stream
        if lib.cdll.sa2_quantize_qkv(ctypes.byref(a)) != 0:
            raise KernelError(f"sa2_quantize_qkv failed: {lib.last_error()}")

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor | None:
        for part, shape, dtype in self.parts:
            if part == name:
                off = self.offsets[name]
                return buf[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        return None


def quantize(q, k, v, *, layout: str, cfg: AttnConfig, tile: TileShape | None = None,
             v_pad_multiple: int | None = None, with_q_dot_kbar: bool = False,
             lib: Library | None = None) -> Quantized:
    """Runs sa2_quantize_qkv on q, k, v (fp16/bf16, `layout` HND or NHD, any strides with a
    contiguous last dim) for `cfg`, on the current stream; for 16-bit PV with V smoothing or
    a V that cannot be read in place, also sa2_smooth_v16.

    `tile` defaults to `tile_shape(cfg.family, D)` and sets the groups (the Hopper family passes
    its own); `v_pad_multiple` the FP8 V^T token padding (default tile.k_tile, a multiple of
    64); `with_q_dot_kbar` also returns q . kbar for the lse (needs smooth_k).
    """
    if lib is None:
        lib, why = library_for_device(q.device)
        if lib is None:
            raise KernelError(why)
    if not fused_eligible(lib, cfg):
        raise KernelError(f"kernel library for {lib.tag} has no sa2_quantize_qkv (rerun install.py)")
    d = q.shape[-1]
    dpad = padded_head_dim(d, cfg.family)
    tile = tile or tile_shape(cfg.family, dpad)
    q_h, k_h, v_h = (_hnd(x, layout) for x in (q, k, v))
    stream = _stream(q.device)

    plan = _QkvPlan(q_h, k_h, v_h, cfg, tile, dpad, v_pad_multiple, with_q_dot_kbar and cfg.smooth_k)
    buf = torch.empty(plan.nbytes, dtype=torch.uint8, device=q.device)
    _functions(lib)
    plan.enqueue(lib, q.data_ptr(), k.data_ptr(), v.data_ptr(), buf.data_ptr(), q.device, stream)
    vbar = plan.view(buf, "vbar")
    if plan.fp8:
        v_op = plan.view(buf, "v")
    elif cfg.smooth_v or not _v16_direct_ok(v_h):
        v_op = torch.empty((v_h.shape[0], v_h.shape[1], v_h.shape[2], dpad), dtype=v.dtype, device=q.device)
        _call(lib, "sa2_smooth_v16", _SmoothV16Args(_input(v_h), dpad, _ptr(vbar), v_op.data_ptr(), stream))
    else:
        v_op = v_h
    view = functools.partial(plan.view, buf)
    return Quantized(tile, d, dpad, view("q"), view("q_scale"), view("k"), view("k_scale"), view("kbar"),
                     view("qbar"), view("qbar_scale"), view("q_dot_kbar"), v_op, view("v_scale"), vbar)


# ---------------------------------------------------------------------------------------
# Backend interface


def _shape_reason(q, k, v, layout) -> str | None:
    return input_reason(q, k, v, layout, NATIVE_HEAD_DIMS[Family.MMA][-1])


def unsupported_reason(q, k, v, *, layout, cfg, is_causal):
    why = _shape_reason(q, k, v, layout)
    if why:
        return why
    if cfg.family is not Family.MMA:
        return f"config is laid out for the {cfg.family.value} family"
    if cfg.hadamard:
        return "the Hadamard rotation is implemented in the reference only"
    lib, why = library_for_device(q.device)
    if lib is None:
        return why
    if "mma" not in lib.families or not lib.has(SYMBOL) or not all(lib.has(s) for s in QUANT_SYMBOLS):
        return f"kernel library for {lib.tag} was built without the mma family"
    if cfg.pv_dtype is PVDType.FP8 and not _functions(lib).sa2_mma_has_fp8_pv():
        return f"FP8 PV needs e4m3 mma.sync (sm_89+); {lib.tag} has none: use fp16 PV"
    if cfg.pv_accum is PVAccum.FP16 and cfg.pv_dtype is PVDType.FP16 and q.dtype != torch.float16:
        return f"an fp16 P.V accumulator multiplies fp16 V; {q.dtype} inputs need pv_accum='fp32'"
    return None


_int4_note_logged = False


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


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


def current_device_guard(device):
    """A device context only when `device` is not already current (entering one costs µs)."""
    if device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device)


class _AttentionPlan:
    """mma.attention for one key: the quantizer plan, the prebuilt kernel arguments and the
    output layout. Calls whose 16-bit V cannot be read in place take the general path."""

    def __init__(self, lib: Library, q, k, v, layout, cfg: AttnConfig, is_causal, sm_scale, return_lse):
        self.lib, self.layout, self.cfg = lib, layout, cfg
        self.is_causal, self.sm_scale, self.return_lse = is_causal, sm_scale, return_lse
        q_h, k_h, v_h = (_hnd(x, layout) for x in (q, k, v))
        b, hq, nq, d = q_h.shape
        hk, nk = k_h.shape[1], k_h.shape[2]
        dpad = padded_head_dim(d, cfg.family)
        tile = tile_shape(cfg.family, dpad)
        fp8 = cfg.pv_dtype is PVDType.FP8
        # 16-bit V read in place needs 16-byte rows: the strides are fixed by the key, the
        # base address is checked per call.
        v_strided_ok = v_h.shape[-1] % 8 == 0 and all(st % 8 == 0 for st in v_h.stride()[:3])
        self.fast = fused_eligible(lib, cfg) and (fp8 or (not cfg.smooth_v and v_strided_ok))
        if not self.fast:
            return
        self.qkv = _QkvPlan(q_h, k_h, v_h, cfg, tile, dpad, None, return_lse and cfg.smooth_k)
        self.fp8 = fp8
        self.out_shape, self.dtype, self.lse_shape = q.shape, q.dtype, (b, hq, nq)
        _functions(lib)
        v_pad, v_strides = (self.qkv.v_pad, (0, 0, 0)) if fp8 else (0, v_h.stride()[:3])
        self.args = _AttnMmaArgs(
            None, None, None, None, None, None, None, None, None, None, None, None, None,
            b, hq, hk, nq, nk, d, dpad, self.qkv.nq_pad, self.qkv.nk_pad, v_pad, *v_strides,
            *_contiguous_bhn_strides(q.shape, layout), int(cfg.qk_dtype is QKDType.INT4),
            PV_FP8 if fp8 else PV_CODES[q.dtype], int(q.dtype == torch.bfloat16),
            GRANULARITY_CODES[cfg.granularity], int(cfg.smooth_q), tile.q_mean_rows, int(is_causal),
            float(sm_scale), PV_ACCUM_CODES[cfg.pv_accum])

    def __call__(self, q, k, v):
        if not self.fast or (not self.fp8 and v.data_ptr() % 16):
            qz = quantize(q, k, v, layout=self.layout, cfg=self.cfg, lib=self.lib,
                          with_q_dot_kbar=self.return_lse and self.cfg.smooth_k)
            return launch(self.lib, qz, q, k, layout=self.layout, cfg=self.cfg, is_causal=self.is_causal,
                          sm_scale=self.sm_scale, return_lse=self.return_lse)
        dev, plan, lib = q.device, self.qkv, self.lib
        stream = _stream(dev)
        buf = torch.empty(plan.nbytes, dtype=torch.uint8, device=dev)
        base = buf.data_ptr()
        plan.enqueue(lib, q.data_ptr(), k.data_ptr(), v.data_ptr(), base, dev, stream)
        out = torch.empty(self.out_shape, dtype=self.dtype, device=dev)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=dev) if self.return_lse else None
        a, ptr = self.args, plan.pointer
        a.q, a.k, a.q_scale, a.k_scale = ptr(base, "q"), ptr(base, "k"), ptr(base, "q_scale"), ptr(base, "k_scale")
        a.q_dot_kbar, a.qbar, a.qbar_scale = ptr(base, "q_dot_kbar"), ptr(base, "qbar"), ptr(base, "qbar_scale")
        a.v = ptr(base, "v") if self.fp8 else v.data_ptr()
        a.v_scale, a.v_mean = ptr(base, "v_scale"), ptr(base, "vbar")
        a.out, a.lse, a.stream = out.data_ptr(), None if lse is None else lse.data_ptr(), stream
        if lib.cdll.sa2_mma_attention(ctypes.byref(a)) != 0:
            raise KernelError(f"{SYMBOL} failed: {lib.last_error()}")
        return out, lse


_attention_plans: dict = {}


def attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation=False):
    key = plan_key(q, k, v, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation)
    plan = _attention_plans.get(key)
    if plan is None:
        plan = _make_plan(q, k, v, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation)
        if len(_attention_plans) >= _MAX_PLANS:
            _attention_plans.clear()
        _attention_plans[key] = plan
    guard = current_device_guard(q.device)
    if guard is None:
        return plan(q, k, v)
    with guard:
        return plan(q, k, v)


def _make_plan(q, k, v, layout, cfg, is_causal, sm_scale, return_lse, force_int4_emulation):
    """Validates once per key (the dispatcher already asked `unsupported_reason`; a direct
    caller gets the same ValueError as before)."""
    global _int4_note_logged
    why = unsupported_reason(q, k, v, layout=layout, cfg=cfg, is_causal=is_causal)
    if why:
        raise ValueError(f"mma backend cannot run this call: {why}")
    if cfg.qk_dtype is QKDType.INT4 and _capability(q.device.index) == (9, 0) and not force_int4_emulation:
        if not _int4_note_logged:
            logging.getLogger("sageattn2").info(
                "[sageattn2] Hopper has no INT4 tensor cores: the mma backend runs int4 requests with INT8 QK")
            _int4_note_logged = True
        cfg = cfg.with_(qk_dtype=QKDType.INT8)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    lib, _ = library_for_device(q.device)
    with torch.cuda.device(q.device):
        return _AttentionPlan(lib, q, k, v, layout, cfg, is_causal, sm_scale, return_lse)


def launch(lib: Library, qz: Quantized, q, k, *, layout, cfg, is_causal, sm_scale, return_lse):
    """One attention kernel over `quantize()`'s buffers; allocates O (q's dtype and layout,
    contiguous) and lse (B, Hq, Nq) float32."""
    q_h, k_h = _hnd(q, layout), _hnd(k, layout)
    b, hq, nq, d = q_h.shape
    hk, nk = k_h.shape[1], k_h.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_h = _hnd(out, layout)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device) if return_lse else None
    fp8 = cfg.pv_dtype is PVDType.FP8
    if fp8:
        v_pad, v_strides = qz.v.shape[-1], (0, 0, 0)
    else:
        v_pad, v_strides = 0, qz.v.stride()[:3]
    args = _AttnMmaArgs(
        qz.q.data_ptr(), qz.k.data_ptr(), qz.q_scale.data_ptr(), qz.k_scale.data_ptr(), _ptr(qz.qbar),
        _ptr(qz.qbar_scale), _ptr(qz.q_dot_kbar), qz.v.data_ptr(), _ptr(qz.v_scale), _ptr(qz.vbar),
        out.data_ptr(), _ptr(lse), _stream(q.device),
        b, hq, hk, nq, nk, d, qz.padded_head_dim, qz.q.shape[2], qz.k.shape[2], v_pad, *v_strides,
        *out_h.stride()[:3], int(cfg.qk_dtype is QKDType.INT4), PV_FP8 if fp8 else PV_CODES[q.dtype],
        int(q.dtype == torch.bfloat16), GRANULARITY_CODES[cfg.granularity], int(cfg.smooth_q),
        qz.tile.q_mean_rows, int(is_causal), float(sm_scale), PV_ACCUM_CODES[cfg.pv_accum])
    _call(lib, SYMBOL, args)
    return out, lse
