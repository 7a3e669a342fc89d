"""thu-ml SageAttention's function names and arguments, served by our kernels.

Engines that call `sageattention.sageattn*` (yunchang's ring and Ulysses attention, xDiT/USP,
raylight) can run on these functions unchanged; `install_as_sageattention` registers them as
the `sageattention` module. Mapping onto our levels:

  sageattn                           int8+fp8 where the GPU has FP8 tensor cores, else int8+fp16
  sageattn_qk_int8_pv_fp16_cuda      int8+fp16, qk_quant_gran per_thread / per_warp
  sageattn_qk_int8_pv_fp8_cuda       int8+fp8,  qk_quant_gran per_thread / per_warp
  sageattn_qk_int8_pv_fp8_cuda_sm90  int8+fp8 (any GPU we serve, not only Hopper)
  sageattn_qk_int8_pv_fp16_triton    int8+fp16 with per_block groups
  sageattn_varlen                    int8+fp16 per_block, one call per sequence of the packed batch

lse (return_lse=True) follows thu-ml exactly: float32 (B, Hq, Nq) whatever the layout, in
natural-log units (thu-ml's kernels keep base 2 and divide by log2(e) before returning), of
the unsmoothed scores sm_scale * q.k (the K-smoothing term is added back). That is the
convention ring attention merges partial outputs with (`merge_by_lse`).

attn_mask (every entry point; bool: True keeps a key, float: added to the scaled scores, as
in PyTorch SDPA) runs exact attention, logged once: thu-ml's CUDA entry points drop it
silently, and ComfyUI's `--use-sage-attention` passes one.

Differences from thu-ml, each logged once where it applies: pv_accum_dtype values other than
our accumulation run ours (fp32 for FP16 PV; for FP8 PV the arch's default from archs.py: FP16
inside a tile and FP32 across tiles, thu-ml's "fp32+fp16", on sm89/sm120, two-level FP32 elsewhere); smooth_v is honoured
for every pv_accum_dtype; flash-attn style `causal=` / `softmax_scale=` keywords, which
yunchang passes and thu-ml silently drops, are honoured; dropout, sliding windows, softcap
and ALiBi cannot be honoured and are ignored with a warning; CPU tensors, fp32 inputs and
shapes the kernels do not serve run exact attention instead of raising.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from . import api, loader
from .config import PVAccum, PVDType
from .dispatch import default_precision, default_pv_accum, log_once

PROVIDER = "sageattn2"
ENV_PROVIDE = "SAGEATTN2_PROVIDE_SAGEATTENTION"  # "1": provide if absent; "force": replace thu-ml
QK_QUANT_GRANS = ("per_thread", "per_warp")
# pv_accum_dtype: the values thu-ml accepts per function, and the one we actually run.
FP16_PV_ACCUM = ("fp32", "fp16", "fp16+fp32")
FP8_PV_ACCUM = ("fp32", "fp32+fp32", "fp32+fp16")
SM90_PV_ACCUM = ("fp32", "fp32+fp32")
# flash-attn keywords engines pass along: honoured (aliases) or checked against their no-op value.
_ALIASES = {"causal": "is_causal", "softmax_scale": "sm_scale"}
_NO_OP = {"dropout_p": (0, 0.0, None), "window_size": ((-1, -1), [-1, -1], None), "softcap": (0, 0.0, None),
          "alibi_slopes": (None,), "return_softmax": (False, None), "return_attn_probs": (False, None)}
_SILENT = ("deterministic",)


def _note(message: str, level: int = logging.INFO) -> None:
    log_once(f"sageattention compat: {message}", level)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _resolve_extras(fn: str, is_causal: bool, sm_scale, kwargs: dict):
    """Apply flash-attn style aliases, log what cannot be honoured; returns (is_causal, sm_scale)."""
    for name, value in kwargs.items():
        if name in _ALIASES:
            target = _ALIASES[name]
            if target == "is_causal":
                if is_causal and not value:
                    raise ValueError(f"{fn}: is_causal=True conflicts with causal={value!r}")
                is_causal = bool(is_causal or value)
            elif value is not None:
                if sm_scale is not None and float(sm_scale) != float(value):
                    raise ValueError(f"{fn}: sm_scale={sm_scale!r} conflicts with softmax_scale={value!r}")
                sm_scale = value
            _note(f"honouring flash-attn style {name}= as {target} (thu-ml's functions ignore it)")
        elif name in _NO_OP:
            if not _is_no_op(value, _NO_OP[name]):
                _note(f"{name}={_short(value)} cannot be honoured and is ignored", logging.WARNING)
        elif name not in _SILENT:
            _note(f"{fn}: unknown argument {name!r} ignored (as thu-ml does)", logging.WARNING)
    return is_causal, sm_scale


def _is_no_op(value, no_ops) -> bool:
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(value, tuple):
        value = list(value)
    return any(value == (list(n) if isinstance(n, tuple) else n) for n in no_ops)


def _short(value) -> str:
    return f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def our_accumulation(pv: str, capability: tuple[int, int] | None) -> str:
    """The P.V accumulation our kernels run on a GPU (None: off CUDA), in thu-ml's pv_accum_dtype words."""
    if pv == "fp16":
        return "fp32"
    fp16_inside = capability is not None and default_pv_accum(capability, PVDType.FP8) is PVAccum.FP16
    return "fp32+fp16" if fp16_inside else "fp32+fp32"


def _accumulation(pv: str, pv_accum_dtype: str, accepted, q) -> None:
    _choice("pv_accum_dtype", pv_accum_dtype, accepted)
    ours = our_accumulation(pv, loader.capability(q.device) if isinstance(q, torch.Tensor) and q.is_cuda else None)
    if pv_accum_dtype != ours:
        _note(f"pv_accum_dtype={pv_accum_dtype!r} runs our {pv.upper()} PV accumulation ({ours})")


def _attend(q, k, v, *, tensor_layout, is_causal, sm_scale, return_lse, precision, granularity,
            smooth_k, smooth_v, backend, attn_mask=None):
    if attn_mask is not None:
        # thu-ml's CUDA entry points drop a mask silently (ComfyUI passes one to `sageattn`).
        if is_causal:
            raise ValueError("pass attn_mask or is_causal, not both")
        _note("attn_mask runs exact attention (the quantized kernels take no mask)")
        api.validate(q, k, v, tensor_layout)
        o, lse = masked_exact_attention(q, k, v, attn_mask, tensor_layout, sm_scale, with_lse=return_lse)
        return (o, lse) if return_lse else o
    return api.sageattn(
        q, k, v, tensor_layout, bool(is_causal), sm_scale, bool(return_lse),
        precision=precision, granularity=granularity, smooth_k=bool(smooth_k), smooth_v=bool(smooth_v),
        backend=backend,
    )


def _auto_precision(q) -> str:
    if isinstance(q, torch.Tensor) and q.is_cuda:
        return default_precision(loader.capability(q.device))
    return "int8+fp8"  # off CUDA: the reference's default level, or exact attention (logged)


# ---------------------------------------------------------------------------------------
# thu-ml's entry points (backend: ours only, "auto" | "reference" | "exact")


def sageattn(q, k, v, tensor_layout: str = "HND", is_causal: bool = False, sm_scale: float | None = None,
             return_lse: bool = False, *, backend: str = "auto", **kwargs):
    """thu-ml `sageattn`: the GPU's default level (int8+fp8 with FP8 tensor cores, else int8+fp16).

    q (B, Hq, Nq, D) for "HND" or (B, Nq, Hq, D) for "NHD"; k, v with Hkv heads (Hq % Hkv == 0).
    Returns o in q's layout and dtype, and with return_lse also lse, float32 (B, Hq, Nq), natural log.
    """
    attn_mask = kwargs.pop("attn_mask", None)
    is_causal, sm_scale = _resolve_extras("sageattn", is_causal, sm_scale, kwargs)
    return _attend(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                   return_lse=return_lse, precision=_auto_precision(q), granularity="per_thread",
                   smooth_k=True, smooth_v=False, backend=backend, attn_mask=attn_mask)


def sageattn_qk_int8_pv_fp16_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                  qk_quant_gran: str = "per_thread", sm_scale: float | None = None,
                                  pv_accum_dtype: str = "fp32", smooth_k: bool = True, smooth_v: bool = False,
                                  return_lse: bool = False, *, backend: str = "auto", **kwargs):
    """thu-ml's INT8 QK + FP16 PV entry point: our int8+fp16 level (fp32 accumulation)."""
    attn_mask = kwargs.pop("attn_mask", None)
    is_causal, sm_scale = _resolve_extras("sageattn_qk_int8_pv_fp16_cuda", is_causal, sm_scale, kwargs)
    _choice("qk_quant_gran", qk_quant_gran, QK_QUANT_GRANS)
    _accumulation("fp16", pv_accum_dtype, FP16_PV_ACCUM, q)
    return _attend(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                   return_lse=return_lse, precision="int8+fp16", granularity=qk_quant_gran,
                   smooth_k=smooth_k, smooth_v=smooth_v, backend=backend, attn_mask=attn_mask)


def sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                 qk_quant_gran: str = "per_thread", sm_scale: float | None = None,
                                 pv_accum_dtype: str = "fp32+fp16", smooth_k: bool = True, smooth_v: bool = False,
                                 return_lse: bool = False, *, backend: str = "auto", **kwargs):
    """thu-ml's INT8 QK + FP8 PV entry point: our int8+fp8 level (the arch's accumulation, `our_accumulation`).
    Without FP8 tensor cores (sm80/86) it runs int8+fp16 (logged by the dispatcher)."""
    attn_mask = kwargs.pop("attn_mask", None)
    is_causal, sm_scale = _resolve_extras("sageattn_qk_int8_pv_fp8_cuda", is_causal, sm_scale, kwargs)
    _choice("qk_quant_gran", qk_quant_gran, QK_QUANT_GRANS)
    _accumulation("fp8", pv_accum_dtype, FP8_PV_ACCUM, q)
    return _attend(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                   return_lse=return_lse, precision="int8+fp8", granularity=qk_quant_gran,
                   smooth_k=smooth_k, smooth_v=smooth_v, backend=backend, attn_mask=attn_mask)


def sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout: str = "HND", is_causal: bool = False,
                                      qk_quant_gran: str = "per_thread", sm_scale: float | None = None,
                                      pv_accum_dtype: str = "fp32+fp32", smooth_k: bool = True,
                                      return_lse: bool = False, *, backend: str = "auto", **kwargs):
    """thu-ml's Hopper entry point: our int8+fp8 level (wgmma kernels on sm90, mma elsewhere)."""
    attn_mask = kwargs.pop("attn_mask", None)
    is_causal, sm_scale = _resolve_extras("sageattn_qk_int8_pv_fp8_cuda_sm90", is_causal, sm_scale, kwargs)
    _choice("qk_quant_gran", qk_quant_gran, QK_QUANT_GRANS)
    _accumulation("fp8", pv_accum_dtype, SM90_PV_ACCUM, q)
    return _attend(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                   return_lse=return_lse, precision="int8+fp8", granularity=qk_quant_gran,
                   smooth_k=smooth_k, smooth_v=False, backend=backend, attn_mask=attn_mask)


def sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout: str = "HND", quantization_backend: str = "triton",
                                    is_causal: bool = False, attn_mask: torch.Tensor | None = None,
                                    sm_scale: float | None = None, smooth_k: bool = True,
                                    return_lse: bool = False, *, backend: str = "auto", **kwargs):
    """thu-ml's Triton entry point: our int8+fp16 level with per-block groups (as its kernel)."""
    pv_accum_dtype = kwargs.pop("pv_accum_dtype", "fp32")  # yunchang passes one; thu-ml drops it
    is_causal, sm_scale = _resolve_extras("sageattn_qk_int8_pv_fp16_triton", is_causal, sm_scale, kwargs)
    _choice("quantization_backend", quantization_backend, ("triton", "cuda"))
    _accumulation("fp16", pv_accum_dtype, FP16_PV_ACCUM, q)
    return _attend(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                   return_lse=return_lse, precision="int8+fp16", granularity="per_block",
                   smooth_k=smooth_k, smooth_v=False, backend=backend, attn_mask=attn_mask)


def sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    is_causal: bool = False, sm_scale: float | None = None, smooth_k: bool = True, *,
                    backend: str = "auto", **kwargs):
    """thu-ml `sageattn_varlen` on packed (total, H, D) tensors: int8+fp16 with per-block groups
    (as its Triton kernel), one call per sequence (our kernels have no varlen mode): right for
    any batch, but each sequence pays a launch, so many short sequences are slow. K smoothing
    uses each sequence's own mean (thu-ml's uses the mean over the whole packed batch)."""
    is_causal, sm_scale = _resolve_extras("sageattn_varlen", is_causal, sm_scale, kwargs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"sageattn_varlen: {name} must be a (total_tokens, heads, head_dim) tensor")
    starts_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    starts_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    if len(starts_q) != len(starts_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe {len(starts_q) - 1} and "
                         f"{len(starts_k) - 1} sequences")
    out = torch.empty_like(q)
    for i in range(len(starts_q) - 1):
        (a, b), (c, d) = starts_q[i : i + 2], starts_k[i : i + 2]
        if a == b:
            continue
        if c == d:
            raise ValueError(f"sageattn_varlen: sequence {i} has {b - a} queries and no keys")
        out[a:b] = _attend(q[None, a:b], k[None, c:d], v[None, c:d], tensor_layout="NHD", is_causal=is_causal,
                           sm_scale=sm_scale, return_lse=False, precision="int8+fp16", granularity="per_block",
                           smooth_k=smooth_k, smooth_v=False, backend=backend)[0]
    return out


def _cu_seqlens(name: str, cu, total: int, max_len: int) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"sageattn_varlen: {name} must be a 1-D integer tensor [0, ..., total]")
    starts = [int(x) for x in cu.tolist()]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    if starts[0] != 0 or starts[-1] != total or min(lengths) < 0:
        raise ValueError(f"sageattn_varlen: {name} must rise from 0 to {total}, got {starts}")
    if max(lengths) > max_len:
        _note(f"{name}: a sequence is longer than max_seqlen ({max(lengths)} > {max_len}); served in full")
    return starts


# ---------------------------------------------------------------------------------------
# Helpers for engines and tests


def masked_exact_attention(q, k, v, attn_mask, tensor_layout: str = "HND", sm_scale=None, with_lse=True):
    """Exact attention with an SDPA-style mask broadcastable to (B, Hq, Nq, Nk) and, with_lse,
    its natural-log lse float32 (B, Hq, Nq), computed in float32 about 256 MiB of scores at a
    time (without lse: PyTorch SDPA itself)."""
    qh, kh, vh = (t if tensor_layout == "HND" else t.transpose(1, 2) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    group = qh.shape[1] // kh.shape[1]
    attn_mask = attn_mask.to(q.device)
    if not with_lse:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask.to(q.dtype) if attn_mask.is_floating_point()
                                           else attn_mask, scale=scale, enable_gqa=group > 1)
        return (o if tensor_layout == "HND" else o.transpose(1, 2)), None
    b, h, n_q, n_k = qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2]
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (kh, vh))
    mask = attn_mask.expand(b, h, n_q, n_k)
    rows = max(1, (1 << 26) // (b * h * n_k))
    outs, lses = [], []
    for start in range(0, n_q, rows):
        s = qh[:, :, start : start + rows].float() @ kf.transpose(-1, -2) * scale
        m = mask[:, :, start : start + rows]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        lses.append(torch.logsumexp(s, dim=-1))
        outs.append(torch.softmax(s, dim=-1).nan_to_num(0.0) @ vf)
    o = torch.cat(outs, dim=2).to(q.dtype)
    return (o if tensor_layout == "HND" else o.transpose(1, 2)), torch.cat(lses, dim=2)


def merge_by_lse(outs, lses, tensor_layout: str = "HND"):
    """Merge attention over disjoint key sets: outs[i] in `tensor_layout`, lses[i] float32
    (B, H, N) natural log. Returns (o float32, lse), as ring attention combines K/V shards."""
    lse = torch.logsumexp(torch.stack([x.float() for x in lses]), dim=0)
    o = 0
    for oi, li in zip(outs, lses):
        w = torch.exp(li.float() - lse)  # (B, H, N): each shard's share of the softmax mass
        o = o + oi.float() * (w[..., None] if tensor_layout == "HND" else w.transpose(1, 2)[..., None])
    return o, lse


# ---------------------------------------------------------------------------------------
# Providing the `sageattention` module

THU_ML_NAMES = ("sageattn", "sageattn_qk_int8_pv_fp16_cuda", "sageattn_qk_int8_pv_fp8_cuda",
                "sageattn_qk_int8_pv_fp8_cuda_sm90", "sageattn_qk_int8_pv_fp16_triton", "sageattn_varlen")


def make_module(backend: str = "auto") -> types.ModuleType:
    """A `sageattention` module object with thu-ml's names, served by these functions
    (`backend` other than "auto" is for tests: "reference" runs the kernels' emulation on CPU)."""
    _choice("backend", backend, ("auto", "reference", "exact"))
    module = types.ModuleType("sageattention", "thu-ml SageAttention's API, served by sageattn2 (compat.py)")
    module.__provider__ = PROVIDER
    for name in THU_ML_NAMES:
        fn = globals()[name]
        if backend != "auto":
            fn = _bind_backend(fn, backend)
        setattr(module, name, fn)
    module.__all__ = list(THU_ML_NAMES)
    module.core = module  # thu-ml keeps them in sageattention.core; some callers import from there
    return module


def _register(module: types.ModuleType) -> None:
    sys.modules["sageattention"] = sys.modules["sageattention.core"] = module


def _bind_backend(fn, backend):
    def bound(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return fn(*args, **kwargs)

    bound.__name__, bound.__doc__ = fn.__name__, fn.__doc__
    return bound


# shim/sageattention: the same module for processes that never import the pack (PYTHONPATH).
SHIM_DIR = Path(__file__).resolve().parents[1] / "shim"


def thu_ml_present() -> bool:
    """True when a `sageattention` other than ours is imported, or importable (our shim aside)."""
    current = sys.modules.get("sageattention")
    if current is not None:
        return getattr(current, "__provider__", None) != PROVIDER
    try:
        spec = importlib.util.find_spec("sageattention")
    except (ImportError, ValueError):
        return False
    return spec is not None and not (spec.origin and Path(spec.origin).resolve().parents[1] == SHIM_DIR)


def install_as_sageattention(force: bool = False, backend: str = "auto") -> bool:
    """Register ours as `sageattention` in sys.modules, for engines that import it later.

    A real thu-ml install is left alone unless `force` (then replaced, with a warning).
    Returns True when ours is the module `import sageattention` now gives."""
    current = sys.modules.get("sageattention")
    if current is not None and getattr(current, "__provider__", None) == PROVIDER and backend == "auto":
        return True
    if thu_ml_present():
        if not force:
            _note("thu-ml's sageattention is installed: left in place (force=True or "
                  f"{ENV_PROVIDE}=force to serve its names with ours)")
            return False
        _note("replacing thu-ml's sageattention with sageattn2's compatible functions", logging.WARNING)
    _register(make_module(backend))
    _note("engines importing sageattention now run sageattn2's kernels")
    return True


def provide_from_env() -> bool:
    """Pack-import hook: install when SAGEATTN2_PROVIDE_SAGEATTENTION is "1" (if thu-ml is
    absent) or "force"; anything else (the default) does nothing."""
    value = os.environ.get(ENV_PROVIDE, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value not in ("1", "true", "yes", "on", "force"):
        _note(f"{ENV_PROVIDE}={value!r} not understood (use 1 or force)", logging.WARNING)
        return False
    return install_as_sageattention(force=value == "force")
