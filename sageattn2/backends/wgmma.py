"""Hopper (sm_90a) backend: INT8 QK^T with FP8 or fp16/bf16 PV on wgmma (csrc/attn_wgmma.cu).

`attention()` = `prepare()` (quantize Q/K, and V for FP8 PV) + `run()` (one kernel launch).
The two halves are public so benchmarks can time the kernel alone.

Quantization runs in PyTorch here (several passes over Q/K/V); it produces exactly the groups of
`tile_shape(Family.WGMMA, D)` and the numerics of docs/numerics.md:
  Q  int8 (B, Hq, Nq_pad, D), one scale per rows {g, g+8} of each 16-row slice;
  K  int8 (B, Hkv, Nk_pad, D) of K - mean(K), one scale per keys {8n+2t, 8n+2t+1} of a tile;
  V  FP8 PV: e4m3 V^T (B, Hkv, D, Nk_pad) with each 16-token group stored in the order
     0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15, plus per-channel scales;
     fp16/bf16 PV: the caller's V, read in place through TMA (base and strides must be
     16-byte multiples; other V is declined and served by the mma family).
The fused CUDA quantizers (csrc/quant.cu) have no Python entry point yet; when
sageattn2/backends/mma.py exposes them, `prepare` should call them instead.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ..config import (
    ABSMAX_EPS,
    FP8_MAX,
    INT8_MAX,
    NATIVE_HEAD_DIMS,
    Family,
    Granularity,
    PVDType,
    QKDType,
    padded_head_dim,
    tile_shape,
)
from ..loader import library_for_device
from . import KernelError

SYMBOL = "sa2_wgmma_attention"
SCHEDULES = {"overlap": 2, "pingpong": 1, "sequential": 0, "intra": 3}  # Schedule in attn_wgmma.cuh


# Fastest measured schedule per (PV type, padded head dim) on H100 (docs/notes-wgmma.md, v4).
_DEFAULT_SCHEDULES = {
    (PVDType.FP8, 128): "sequential",
    (PVDType.FP8, 64): "intra",
    (PVDType.FP16, 128): "overlap",
    (PVDType.FP16, 64): "sequential",
}


def default_schedule(pv_dtype: PVDType, head_dim: int) -> str:
    return _DEFAULT_SCHEDULES[(PVDType(pv_dtype), padded_head_dim(head_dim, Family.WGMMA))]

# V^T token order inside every 16 keys (matches how P is packed from the S accumulator).
V_TOKEN_ORDER = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)


def unsupported_reason(q, k, v, *, layout, cfg, is_causal):
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not on a CUDA device"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "wgmma kernels need compute capability 9.0 (Hopper)"
    if cfg.family is not Family.WGMMA:
        return f"config is laid out for the {cfg.family.value} family"
    if cfg.qk_dtype is not QKDType.INT8:
        return "Hopper has no INT4 tensor cores (use int8)"
    if cfg.granularity is not Granularity.PER_THREAD:
        return f"wgmma kernels implement per_thread groups only, not {cfg.granularity.value}"
    if cfg.smooth_q:
        return "Q smoothing is served by the mma family"
    if cfg.smooth_v:
        return "V smoothing is not implemented in the wgmma kernels"
    if layout not in ("HND", "NHD"):
        return f"unknown layout {layout!r}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k, v must share dtype fp16 or bf16"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "last dim must be contiguous"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return "q, k, v head dims differ"
    if d > max(NATIVE_HEAD_DIMS[Family.WGMMA]):
        return f"head dim {d} > {max(NATIVE_HEAD_DIMS[Family.WGMMA])}"
    hq, nq = (q.shape[1], q.shape[2]) if layout == "HND" else (q.shape[2], q.shape[1])
    hk, nk = (k.shape[1], k.shape[2]) if layout == "HND" else (k.shape[2], k.shape[1])
    if nq < 1 or nk < 1:
        return "empty sequence"
    if hq % hk != 0:
        return f"{hq} query heads are not a multiple of {hk} kv heads"
    if cfg.pv_dtype is PVDType.FP16 and (
        v.data_ptr() % 16 or any(s * v.element_size() % 16 for s in v.stride()[:3])
    ):
        return "fp16 PV reads V in place through TMA: its base and strides must be 16-byte multiples"
    if q.shape[0] > 65535 or hq > 65535:
        return "batch or head count above the CUDA grid limit"
    if nq >= 2**31 or nk >= 2**31 - 128:
        return "sequence longer than 2^31"
    lib, reason = library_for_device(q.device)
    if lib is None:
        return reason
    if "wgmma" not in lib.families or not lib.has(SYMBOL):
        return f"kernel library for {lib.tag} was built without the wgmma family"
    return None


# ---------------------------------------------------------------------------------------------
# Quantization (PyTorch)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.trunc(x + 0.5 * torch.sign(x))


def _inverse(qmax: float, amax: torch.Tensor) -> torch.Tensor:
    """qmax / amax as one fp32 division (`scalar / tensor` would round a reciprocal first)."""
    return torch.div(torch.full_like(amax, qmax), amax)


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def _padded_fp32(x: torch.Tensor, rows: int, dpad: int, sub: torch.Tensor | None = None):
    """(B, H, N, d) -> fp32 (B, H, rows, dpad), zeros outside, optionally minus `sub` (B, H, 1, d)."""
    b, h, n, d = x.shape
    out = torch.zeros(b, h, rows, dpad, dtype=torch.float32, device=x.device)
    if sub is None:
        out[:, :, :n, :d] = x
    else:
        torch.sub(x, sub, out=out[:, :, :n, :d])
    return out


def quantize_q(q_hnd: torch.Tensor, dpad: int):
    """int8 Q (B, H, Nq_pad, D) and scales (B, H, Nq_pad/16*8): rows {g, g+8} of each 16-row slice."""
    tile = tile_shape(Family.WGMMA, dpad)
    b, h, n, _ = q_hnd.shape
    rows = -(-n // tile.cta_q) * tile.cta_q
    x = _padded_fp32(q_hnd, rows, dpad).view(b, h, rows // tile.warp_q, tile.warp_q // 8, 8, dpad)
    amax = x.abs().amax(dim=(3, 5)).clamp_min(ABSMAX_EPS)  # (B, H, slices, 8)
    inv = _inverse(INT8_MAX, amax)
    qi = _round_half_away(x * inv[:, :, :, None, :, None]).to(torch.int8).view(b, h, rows, dpad)
    return qi, (amax / INT8_MAX).reshape(b, h, -1)


def quantize_k(k_hnd: torch.Tensor, dpad: int, smooth_k: bool):
    """int8 K - kbar (B, H, Nk_pad, D), scales (B, H, tiles*4) and kbar (B, H, d) fp32 or None."""
    tile = tile_shape(Family.WGMMA, dpad)
    b, h, n, d = k_hnd.shape
    kbar = k_hnd.float().mean(dim=2) if smooth_k else None
    rows = -(-n // tile.k_tile) * tile.k_tile
    x = _padded_fp32(k_hnd, rows, dpad, None if kbar is None else kbar[:, :, None, :])
    # key = tile*k_tile + 8n + 2t + e: group (tile, t)
    x = x.view(b, h, rows // tile.k_tile, tile.k_tile // 8, 4, 2, dpad)
    amax = x.abs().amax(dim=(3, 5, 6)).clamp_min(ABSMAX_EPS)  # (B, H, tiles, 4)
    inv = _inverse(INT8_MAX, amax)
    ki = _round_half_away(x * inv[:, :, :, None, :, None, None]).to(torch.int8)
    return ki.view(b, h, rows, dpad), (amax / INT8_MAX).reshape(b, h, -1), kbar


def quantize_v_fp8(v_hnd: torch.Tensor, dpad: int):
    """e4m3 V^T as uint8 (B, H, D, Nk_pad) with the 16-token permutation, scales (B, H, D)."""
    tile = tile_shape(Family.WGMMA, dpad)
    b, h, n, _ = v_hnd.shape
    rows = -(-n // tile.k_tile) * tile.k_tile
    x = _padded_fp32(v_hnd, rows, dpad)
    amax = x.abs().amax(dim=2).clamp_min(ABSMAX_EPS)  # (B, H, D)
    x.mul_(_inverse(FP8_MAX, amax)[:, :, None, :]).clamp_(-FP8_MAX, FP8_MAX)
    order = torch.tensor(V_TOKEN_ORDER, device=x.device)
    x = x.view(b, h, rows // 16, 16, dpad).index_select(3, order).view(b, h, rows, dpad)
    vt = x.to(torch.float8_e4m3fn).view(torch.uint8).transpose(2, 3).contiguous()
    return vt, amax / FP8_MAX


# ---------------------------------------------------------------------------------------------
# Launch


@dataclass
class Prepared:
    """Quantized operands and everything `run` needs (tensors kept alive until the launch)."""

    q: torch.Tensor  # caller's q (for shapes, dtype, the lse correction)
    layout: str
    is_causal: bool
    sm_scale: float
    head_dim: int
    dpad: int
    heads_kv: int
    num_k: int
    pv_mode: int
    q_int8: torch.Tensor
    q_scale: torch.Tensor
    k_int8: torch.Tensor
    k_scale: torch.Tensor
    kbar: torch.Tensor | None
    v_op: torch.Tensor  # (B, Hkv, D, Nk_pad) uint8 for fp8, (B, Hkv, Nk, d) view for 16-bit
    v_scale: torch.Tensor | None


def prepare(q, k, v, *, layout, cfg, is_causal, sm_scale=None) -> Prepared:
    d = q.shape[-1]
    dpad = padded_head_dim(d, Family.WGMMA)
    q_h, k_h, v_h = _hnd(q, layout), _hnd(k, layout), _hnd(v, layout)
    q_int8, q_scale = quantize_q(q_h, dpad)
    k_int8, k_scale, kbar = quantize_k(k_h, dpad, cfg.smooth_k)
    if cfg.pv_dtype is PVDType.FP8:
        v_op, v_scale = quantize_v_fp8(v_h, dpad)
        pv_mode = 0
    else:
        v_op, v_scale = v_h, None  # read in place (unsupported_reason checked the strides)
        pv_mode = 2 if q.dtype == torch.bfloat16 else 1
    return Prepared(
        q=q, layout=layout, is_causal=bool(is_causal),
        sm_scale=float(sm_scale if sm_scale is not None else d**-0.5),
        head_dim=d, dpad=dpad, heads_kv=k_h.shape[1], num_k=k_h.shape[2], pv_mode=pv_mode,
        q_int8=q_int8, q_scale=q_scale, k_int8=k_int8, k_scale=k_scale, kbar=kbar,
        v_op=v_op, v_scale=v_scale,
    )


def _kernel(device):
    lib, reason = library_for_device(device)
    if lib is None:
        raise KernelError(reason)
    fn = getattr(lib.cdll, SYMBOL)
    if fn.argtypes is None:
        fn.argtypes = [ctypes.c_void_p] * 8 + [
            ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
            ctypes.c_void_p,
        ]
        fn.restype = ctypes.c_int
    return lib, fn


def _bhn_strides(t: torch.Tensor):
    """Element strides of (B, H, N) for a tensor laid out as (B, H, N, ...)."""
    return [t.stride(0), t.stride(1), t.stride(2)]


def run(prep: Prepared, *, return_lse: bool = False, schedule: str | None = None,
        out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """Launches the kernel. `out` / `lse` may be given (tests poison them first); they must
    have the shapes and dtypes `run` would allocate, any element strides."""
    q = prep.q
    if schedule is None:
        schedule = default_schedule(PVDType.FP8 if prep.pv_mode == 0 else PVDType.FP16, prep.dpad)
    b = q.shape[0]
    q_h = _hnd(q, prep.layout)
    hq, nq, d = q_h.shape[1], q_h.shape[2], prep.head_dim
    if out is None:
        shape = (b, hq, nq, d) if prep.layout == "HND" else (b, nq, hq, d)
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    out_h = _hnd(out, prep.layout)
    if return_lse and lse is None:
        lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    if not return_lse:
        lse = None

    v_scale = prep.v_scale
    shape = (ctypes.c_int64 * 7)(b, hq, prep.heads_kv, nq, prep.num_k, prep.dpad, d)
    strides = (ctypes.c_int64 * 20)(
        *_bhn_strides(prep.q_int8), *_bhn_strides(prep.k_int8), *_bhn_strides(prep.v_op),
        prep.q_scale.stride(0), prep.q_scale.stride(1),
        prep.k_scale.stride(0), prep.k_scale.stride(1),
        *(v_scale.stride()[:2] if v_scale is not None else (0, 0)),
        *_bhn_strides(out_h),
        *(lse.stride()[:2] if lse is not None else (0, 0)),
    )
    lib, fn = _kernel(q.device)
    with torch.cuda.device(q.device):
        rc = fn(
            prep.q_int8.data_ptr(), prep.k_int8.data_ptr(), prep.v_op.data_ptr(),
            prep.q_scale.data_ptr(), prep.k_scale.data_ptr(),
            v_scale.data_ptr() if v_scale is not None else None,
            out.data_ptr(), lse.data_ptr() if lse is not None else None,
            shape, strides, prep.pv_mode, int(q.dtype == torch.bfloat16), int(prep.is_causal),
            SCHEDULES[schedule], prep.sm_scale, torch.cuda.current_stream(q.device).cuda_stream,
        )
    if rc != 0:
        raise KernelError(f"{SYMBOL} failed ({rc}): {lib.last_error()}")
    if lse is not None and prep.kbar is not None:
        # The kernel saw K - kbar; the dropped sm_scale * q . kbar is the same for every key.
        kbar = prep.kbar.repeat_interleave(hq // prep.heads_kv, dim=1)
        lse += prep.sm_scale * torch.einsum("bhnd,bhd->bhn", q_h.float(), kbar)
    return out, lse


def attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse):
    prep = prepare(q, k, v, layout=layout, cfg=cfg, is_causal=is_causal, sm_scale=sm_scale)
    return run(prep, return_lse=return_lse)
