"""Pure PyTorch reference for the SageAttention2 kernels, and exact attention.

`reference_attention` computes what docs/numerics.md specifies, stage by stage, in the same
order and precision as the kernels: smoothing, group quantization (groups from
`sageattn2.config`), the base-2 online softmax one key tile at a time, FP8 (E4M3) or
input-dtype rounding of P, two-level accumulation and the epilogue. Kernel tests compare
against it; `exact_attention` is the float64 ground truth both are measured against.

Conventions shared by every function here:
- layouts: "HND" is (B, H, N, d), "NHD" is (B, N, H, d);
- GQA: query head h reads kv head h // (Hq // Hkv);
- causal masks are top-left aligned: query row r sees keys 0..r;
- "input dtype" is q.dtype (fp16, bf16 or fp32). FP16 PV rounds P, and smoothed V, to it;
  for fp32 inputs that rounding is the identity.

Everything runs on CPU or CUDA tensors. Work is vectorised over batch, heads and rows; the
only Python loop is over key tiles (and, with accumulator truncation, the 32-key steps
inside a tile), as in the kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import (
    ABSMAX_EPS,
    FP8_MAX,
    FP16_MAX,
    INT4_MAX,
    INT8_MAX,
    NATIVE_HEAD_DIMS,
    AttnConfig,
    Family,
    MMA_K_STEP,
    PVAccum,
    PVDType,
    QKDType,
    TileShape,
    attention_shape_problem,
    fold_scale_sign,
    is_empty_query,
    k_group_of_key,
    num_k_groups,
    num_q_groups,
    padded_head_dim,
    q_group_of_row,
    tile_shape,
)

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
# Keys per FP8 MMA k-step: the accumulator is truncated after each (numerics.md §2.6).
FP8_MMA_K_STEP = MMA_K_STEP[PVDType.FP8]

LAYOUTS = ("HND", "NHD")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# Quantized operands (all HND and padded; each class's docstring lists its fields)


@dataclass
class QuantQ:
    """Quantized queries. `values`: int8 (B, Hq, Nq_pad, D), integers in [-QMAX, QMAX];
    `scale`: float32 (B, Hq, num_q_groups). With Q smoothing: `qbar` float32 (B, Hq,
    n_blocks, D) block means, quantized to `qbar_values` int8 with one `qbar_scale` float32
    (B, Hq, n_blocks) per block; all three None otherwise."""

    values: Tensor
    scale: Tensor
    qbar: Tensor | None = None
    qbar_values: Tensor | None = None
    qbar_scale: Tensor | None = None


@dataclass
class QuantK:
    """Quantized keys. `values`: int8 (B, Hkv, Nk_pad, D); `scale`: float32 (B, Hkv,
    num_k_groups); `kbar`: float32 (B, Hkv, D) key mean (zeros without K smoothing)."""

    values: Tensor
    scale: Tensor
    kbar: Tensor


@dataclass
class QuantV:
    """V as the PV matmul sees it, float32 (B, Hkv, Nk_pad, D).

    FP8 PV: `values` are E4M3-representable, `scale` (B, Hkv, D) the per-channel dequant
    scale. FP16 PV: `values` are V - vbar rounded to the input dtype, `scale` is ones.
    `vbar`: float32 (B, Hkv, D) channel mean on V's grid (zeros without V smoothing)."""

    values: Tensor
    scale: Tensor
    vbar: Tensor


# ---------------------------------------------------------------------------------------
# Argument checks and layouts


def _check_layout(tensor_layout: str) -> None:
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be one of {LAYOUTS}, got {tensor_layout!r}")


def _to_hnd(x: Tensor, tensor_layout: str) -> Tensor:
    _check_layout(tensor_layout)
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a rank-4 tensor in layout {tensor_layout}, got {shape}")
    return x if tensor_layout == "HND" else x.transpose(1, 2)


def _from_hnd(x: Tensor, tensor_layout: str) -> Tensor:
    return x.contiguous() if tensor_layout == "HND" else x.transpose(1, 2).contiguous()


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, tensor_layout: str, dtypes) -> tuple[int, ...]:
    """Validates shapes, dtypes and devices; returns (B, Hq, Hkv, Nq, Nk, d)."""
    qh, kh, vh = (_to_hnd(x, tensor_layout) for x in (q, k, v))
    if q.dtype not in dtypes:
        raise ValueError(f"q dtype must be one of {dtypes}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Nq, d = qh.shape
    Bk, Hkv, Nk, dk = kh.shape
    if vh.shape != kh.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k/v have {Bk}")
    if dk != d:
        raise ValueError(f"head dim mismatch: q has {d}, k/v have {dk}")
    problem = attention_shape_problem(B, Hq, Hkv, Nq, Nk, d)
    if problem:
        raise ValueError(problem)
    return B, Hq, Hkv, Nq, Nk, d


def _empty_result(q: Tensor, tensor_layout: str, return_lse: bool) -> tuple[Tensor, Tensor | None]:
    """An empty query side (B, Hq or Nq of 0): empty O and lse, as the API returns."""
    B, Hq, Nq, _ = _to_hnd(q, tensor_layout).shape
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device) if return_lse else None
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse


def _kv_head_of(Hq: int, Hkv: int, device) -> Tensor:
    return torch.arange(Hq, device=device) // (Hq // Hkv)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _causal_mask(rows: Tensor, keys: Tensor) -> Tensor:
    """True where a key is hidden from a row (top-left aligned)."""
    return keys[None, :] > rows[:, None]


# ---------------------------------------------------------------------------------------
# Exact attention


def exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention computed in `compute_dtype`.

    Returns o in q's dtype and layout and, when return_lse, the natural-log logsumexp of
    the scaled scores as float32 (B, Hq, Nq). Query rows are processed in chunks so the
    score matrix stays within about 512 MiB.
    """
    B, Hq, Hkv, Nq, Nk, d = _check_qkv(q, k, v, tensor_layout, INPUT_DTYPES + (torch.float64,))
    if is_empty_query(B, Hq, Nq):
        return _empty_result(q, tensor_layout, return_lse)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    group = Hq // Hkv
    # GQA without copies: (B, Hkv, group, N, d) against (B, Hkv, 1, Nk, d).
    qh = _to_hnd(q, tensor_layout).to(compute_dtype).reshape(B, Hkv, group, Nq, d)
    kh = _to_hnd(k, tensor_layout).to(compute_dtype)[:, :, None]
    vh = _to_hnd(v, tensor_layout).to(compute_dtype)[:, :, None]

    rows_per_chunk = max(1, (1 << 26) // (B * Hq * Nk))
    keys = torch.arange(Nk, device=q.device)
    outs, lses = [], []
    for start in range(0, Nq, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, Nq), device=q.device)
        scores = (qh[:, :, :, rows] @ kh.transpose(-1, -2)) * scale
        if is_causal:
            scores = scores.masked_fill(_causal_mask(rows, keys), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse[..., None]) @ vh)
        lses.append(lse)
    o = torch.cat(outs, dim=3).reshape(B, Hq, Nq, d).to(q.dtype)
    lse = torch.cat(lses, dim=3).reshape(B, Hq, Nq).float() if return_lse else None
    return _from_hnd(o, tensor_layout), lse


# ---------------------------------------------------------------------------------------
# Group quantizer (numerics.md §1.3)


def _qk_max(cfg: AttnConfig) -> float:
    return INT4_MAX if cfg.qk_dtype is QKDType.INT4 else INT8_MAX


def _round_half_away(x: Tensor) -> Tensor:
    # In float64 the + 0.5 is exact for every fp32 value, so 0.49999997 stays 0 (fp32 would
    # round the sum up to 1.0): this matches roundf() in the kernels.
    return torch.trunc(x.double() + 0.5 * torch.sign(x).double()).to(x.dtype)


def _quantize_groups(x: Tensor, group_of_row: Tensor, n_groups: int, qmax: float):
    """Symmetric absmax quantization of float32 x (..., N, D); row n belongs to group
    group_of_row[n] and every channel of a row shares its group's scale.

    Returns (int8 values like x, float32 scale (..., n_groups)). Zero rows never raise an
    absmax, and an empty or all-zero group gets ABSMAX_EPS / qmax, not 0.
    """
    row_amax = x.abs().amax(dim=-1)
    index = group_of_row.expand_as(row_amax)
    amax = torch.full((*row_amax.shape[:-1], n_groups), ABSMAX_EPS, dtype=torch.float32, device=x.device)
    amax = amax.scatter_reduce(-1, index, row_amax, reduce="amax", include_self=True)
    scale = amax / qmax
    inv = torch.div(torch.full_like(amax, qmax), amax)  # a true fp32 division, as in the kernel
    values = _round_half_away(x * inv[..., group_of_row, None])
    return values.to(torch.int8), scale


def hadamard_rotate(x: Tensor) -> Tensor:
    """x (..., D), D a power of two, times the orthonormal Walsh-Hadamard matrix (Sylvester
    order), in x's dtype: butterflies (a + b, a - b) over strides 1, 2, 4, ..., then one multiply
    by 1/sqrt(D) (numerics.md §1.6). Its own inverse."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head dim, got {d}")
    lead = x.shape[:-1]
    h = 1
    while h < d:
        y = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, d)
        h *= 2
    return x * (1.0 / math.sqrt(d))


def _padded_fp32(x_hnd: Tensor, n_pad: int, d_pad: int) -> Tensor:
    """float32 copy zero-padded to (B, H, n_pad, d_pad)."""
    B, H, N, d = x_hnd.shape
    out = x_hnd.new_zeros((B, H, n_pad, d_pad), dtype=torch.float32)
    out[:, :, :N, :d] = x_hnd
    return out


def _geometry(x_hnd: Tensor, cfg: AttnConfig) -> tuple[int, TileShape]:
    d = x_hnd.shape[-1]
    largest = NATIVE_HEAD_DIMS[cfg.family][-1]
    # padded_head_dim answers a too-large dim for wgmma with an AssertionError; say it plainly.
    if d > largest:
        raise ValueError(f"{cfg.family.value} kernels serve head dims up to {largest}, got {d}")
    d_pad = padded_head_dim(d, cfg.family)
    return d_pad, tile_shape(cfg.family, d_pad)


def _real_rows(n: int, n_pad: int, device) -> Tensor:
    return (torch.arange(n_pad, device=device) < n)[:, None]


# ---------------------------------------------------------------------------------------
# Smoothing (numerics.md §1.1, 1.2, 1.5)


def _channel_mean(x_pad: Tensor, n: int) -> Tensor:
    """Mean over the n real rows of a zero-padded (B, H, N_pad, D) tensor -> (B, H, D)."""
    return x_pad[:, :, :n].mean(dim=2)


def mean_on_input_grid(mean: Tensor, amax: Tensor, dtype: torch.dtype) -> Tensor:
    """`mean` rounded (half to even) to a multiple of `dtype`'s spacing at `amax`, the largest
    |x| of its channel (numerics.md §1.5): every x of that dtype with |x| <= amax is a multiple
    of it, so x - mean needs no rounding unless it grows into a higher binade. An all-zero
    channel keeps its mean (0)."""
    _, exponent = torch.frexp(amax)  # amax = m * 2^exponent, m in [0.5, 1)
    spacing = torch.ldexp(torch.full_like(amax, torch.finfo(dtype).eps), exponent - 1)  # eps = 2^-mantissa bits
    rounded = torch.round(mean / spacing) * spacing
    return torch.where((amax > 0) & torch.isfinite(amax), rounded, mean)


def _block_means(x_pad: Tensor, n: int, rows_per_block: int) -> Tensor:
    """Per-block channel means of the real rows (a partial last block averages only its real
    rows; a block with none is zero) -> (B, H, n_blocks, D)."""
    B, H, n_pad, D = x_pad.shape
    n_blocks = -(-n_pad // rows_per_block)
    blocks = x_pad.new_zeros((B, H, n_blocks * rows_per_block, D))
    blocks[:, :, :n_pad] = x_pad
    sums = blocks.view(B, H, n_blocks, rows_per_block, D).sum(dim=3)
    starts = torch.arange(n_blocks, device=x_pad.device) * rows_per_block
    counts = (n - starts).clamp(0, rows_per_block).to(torch.float32)
    return sums / counts.clamp(min=1.0)[:, None]


# ---------------------------------------------------------------------------------------
# Quantizers (public: kernel tests compare their own quantization passes against these)


def quantize_q(q: Tensor, cfg: AttnConfig, *, tensor_layout: str = "HND") -> QuantQ:
    """Q (optionally smoothed per block of q_mean_rows rows) quantized per Q group."""
    qh = _to_hnd(q, tensor_layout)
    n = qh.shape[2]
    d_pad, tile = _geometry(qh, cfg)
    n_pad = _round_up(n, tile.cta_q)
    x = _padded_fp32(qh, n_pad, d_pad)
    rows = torch.arange(n_pad, device=q.device)

    qbar = qbar_values = qbar_scale = None
    if cfg.smooth_q:
        qbar = _block_means(x, n, tile.q_mean_rows)
        x = torch.where(_real_rows(n, n_pad, q.device), x - qbar[:, :, rows // tile.q_mean_rows], 0.0)
        blocks = torch.arange(qbar.shape[2], device=q.device)
        if cfg.hadamard:
            qbar = hadamard_rotate(qbar)
        qbar_values, qbar_scale = _quantize_groups(qbar, blocks, qbar.shape[2], INT8_MAX)
    if cfg.hadamard:
        x = hadamard_rotate(x)

    groups = q_group_of_row(rows, tile, cfg.granularity)
    values, scale = _quantize_groups(x, groups, num_q_groups(n, tile, cfg.granularity), _qk_max(cfg))
    return QuantQ(values, scale, qbar, qbar_values, qbar_scale)


def _keys_fp32(t: Tensor, cfg: AttnConfig, tensor_layout: str, smooth: bool, mean_on_grid: bool = False):
    """K or V in HND fp32, padded to whole key tiles and to D, minus its per-channel mean
    over the real keys when `smooth` (padding stays zero), that mean taken on t's grid
    (`mean_on_input_grid`) when `mean_on_grid`. Returns (x, mean, n, n_pad, tile)."""
    th = _to_hnd(t, tensor_layout)
    n = th.shape[2]
    d_pad, tile = _geometry(th, cfg)
    n_pad = _round_up(n, tile.k_tile)
    x = _padded_fp32(th, n_pad, d_pad)
    if smooth:
        mean = _channel_mean(x, n)
        if mean_on_grid:
            mean = mean_on_input_grid(mean, x.abs().amax(dim=2), t.dtype)
        x = torch.where(_real_rows(n, n_pad, t.device), x - mean[:, :, None], 0.0)
    else:
        mean = x.new_zeros((*x.shape[:2], d_pad))
    return x, mean, n, n_pad, tile


def quantize_k(k: Tensor, cfg: AttnConfig, *, tensor_layout: str = "HND") -> QuantK:
    """K minus its mean over all keys (when smooth_k) quantized per K group."""
    x, kbar, n, n_pad, tile = _keys_fp32(k, cfg, tensor_layout, cfg.smooth_k)
    if cfg.hadamard:  # kbar stays unrotated: the lse adds q . kbar with the caller's q
        x = hadamard_rotate(x)

    groups = k_group_of_key(torch.arange(n_pad, device=k.device), tile, cfg.granularity)
    values, scale = _quantize_groups(x, groups, num_k_groups(n, tile, cfg.granularity), _qk_max(cfg))
    return QuantK(values, scale, kbar)


def _e4m3(x: Tensor) -> Tensor:
    """Round float32 to the nearest E4M3 value (ties to even), saturating at +-448."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def quantize_v(v: Tensor, cfg: AttnConfig, *, tensor_layout: str = "HND") -> QuantV:
    """V (minus its mean on V's grid when smooth_v) as the PV matmul consumes it."""
    x, vbar, n, n_pad, tile = _keys_fp32(v, cfg, tensor_layout, cfg.smooth_v, mean_on_grid=True)

    if cfg.pv_dtype is PVDType.FP16:
        return QuantV(x.to(v.dtype).to(torch.float32), torch.ones_like(vbar), vbar)
    v_max = cfg.v_fp8_max
    amax = x.abs().amax(dim=2).clamp(min=ABSMAX_EPS)
    inv = torch.div(torch.full_like(amax, v_max), amax)
    return QuantV(_e4m3(x * inv[:, :, None]), amax / v_max, vbar)


# ---------------------------------------------------------------------------------------
# INT4 storage


def pack_int4(values: Tensor) -> Tensor:
    """int8 values in [-7, 7] (last dim even) -> int8 bytes, last dim halved.
    Low nibble = even channel, high nibble = odd channel (two's complement nibbles)."""
    if values.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects int8 values, got {values.dtype}")
    if values.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {values.shape[-1]}")
    if values.numel() and (values.min() < -INT4_MAX or values.max() > INT4_MAX):
        raise ValueError("pack_int4 values must lie in [-7, 7]")
    nibbles = values.to(torch.int16) & 0xF
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: int8 bytes -> int8 values, last dim doubled."""
    if packed.dtype != torch.int8:
        raise ValueError(f"unpack_int4 expects int8 bytes, got {packed.dtype}")
    byte = packed.view(torch.uint8).to(torch.int16)
    low, high = byte & 0xF, byte >> 4
    nibbles = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


# ---------------------------------------------------------------------------------------
# Main loop (numerics.md §2)


def _truncate_mantissa(x: Tensor, mantissa_bits: int) -> Tensor:
    """Keep the top `mantissa_bits` of float32's 23 fraction bits, rounding toward zero."""
    drop = 23 - mantissa_bits
    return (x.view(torch.int32) & -(1 << drop)).view(torch.float32)


def _tile_pv(p_hat: Tensor, v_tile: Tensor, acc_mantissa_bits: int | None, acc: Tensor | None = None) -> Tensor:
    """acc + P_hat . V over one key tile in the PV accumulator (the inner level; from zero
    when acc is None), truncated after every 32-key step when acc_mantissa_bits is set."""
    if acc_mantissa_bits is None:
        return p_hat @ v_tile if acc is None else acc + p_hat @ v_tile
    r = acc
    for start in range(0, p_hat.shape[-1], FP8_MMA_K_STEP):
        step = p_hat[..., start : start + FP8_MMA_K_STEP] @ v_tile[..., start : start + FP8_MMA_K_STEP, :]
        r = _truncate_mantissa(step if r is None else r + step, acc_mantissa_bits)
    return r


def round_to_fp16(x: Tensor) -> Tensor:
    """float64 -> nearest fp16 value (ties to even, +-inf past 65504, fp16 subnormals), as
    float64, in one rounding (torch's float64 -> float16 cast rounds twice, through fp32)."""
    mag = x.abs()
    exponent = torch.floor(torch.log2(mag.clamp(min=2.0 ** -24))).clamp(min=-14)
    ulp = torch.exp2(exponent - 10)
    r = torch.round(x / ulp) * ulp  # x / ulp is exact: a power-of-two division
    return torch.where(r.abs() > FP16_MAX, torch.sign(x) * math.inf, r)


def _tile_pv_fp16_acc(p_hat: Tensor, v_tile: Tensor, k_step: int) -> Tensor:
    """P_hat . V over one key tile in an fp16 accumulator that starts at zero: every MMA
    k-step's exact sum is added to it and the result rounded to fp16 (numerics.md §2.6).
    Returned as float32 (the value the kernel converts and adds into O)."""
    p64, v64 = p_hat.double(), v_tile.double()
    r = None
    for start in range(0, p_hat.shape[-1], k_step):
        step = p64[..., start : start + k_step] @ v64[..., start : start + k_step, :]
        r = round_to_fp16(step if r is None else r + step)
    return r.float()


def _check_acc_bits(bits: int | None, flush_tiles: int | None, cfg: AttnConfig) -> None:
    if (bits is not None or flush_tiles is not None) and cfg.pv_dtype is not PVDType.FP8:
        raise ValueError("fp8_acc_mantissa_bits and fp8_flush_tiles only apply to fp8 PV")
    if bits is not None and (not isinstance(bits, int) or not 1 <= bits <= 23):
        raise ValueError(f"fp8_acc_mantissa_bits must be an int in 1..23, got {bits!r}")
    if flush_tiles is not None and (isinstance(flush_tiles, bool) or not isinstance(flush_tiles, int)
                                    or flush_tiles < 1):
        raise ValueError(f"fp8_flush_tiles must be a positive int, got {flush_tiles!r}")
    if bits is not None and cfg.pv_accum is PVAccum.FP16:
        raise ValueError("fp8_acc_mantissa_bits models an fp32 accumulator; pv_accum='fp16' rounds to fp16")
    if flush_tiles is not None and cfg.family is not Family.WGMMA:
        raise ValueError("fp8_flush_tiles models the wgmma kernels (row sums from the PV accumulator)")


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cfg: AttnConfig,
    *,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    fp8_acc_mantissa_bits: int | None = None,
    fp8_flush_tiles: int | None = None,
    rounded_p_row_sums: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """What a SageAttention2 kernel configured by `cfg` computes (docs/numerics.md), in fp32.

    q, k, v: fp16, bf16 or fp32 in `tensor_layout`, GQA allowed. Returns o in q's dtype and
    layout and, when return_lse, lse (B, Hq, Nq) float32 in natural-log units including the
    K-smoothing correction. `fp8_acc_mantissa_bits` (fp8 PV only) truncates each tile's
    partial PV sum to that many mantissa bits after every 32-key step, as Hopper's FP8
    wgmma accumulator does with 13. `fp8_flush_tiles` (fp8 PV only) models a kernel whose PV
    accumulator is not restarted every tile: it carries its sum (rescaled by alpha in fp32)
    across that many key tiles and only then adds it into the fp32 O; None is the two-level
    scheme of today's kernels (numerics.md step 6), the same as 1. `rounded_p_row_sums`: l sums
    P as rounded for P . V (numerics.md step 5), as the wgmma kernels always do and the mma
    kernels' 16-bit P . V with an fp32 accumulator does where that MMA runs at full rate (the
    kernel's `row_sums_by_mma` launch info); None: the family's fixed choice (wgmma yes, mma no).

    Integer dot products go through fp32 matmuls, which are exact here; on CUDA keep TF32
    matmuls off (the default) so fp32 P is not rounded when the inputs are fp32.
    """
    B, Hq, Hkv, Nq, Nk, d = _check_qkv(q, k, v, tensor_layout, INPUT_DTYPES)
    _check_acc_bits(fp8_acc_mantissa_bits, fp8_flush_tiles, cfg)
    fp16_acc = cfg.pv_accum is PVAccum.FP16
    if fp16_acc and cfg.pv_dtype is PVDType.FP16 and q.dtype != torch.float16:
        raise ValueError(f"pv_accum='fp16' with fp16 PV needs fp16 inputs (the MMA takes fp16 V), got {q.dtype}")
    if is_empty_query(B, Hq, Nq):
        return _empty_result(q, tensor_layout, return_lse)
    # The kernels need sm_scale >= 0 and are served a negative one as (-Q, |sm_scale|).
    q, scale = fold_scale_sign(q, 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale))
    device = q.device
    fp8_pv = cfg.pv_dtype is PVDType.FP8

    qq = quantize_q(q, cfg, tensor_layout=tensor_layout)
    kq = quantize_k(k, cfg, tensor_layout=tensor_layout)
    vq = quantize_v(v, cfg, tensor_layout=tensor_layout)
    _, tile = _geometry(_to_hnd(q, tensor_layout), cfg)
    nq_pad, nk_pad, D = qq.values.shape[2], kq.values.shape[2], qq.values.shape[3]
    kv_head = _kv_head_of(Hq, Hkv, device)
    rows = torch.arange(nq_pad, device=device)
    keys = torch.arange(nk_pad, device=device)

    c = scale * LOG2_E
    q_hat = qq.values.to(torch.float32)
    q_scale = qq.scale[..., q_group_of_row(rows, tile, cfg.granularity)]
    k_scale = kq.scale[..., k_group_of_key(keys, tile, cfg.granularity)]
    if cfg.smooth_q:
        qbar_hat = qq.qbar_values.to(torch.float32)
        block_of_row = rows // tile.q_mean_rows
    p_offset = cfg.p_log2_max
    wgmma = cfg.family is Family.WGMMA
    if rounded_p_row_sums is not None and rounded_p_row_sums != wgmma and (
            wgmma or fp8_pv or cfg.pv_accum is PVAccum.FP16):
        raise ValueError("rounded_p_row_sums can differ from the family's only for mma 16-bit P.V with an fp32 "
                         "accumulator")
    sum_rounded_p = wgmma if rounded_p_row_sums is None else rounded_p_row_sums  # numerics.md step 5

    m = torch.full((B, Hq, nq_pad), float("-inf"), device=device)
    l = torch.zeros((B, Hq, nq_pad), device=device)
    o = torch.zeros((B, Hq, nq_pad, D), device=device)
    o_acc = l_acc = None  # wgmma: the PV accumulator, carried across flush_tiles tiles
    flush_tiles = fp8_flush_tiles or 1
    ones = torch.ones((tile.k_tile, 1), device=device)
    for tile_index, start in enumerate(range(0, nk_pad, tile.k_tile)):
        tile_keys = keys[start : start + tile.k_tile]
        k_hat = kq.values[:, kv_head, start : start + tile.k_tile].to(torch.float32)
        k_scale_tile = k_scale[:, kv_head, start : start + tile.k_tile]
        v_tile = vq.values[:, kv_head, start : start + tile.k_tile]

        # Integer dot products are exact in fp32: |sum| <= 256 * 127 * 127 < 2**24.
        s_int = q_hat @ k_hat.transpose(-1, -2)
        x = s_int * (q_scale[..., :, None] * k_scale_tile[..., None, :]) * c
        if cfg.smooth_q:
            ds_int = qbar_hat @ k_hat.transpose(-1, -2)
            ds = ds_int * (qq.qbar_scale[..., :, None] * k_scale_tile[..., None, :]) * c
            x = x + ds[:, :, block_of_row]
        hidden = (tile_keys >= Nk)[None, :]
        if is_causal:
            hidden = hidden | _causal_mask(rows, tile_keys)
        x = x.masked_fill(hidden, float("-inf"))

        # Every row sees key 0, so m is finite from the first tile on.
        m_new = torch.maximum(m, x.amax(dim=-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(x - m_new[..., None] + p_offset)
        p_hat = _e4m3(p) if fp8_pv else p.to(q.dtype).to(torch.float32)
        if sum_rounded_p and wgmma:
            # wgmma: the row sums come from the PV operand through a ones column, in the same
            # accumulator as R; R restarts every fp8_flush_tiles tiles (default 1: two-level).
            l, o = alpha * l, alpha[..., None] * o
            carried = lambda acc: None if acc is None else alpha[..., None] * acc
            l_acc = _tile_pv(p_hat, ones, fp8_acc_mantissa_bits, carried(l_acc))
            o_acc = _tile_pv(p_hat, v_tile, fp8_acc_mantissa_bits, carried(o_acc))
            if (tile_index + 1) % flush_tiles == 0 or start + tile.k_tile >= nk_pad:
                l, o = l + l_acc[..., 0], o + o_acc
                l_acc = o_acc = None
        else:
            l = alpha * l + (p_hat if sum_rounded_p else p).sum(dim=-1)
            if fp16_acc:
                r = _tile_pv_fp16_acc(p_hat, v_tile, MMA_K_STEP[cfg.pv_dtype])
            else:
                r = _tile_pv(p_hat, v_tile, fp8_acc_mantissa_bits)
            o = alpha[..., None] * o + r
        m = m_new

    out = _epilogue(o, l, vq, kv_head, fp8_pv)[:, :, :Nq, :d].to(q.dtype)
    lse = None
    if return_lse:
        lse = _lse(m[..., :Nq], l[..., :Nq], _to_hnd(q, tensor_layout), kq.kbar[:, kv_head, :d], scale, p_offset)
    return _from_hnd(out, tensor_layout), lse


# ---------------------------------------------------------------------------------------
# Epilogue (numerics.md §3)


def _epilogue(o: Tensor, l: Tensor, vq: QuantV, kv_head: Tensor, fp8_pv: bool) -> Tensor:
    o = o / l[..., None]
    if fp8_pv:
        o = o * vq.scale[:, kv_head, None, :]
    return o + vq.vbar[:, kv_head, None, :]


def _lse(m: Tensor, l: Tensor, q_hnd: Tensor, kbar: Tensor, sm_scale: float, p_log2_max: float) -> Tensor:
    """Natural-log lse of the unsmoothed scores: the base-2 running state, with P's scale
    2^p_log2_max removed, plus sm_scale * (q . kbar) for the dropped K mean."""
    k_mean_term = (q_hnd.to(torch.float32) @ kbar[..., None]).squeeze(-1)
    return (m + torch.log2(l) - p_log2_max) * LN_2 + sm_scale * k_mean_term
