"""Hopper (sm_90a) backend: INT8 QK^T with FP8 or fp16/bf16 PV on wgmma (csrc/include/sa2/attn_wgmma.cuh).

`attention()` = `prepare()` (the fused CUDA quantizers of csrc/include/sa2/quant_kernels.cuh, through
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
from .. import abi, driver, kernels
from ..loader import KernelBuildError, arch_of, kernels_for_device
from . import KernelError, calls, input_reason, mma

# Schedules (kernels.WGMMA_SCHEDULES): "sequential3wg" runs three consumer warpgroups (192-row
# CTAs); padded head dim 64 builds only the two sequential ones. Only the default schedule of
# each (PV type, head dim) is in the product build; the others compile on first use.
SCHEDULES = tuple(kernels.WGMMA_SCHEDULES)


def schedules_for(head_dim: int) -> tuple[str, ...]:
    """Schedules that exist for this head dim."""
    dpad = padded_head_dim(head_dim, Family.WGMMA)
    return tuple(s for s in SCHEDULES if dpad == 128 or s in kernels.WGMMA_HEAD_DIM_64)


def default_schedule(pv_dtype: PVDType, head_dim: int) -> str:
    """Fastest measured schedule per (PV type, padded head dim) on H100 (docs/notes-wgmma.md, v6)."""
    return kernels.WGMMA_DEFAULT_SCHEDULE[(PVDType(pv_dtype) is PVDType.FP8, padded_head_dim(head_dim, Family.WGMMA))]


def kernel_for(pv_code: int, head_dim: int, schedule: str) -> kernels.Kernel:
    return kernels.wgmma_kernel(padded_head_dim(head_dim, Family.WGMMA), pv_code, schedule)



def unsupported_reason(q, k, v, *, layout, cfg, is_causal):
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not on a CUDA device"
    arch = arch_of(q.device)
    if arch is None or not arch.wgmma:
        return "wgmma kernels need Hopper (sm_90a)"
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
    why = input_reason(q, k, v, layout, max(NATIVE_HEAD_DIMS[Family.WGMMA]))
    if why:
        return why
    dk, reason = kernels_for_device(q.device)
    if dk is None:
        return reason
    pv = abi.PV_FP8 if cfg.pv_dtype is PVDType.FP8 else abi.PV_16BIT[q.dtype]
    return dk.available(kernel_for(pv, q.shape[-1], default_schedule(cfg.pv_dtype, q.shape[-1])))


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
    pv: int  # abi PV code
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
    dk = mma._device_kernels(q.device)
    with torch.cuda.device(q.device):
        qz = mma.quantize(q, k, v, layout=layout, cfg=cfg, tile=tile_shape(Family.WGMMA, dpad),
                          with_q_dot_kbar=return_lse and cfg.smooth_k, dk=dk)
    pv = abi.PV_FP8 if cfg.pv_dtype is PVDType.FP8 else abi.PV_16BIT[q.dtype]
    k_h = _hnd(k, layout)
    return Prepared(
        q=q, layout=layout, is_causal=bool(is_causal),
        sm_scale=float(sm_scale if sm_scale is not None else d**-0.5),
        head_dim=d, dpad=dpad, heads_kv=k_h.shape[1], num_k=k_h.shape[2], pv=pv,
        q_int8=qz.q, q_scale=qz.q_scale, k_int8=qz.k, k_scale=qz.k_scale, kbar=qz.kbar,
        q_dot_kbar=qz.q_dot_kbar, v_op=qz.v, v_scale=qz.v_scale,
    )


def _bhn_strides(t: torch.Tensor):
    """Element strides of (B, H, N) for a tensor laid out as (B, H, N, ...)."""
    return (t.stride(0), t.stride(1), t.stride(2))


_u64x4, _u64x3, _u32x4 = ctypes.c_uint64 * 4, ctypes.c_uint64 * 3, ctypes.c_uint32 * 4
_ONES = _u32x4(1, 1, 1, 1)
_Descriptor = ctypes.c_uint64 * (abi.TENSOR_MAP_BYTES // 8)


class _TensorMap:
    """The constant part of one 4-D tiled TMA descriptor (dims innermost first, element strides
    of dims 1..3, a 2-D box); `descriptor` gives the descriptor of one base address. Out-of-bound
    box elements are zero-filled by the copy engine."""

    def __init__(self, what: str, dtype: int, elem_bytes: int, dims, strides, box_inner: int, box_outer: int,
                 swizzle: int):
        for i, n in enumerate(dims):
            if not 1 <= n <= 0xFFFFFFFF:
                raise KernelError(f"{what}: dim {i} ({n}) out of range for a tensor map")
        byte_strides = [s * elem_bytes for s in strides]
        for i, st in enumerate(byte_strides):
            if st <= 0 or st % 16 or st >= 2**40:
                raise KernelError(f"{what}: stride {i + 1} ({st} bytes) must be a positive multiple of 16 "
                                  "below 2^40")
        self.what, self.dtype, self.swizzle = what, dtype, swizzle
        self.dims, self.strides = _u64x4(*dims), _u64x3(*byte_strides)
        self.box = _u32x4(box_inner, box_outer, 1, 1)
        self._encoded: dict[int, bytes] = {}  # base address -> descriptor

    def descriptor(self, drv, base: int) -> bytes:
        """The descriptor of the tensor at `base`: a pure function of the address and this map's
        constants, so it is encoded once per address."""
        d = self._encoded.get(base)
        if d is not None:
            return d
        if base % 16:
            raise KernelError(f"{self.what}: base address not 16-byte aligned")
        if drv.encode_tiled is None:
            raise KernelError("cuTensorMapEncodeTiled is not available from the driver")
        out = _Descriptor()
        rc = drv.encode_tiled(out, self.dtype, 4, ctypes.c_void_p(base), self.dims, self.strides, self.box, _ONES, 0,
                              self.swizzle, driver.TMA_L2_256B, 0)
        if rc != 0:
            raise KernelError(f"{self.what}: cuTensorMapEncodeTiled failed: CUDA error {rc} "
                              f"({drv.error_string(rc)})")
        d = bytes(out)
        if len(self._encoded) >= calls.MAX_MEMO:
            self._encoded.clear()
        self._encoded[base] = d
        return d


class _Launch:
    """Everything of one wgmma launch but the data pointers: kernel, grid, tensor maps and the
    parameter template."""

    # The three descriptors come first, in this order: `params` joins them in front of the scalars.
    assert (abi.WgmmaAttnParams.tm_q.offset, abi.WgmmaAttnParams.tm_k.offset, abi.WgmmaAttnParams.tm_v.offset,
            abi.WgmmaAttnParams.p.offset) == tuple(i * abi.TENSOR_MAP_BYTES for i in range(4))
    _MAPS_BYTES = abi.WgmmaAttnParams.p.offset

    def __init__(self, dk, kernel, *, b, hq, hk, nq, nk, dpad, d, pv, bf16_out, causal, sm_scale,
                 q_strides, k_strides, v_strides, qs_strides, ks_strides, vs_strides, o_strides, lse_strides,
                 out_align: int):
        if not 1 <= b <= 65535 or not 1 <= hq <= 65535 or hq % hk:
            raise KernelError("batch / heads out of range")
        if not (1 <= nq < 2**31 and 1 <= nk < 2**31 - 128):
            raise KernelError("sequence lengths out of range")
        if pv != abi.PV_FP8 and bf16_out != (pv == abi.PV_BF16):
            raise KernelError("16-bit PV writes its own dtype")
        self.dk, self.kernel = dk, kernel
        qk_swizzle = driver.TMA_SWIZZLE_128B if dpad == 128 else driver.TMA_SWIZZLE_64B
        self.maps = (
            _TensorMap("q", driver.TMA_UINT8, 1, (dpad, nq, hq, b), q_strides[::-1], dpad, kernel.info["cta_q"],
                       qk_swizzle),
            _TensorMap("k", driver.TMA_UINT8, 1, (dpad, nk, hk, b), k_strides[::-1], dpad, kernel.info["k_tile"],
                       qk_swizzle),
            # FP8: tokens are permuted inside each group of 16, so the map covers whole groups: keys
            # [nk, round_up(nk, 16)) are read from the buffer (zeros by contract), not zero-filled.
            _TensorMap("v", driver.TMA_UINT8, 1, (-(-nk // 16) * 16, dpad, hk, b), v_strides[::-1], 128, dpad,
                       driver.TMA_SWIZZLE_128B) if pv == abi.PV_FP8 else
            _TensorMap("v", driver.TMA_BFLOAT16 if pv == abi.PV_BF16 else driver.TMA_FLOAT16, 2, (d, nk, hk, b),
                       v_strides[::-1], 64, 128, driver.TMA_SWIZZLE_128B),
        )
        a = abi.WgmmaAttnParams()
        p = a.p
        p.q_scale_stride_b, p.q_scale_stride_h = qs_strides
        p.k_scale_stride_b, p.k_scale_stride_h = ks_strides
        p.v_scale_stride_b, p.v_scale_stride_h = vs_strides
        p.o_stride_b, p.o_stride_h, p.o_stride_n = o_strides
        p.lse_stride_b, p.lse_stride_h = lse_strides
        p.num_q, p.num_k, p.group_size, p.head_dim = nq, nk, hq // hk, d
        p.causal, p.out_bf16 = int(causal), int(bf16_out)
        # out_align: the output base address modulo 16 (pair stores need 4 bytes, row stores 16).
        p.out_vec2 = int(out_align % 4 == 0 and all(s % 2 == 0 for s in o_strides))
        p.out_rows16 = int(d == dpad and out_align == 0 and all(s % 8 == 0 for s in o_strides))
        # In float32, as the kernel's other scale products: both factors rounded to float32 first
        # (their double product is exact, so storing it rounds once, like a float32 multiply).
        p.scale_log2 = ctypes.c_float(sm_scale).value * ctypes.c_float(1.4426950408889634).value
        self.template = abi.ParamTemplate(a)
        self._scalars = self.template.data[self._MAPS_BYTES:]
        self.slots = tuple(self.template.slot(f"p.{f}") for f in ("q_scale", "k_scale", "v_scale", "out", "lse"))
        self.grid = (-(-nq // kernel.info["cta_q"]), hq, b)

    def params(self, q_ptr, k_ptr, v_ptr, q_scale, k_scale, v_scale, out_ptr, lse_ptr) -> bytes:
        """The launch's parameter bytes for these pointers (None or 0 where there is no tensor)."""
        drv = self.dk.drv
        maps = b"".join(m.descriptor(drv, ptr) for m, ptr in zip(self.maps, (q_ptr, k_ptr, v_ptr)))
        buf = self.template.words.from_buffer_copy(maps + self._scalars)
        for i, value in zip(self.slots, (q_scale, k_scale, v_scale, out_ptr, lse_ptr)):
            if value:
                buf[i] = value
        return bytes(buf)

    def __call__(self, q_ptr, k_ptr, v_ptr, q_scale, k_scale, v_scale, out_ptr, lse_ptr, stream):
        blob = self.params(q_ptr, k_ptr, v_ptr, q_scale, k_scale, v_scale, out_ptr, lse_ptr)
        self.dk.drv.ensure_context(self.dk.index)
        self.kernel.launch(self.grid, abi.param_pointer(blob), stream)


def _get(dk, kernel):
    try:
        return dk.get(kernel)
    except KernelBuildError as e:
        raise KernelError(str(e)) from None


_run_launches: dict = {}


def run(prep: Prepared, *, return_lse: bool = False, schedule: str | None = None,
        out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """Launches the kernel. `out` / `lse` may be given (tests poison them first); they must
    have the shapes and dtypes `run` would allocate, any element strides."""
    q = prep.q
    if return_lse and prep.kbar is not None and prep.q_dot_kbar is None:
        raise ValueError("the lse of a smoothed-K call needs prepare(..., return_lse=True)")
    if schedule is None:
        schedule = default_schedule(PVDType.FP8 if prep.pv == abi.PV_FP8 else PVDType.FP16, prep.dpad)
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
    dk = mma._device_kernels(q.device)
    v_scale = prep.v_scale
    geometry = dict(
        b=b, hq=hq, hk=prep.heads_kv, nq=nq, nk=prep.num_k, dpad=prep.dpad, d=d, pv=prep.pv,
        bf16_out=q.dtype == torch.bfloat16, causal=prep.is_causal, sm_scale=prep.sm_scale,
        q_strides=_bhn_strides(prep.q_int8), k_strides=_bhn_strides(prep.k_int8), v_strides=_bhn_strides(prep.v_op),
        qs_strides=tuple(prep.q_scale.stride()[:2]), ks_strides=tuple(prep.k_scale.stride()[:2]),
        vs_strides=tuple(v_scale.stride()[:2]) if v_scale is not None else (0, 0), o_strides=_bhn_strides(out_h),
        lse_strides=tuple(lse.stride()[:2]) if lse is not None else (0, 0), out_align=out.data_ptr() % 16)
    key = (q.device.index, schedule, tuple(geometry.values()))
    launch = _run_launches.get(key)
    if launch is None:  # benchmarks call run() in a loop: build the launch once per geometry
        launch = _Launch(dk, _get(dk, kernel_for(prep.pv, d, schedule)), **geometry)
        if len(_run_launches) >= mma._MAX_PLANS:
            _run_launches.clear()
        _run_launches[key] = launch
    with torch.cuda.device(q.device):
        launch(prep.q_int8.data_ptr(), prep.k_int8.data_ptr(), prep.v_op.data_ptr(), prep.q_scale.data_ptr(),
               prep.k_scale.data_ptr(), v_scale.data_ptr() if v_scale is not None else None, out.data_ptr(),
               lse.data_ptr() if lse is not None else None, mma._stream(q.device))
    if lse is not None and prep.kbar is not None:
        # The kernel saw K - kbar; the dropped sm_scale * q . kbar is the same for every key.
        lse.add_(prep.q_dot_kbar[:, :, :nq], alpha=prep.sm_scale)
    return out, lse


class _AttentionPlan(calls.CallPlan):
    """attention() for one key (shapes, strides, dtypes, device, cfg, flags): the fused
    quantizer's plan and the kernel launch, built once; a call allocates one workspace, O (and
    lse) and makes two or three launches."""

    def __init__(self, dk, q, k, v, layout, cfg, is_causal, sm_scale, return_lse):
        self.dk, self.index, self.layout, self.cfg = dk, dk.index, layout, cfg
        self.is_causal, self.return_lse = bool(is_causal), return_lse
        q_h, k_h, v_h = (_hnd(x, layout) for x in (q, k, v))
        b, hq, nq, d = q_h.shape
        hk, nk = k_h.shape[1], k_h.shape[2]
        self.sm_scale = float(sm_scale if sm_scale is not None else d**-0.5)
        dpad = padded_head_dim(d, Family.WGMMA)
        self.fp8 = cfg.pv_dtype is PVDType.FP8
        v_strided_ok = d % 8 == 0 and all(st % 8 == 0 for st in v_h.stride()[:3])
        self.fast = self.fp8 or v_strided_ok
        self.copy_v = False  # set by attention_plan: V is cloned for TMA first
        if not self.fast:
            return
        self.qkv = plan = mma._QkvPlan(dk, q_h, k_h, v_h, cfg, tile_shape(Family.WGMMA, dpad), dpad, None,
                                       return_lse and cfg.smooth_k)
        pv = abi.PV_FP8 if self.fp8 else abi.PV_16BIT[q.dtype]
        kernel = _get(dk, kernel_for(pv, d, default_schedule(cfg.pv_dtype, d)))
        self.device, self.nbytes = q.device, plan.nbytes
        self.out_shape, self.dtype, self.lse_shape = q.shape, q.dtype, (b, hq, nq)
        q_groups = plan.parts[1][1][2]
        k_groups = plan.parts[3][1][2]
        v_strides = ((hk * dpad * plan.v_pad, dpad * plan.v_pad, plan.v_pad) if self.fp8
                     else tuple(v_h.stride()[:3]))
        self.launch = _Launch(
            dk, kernel, b=b, hq=hq, hk=hk, nq=nq, nk=nk, dpad=dpad, d=d, pv=pv, bf16_out=q.dtype == torch.bfloat16,
            causal=is_causal, sm_scale=self.sm_scale,
            q_strides=(hq * plan.nq_pad * dpad, plan.nq_pad * dpad, dpad),
            k_strides=(hk * plan.nk_pad * dpad, plan.nk_pad * dpad, dpad), v_strides=v_strides,
            qs_strides=(hq * q_groups, q_groups), ks_strides=(hk * k_groups, k_groups),
            vs_strides=(hk * dpad, dpad) if self.fp8 else (0, 0),
            o_strides=mma._contiguous_bhn_strides(q.shape, layout),
            lse_strides=(hq * nq, nq) if return_lse else (0, 0), out_align=0)
        self.launches = calls.Launches([(k, grid, smem) for k, grid, smem, _ in plan.launches]
                                       + [(kernel, self.launch.grid, None)], self._params)
        self.lse_fix = return_lse and cfg.smooth_k
        self.nq = nq

    def _params(self, stream, base, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr) -> list[bytes]:
        ptr = self.qkv.pointer
        attention = self.launch.params(ptr(base, "q"), ptr(base, "k"), ptr(base, "v") if self.fp8 else v_ptr,
                                       ptr(base, "q_scale"), ptr(base, "k_scale"), ptr(base, "v_scale"), out_ptr,
                                       lse_ptr)
        return self.qkv.params(stream, base, q_ptr, k_ptr, v_ptr) + [attention]

    def run(self, q, k, v):
        if self.copy_v:
            v = _tma_readable_v(v, self.layout, self.cfg)
        v_ptr = v.data_ptr()
        if not self.fast or (not self.fp8 and v_ptr % 16):
            prep = prepare(q, k, v, layout=self.layout, cfg=self.cfg, is_causal=self.is_causal,
                           sm_scale=self.sm_scale, return_lse=self.return_lse)
            return run(prep, return_lse=self.return_lse)
        ws, out, lse = self.launch_fast(q, k, v_ptr)
        if self.lse_fix:
            # The kernel saw K - kbar; the dropped sm_scale * q . kbar is the same for every key.
            lse.add_(self.qkv.view(ws, "q_dot_kbar")[:, :, :self.nq], alpha=self.sm_scale)
        return out, lse


_attention_plans: dict = {}
_TMA_MAX_STRIDE_BYTES = 1 << 40


def _tma_readable_v(v, layout, cfg):
    """16-bit V is read in place through a TMA map, whose (B, H, N) strides must each be a
    positive multiple of 16 bytes below 2^40, even along dims of extent 1; an expanded
    (stride 0) or otherwise unmappable V is copied. V whose rows are not 16-byte multiples
    takes the quantizer's padded copy instead, and FP8 V is the quantizer's own buffer."""
    if cfg.pv_dtype is PVDType.FP8 or v.shape[-1] % 8:
        return v
    size = v.element_size()
    if all(0 < st * size < _TMA_MAX_STRIDE_BYTES and st * size % 16 == 0 for st in _hnd(v, layout).stride()[:3]):
        return v
    return v.clone(memory_format=torch.contiguous_format)


def attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse):
    """The dispatcher asked `unsupported_reason` before; the plan is built once per key."""
    return attention_plan(q, k, v, layout=layout, cfg=cfg, is_causal=is_causal, sm_scale=sm_scale,
                          return_lse=return_lse)(q, k, v)


def attention_plan(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse):
    """`attention` of calls with these tensors' shapes, strides, dtypes and device and these
    options, as a callable (q, k, v) -> (O, lse) that any such call may use."""
    key = mma.plan_key(q, k, v, layout, cfg, is_causal, sm_scale, return_lse)
    plan = _attention_plans.get(key)
    if plan is None:
        dk = mma._device_kernels(q.device)
        v_read = _tma_readable_v(v, layout, cfg)
        with torch.cuda.device(q.device):
            try:
                plan = _AttentionPlan(dk, q, k, v_read, layout, cfg, is_causal, sm_scale, return_lse)
            except KernelBuildError as e:
                raise KernelError(str(e)) from None
        plan.copy_v = v_read is not v
        if len(_attention_plans) >= mma._MAX_PLANS:
            _attention_plans.clear()
        _attention_plans[key] = plan
    return plan
