"""Hopper (sm_90a) backend: INT8 QK^T with FP8 or fp16/bf16 PV on wgmma (csrc/attn_wgmma.cu).

`attention()` = `prepare()` (the fused CUDA quantizers of csrc/quant.cu, through
`mma.quantize` with this family's tile) + `run()` (one kernel launch). The two halves are
public so benchmarks can time the kernel alone.

Operands, exactly the groups of `tile_shape(Family.WGMMA, D)` (docs/numerics.md):
  Q  int8 (B, Hq, Nq_pad, D), one scale per rows {g, g+8} of each 16-row slice;
  K  int8 (B, Hkv, Nk_pad, D) of K - mean(K), one scale per keys {8n+2t, 8n+2t+1} of a tile;
  V  FP8 PV: e4m3 V^T (B, Hkv, D, Nk_pad) with each 16-token group stored in the order
     0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15, plus per-channel scales;
     fp16/bf16 PV: the caller's V read in place through TMA when its rows are 16-byte
     aligned, else the quantizer's zero-padded contiguous copy.
The lse's K-smoothing term (sm_scale * q . kbar) comes from the Q quantizer's fused dot.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ..config import (
    NATIVE_HEAD_DIMS,
    Family,
    Granularity,
    PVDType,
    QKDType,
    padded_head_dim,
    tile_shape,
)
from ..loader import capability, library_for_device
from . import KernelError, input_reason, mma

SYMBOL = "sa2_wgmma_attention"
# Schedule codes of the C entry point (Schedule in attn_wgmma.cuh). "sequential3wg" runs three
# consumer warpgroups (192-row CTAs); padded head dim 64 builds only the two sequential ones.
SCHEDULES = {"overlap": 2, "pingpong": 1, "sequential": 0, "sequential3wg": 3}
_HEAD_DIM_64 = ("sequential", "sequential3wg")


def schedules_for(head_dim: int) -> tuple[str, ...]:
    """Schedules the kernel library has for this head dim."""
    dpad = padded_head_dim(head_dim, Family.WGMMA)
    return tuple(s for s in SCHEDULES if dpad == 128 or s in _HEAD_DIM_64)


# Fastest measured schedule per (PV type, padded head dim) on H100 (docs/notes-wgmma.md, v6).
_DEFAULT_SCHEDULES = {
    (PVDType.FP8, 128): "sequential3wg",
    (PVDType.FP8, 64): "sequential3wg",
    (PVDType.FP16, 128): "overlap",
    (PVDType.FP16, 64): "sequential3wg",
}


def default_schedule(pv_dtype: PVDType, head_dim: int) -> str:
    return _DEFAULT_SCHEDULES[(PVDType(pv_dtype), padded_head_dim(head_dim, Family.WGMMA))]



def unsupported_reason(q, k, v, *, layout, cfg, is_causal):
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not on a CUDA device"
    if capability(q.device) != (9, 0):
        return "wgmma kernels need compute capability 9.0 (Hopper)"
    if cfg.family is not Family.WGMMA:
        return f"config is laid out for the {cfg.family.value} family"
    if cfg.hadamard:
        return "the Hadamard rotation is implemented in the reference only"
    if cfg.qk_dtype is not QKDType.INT8:
        return "Hopper has no INT4 tensor cores (use int8)"
    if cfg.granularity is not Granularity.PER_THREAD:
        return f"wgmma kernels implement per_thread groups only, not {cfg.granularity.value}"
    if cfg.smooth_q:
        return "Q smoothing is served by the mma family"
    if cfg.smooth_v:
        return "V smoothing is not implemented in the wgmma kernels"
    why = input_reason(q, k, v, layout, max(NATIVE_HEAD_DIMS[Family.WGMMA]))
    if why:
        return why
    lib, reason = library_for_device(q.device)
    if lib is None:
        return reason
    if "wgmma" not in lib.families or not lib.has(SYMBOL) or not all(lib.has(x) for x in mma.QUANT_SYMBOLS):
        return f"kernel library for {lib.tag} was built without the wgmma family"
    return None


# ---------------------------------------------------------------------------------------------
# Quantization and launch


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


@dataclass
class Prepared:
    """Quantized operands and everything `run` needs (tensors kept alive until the launch)."""

    q: torch.Tensor  # caller's q (for shapes, dtype and layout)
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
    q_dot_kbar: torch.Tensor | None  # (B, Hq, Nq_pad) q . kbar, when prepared for the lse
    v_op: torch.Tensor  # (B, Hkv, D, Nk_pad) uint8 for fp8, (B, Hkv, Nk, d or D) for 16-bit
    v_scale: torch.Tensor | None


def prepare(q, k, v, *, layout, cfg, is_causal, sm_scale=None, return_lse=False) -> Prepared:
    """Quantizes q, k, v on the current stream. `return_lse` also computes q . kbar, which
    `run(..., return_lse=True)` needs when K is smoothed."""
    d = q.shape[-1]
    dpad = padded_head_dim(d, Family.WGMMA)
    lib, reason = library_for_device(q.device)
    if lib is None:
        raise KernelError(reason)
    with torch.cuda.device(q.device):
        qz = mma.quantize(q, k, v, layout=layout, cfg=cfg, tile=tile_shape(Family.WGMMA, dpad),
                          with_q_dot_kbar=return_lse and cfg.smooth_k, lib=lib)
    if cfg.pv_dtype is PVDType.FP8:
        pv_mode = 0
    else:
        pv_mode = 2 if q.dtype == torch.bfloat16 else 1
    k_h = _hnd(k, layout)
    return Prepared(
        q=q, layout=layout, is_causal=bool(is_causal),
        sm_scale=float(sm_scale if sm_scale is not None else d**-0.5),
        head_dim=d, dpad=dpad, heads_kv=k_h.shape[1], num_k=k_h.shape[2], pv_mode=pv_mode,
        q_int8=qz.q, q_scale=qz.q_scale, k_int8=qz.k, k_scale=qz.k_scale, kbar=qz.kbar,
        q_dot_kbar=qz.q_dot_kbar, v_op=qz.v, v_scale=qz.v_scale,
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
    if return_lse and prep.kbar is not None and prep.q_dot_kbar is None:
        raise ValueError("the lse of a smoothed-K call needs prepare(..., return_lse=True)")
    if schedule is None:
        schedule = default_schedule(PVDType.FP8 if prep.pv_mode == 0 else PVDType.FP16, prep.dpad)
    if schedule not in schedules_for(prep.dpad):
        raise ValueError(f"schedule {schedule!r} does not exist at head dim {prep.head_dim}")
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
        lse.add_(prep.q_dot_kbar[:, :, :nq], alpha=prep.sm_scale)
    return out, lse


class _AttentionPlan:
    """attention() for one key (shapes, strides, dtypes, device, cfg, flags): the fused
    quantizer's plan and the kernel's shape / stride arrays, built once; a call allocates
    one workspace, O (and lse) and makes two library calls."""

    def __init__(self, lib, q, k, v, layout, cfg, is_causal, sm_scale, return_lse):
        self.layout, self.cfg, self.is_causal, self.return_lse = layout, cfg, bool(is_causal), return_lse
        q_h, k_h, v_h = (_hnd(x, layout) for x in (q, k, v))
        b, hq, nq, d = q_h.shape
        hk, nk = k_h.shape[1], k_h.shape[2]
        self.sm_scale = float(sm_scale if sm_scale is not None else d**-0.5)
        dpad = padded_head_dim(d, Family.WGMMA)
        self.fp8 = cfg.pv_dtype is PVDType.FP8
        v_strided_ok = d % 8 == 0 and all(st % 8 == 0 for st in v_h.stride()[:3])
        self.fast = mma.fused_eligible(lib, cfg) and (self.fp8 or v_strided_ok)
        if not self.fast:
            return
        self.lib, self.fn = _kernel(q.device)
        mma._functions(lib)
        self.qkv = plan = mma._QkvPlan(q_h, k_h, v_h, cfg, tile_shape(Family.WGMMA, dpad), dpad, None,
                                       return_lse and cfg.smooth_k)
        self.pv_mode = 0 if self.fp8 else (2 if q.dtype == torch.bfloat16 else 1)
        self.schedule = SCHEDULES[default_schedule(cfg.pv_dtype, d)]
        self.out_shape, self.dtype, self.lse_shape = q.shape, q.dtype, (b, hq, nq)
        self.shape = (ctypes.c_int64 * 7)(b, hq, hk, nq, nk, dpad, d)
        q_groups = plan.parts[1][1][2]
        k_groups = plan.parts[3][1][2]
        v_strides = ((hk * dpad * plan.v_pad, dpad * plan.v_pad, plan.v_pad) if self.fp8
                     else tuple(v_h.stride()[:3]))
        self.strides = (ctypes.c_int64 * 20)(
            hq * plan.nq_pad * dpad, plan.nq_pad * dpad, dpad,
            hk * plan.nk_pad * dpad, plan.nk_pad * dpad, dpad,
            *v_strides,
            hq * q_groups, q_groups, hk * k_groups, k_groups,
            *((hk * dpad, dpad) if self.fp8 else (0, 0)),
            *mma._contiguous_bhn_strides(q.shape, layout),
            *((hq * nq, nq) if return_lse else (0, 0)),
        )
        self.lse_fix = return_lse and cfg.smooth_k
        self.nq = nq
        self.bf16 = int(q.dtype == torch.bfloat16)

    def __call__(self, q, k, v):
        if not self.fast or (not self.fp8 and v.data_ptr() % 16):
            prep = prepare(q, k, v, layout=self.layout, cfg=self.cfg, is_causal=self.is_causal,
                           sm_scale=self.sm_scale, return_lse=self.return_lse)
            return run(prep, return_lse=self.return_lse)
        dev, plan = q.device, self.qkv
        stream = mma._stream(dev)
        buf = torch.empty(plan.nbytes, dtype=torch.uint8, device=dev)
        base = buf.data_ptr()
        plan.enqueue(self.lib, q.data_ptr(), k.data_ptr(), v.data_ptr(), base, dev, stream)
        out = torch.empty(self.out_shape, dtype=self.dtype, device=dev)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=dev) if self.return_lse else None
        ptr = plan.pointer
        rc = self.fn(ptr(base, "q"), ptr(base, "k"), ptr(base, "v") if self.fp8 else v.data_ptr(),
                     ptr(base, "q_scale"), ptr(base, "k_scale"), ptr(base, "v_scale"),
                     out.data_ptr(), None if lse is None else lse.data_ptr(), self.shape, self.strides,
                     self.pv_mode, self.bf16, int(self.is_causal), self.schedule, self.sm_scale, stream)
        if rc != 0:
            raise KernelError(f"{SYMBOL} failed ({rc}): {self.lib.last_error()}")
        if self.lse_fix:
            # The kernel saw K - kbar; the dropped sm_scale * q . kbar is the same for every key.
            lse.add_(plan.view(buf, "q_dot_kbar")[:, :, :self.nq], alpha=self.sm_scale)
        return out, lse


_attention_plans: dict = {}


def attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse):
    """The dispatcher asked `unsupported_reason` before; the plan is built once per key."""
    key = mma.plan_key(q, k, v, layout, cfg, is_causal, sm_scale, return_lse)
    plan = _attention_plans.get(key)
    if plan is None:
        lib, reason = library_for_device(q.device)
        if lib is None:
            raise KernelError(reason)
        plan = _AttentionPlan(lib, q, k, v, layout, cfg, is_causal, sm_scale, return_lse)
        if len(_attention_plans) >= mma._MAX_PLANS:
            _attention_plans.clear()
        _attention_plans[key] = plan
    guard = mma.current_device_guard(q.device)
    if guard is None:
        return plan(q, k, v)
    with guard:
        return plan(q, k, v)
