"""Public entry points: `sageattn` (thu-ml style) and an SDPA drop-in."""
from __future__ import annotations

import math
import numbers

import torch

from . import autotune, dispatch, ops
from .exact import exact_sdpa, sdpa
from .config import PRECISIONS, Granularity, attention_shape_problem, fold_scale_sign, is_empty_query

LAYOUTS = ("HND", "NHD")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def validate(q, k, v, tensor_layout: str) -> None:
    """Raise TypeError/ValueError with what to change; return nothing when the call is valid."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D ({'(B, H, N, D)' if tensor_layout == 'HND' else '(B, N, H, D)'}"
                f" for tensor_layout={tensor_layout!r}), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    _check_choice("tensor_layout", tensor_layout, LAYOUTS)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    h, n = (1, 2) if tensor_layout == "HND" else (2, 1)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"head dims differ: q {q.shape[3]}, k {k.shape[3]}, v {v.shape[3]}")
    if k.shape[h] != v.shape[h] or k.shape[n] != v.shape[n]:
        raise ValueError(f"k and v must have the same heads and length, got {tuple(k.shape)} and {tuple(v.shape)}")
    problem = attention_shape_problem(q.shape[0], q.shape[h], k.shape[h], q.shape[n], k.shape[n], q.shape[3])
    if problem:
        raise ValueError(problem)


def check_flag(name: str, value, *, optional: bool = False) -> None:
    """A real bool: the string "False" is truthy and would silently mean True."""
    if optional and value is None:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {value!r}")


def checked_scale(sm_scale, head_dim: int) -> float:
    """sm_scale as a finite float (default 1/sqrt(head_dim)); TypeError/ValueError otherwise."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale must be a real number or None, got {type(sm_scale).__name__} {sm_scale!r}")
    scale = float(sm_scale)
    if not math.isfinite(scale):
        raise ValueError(f"sm_scale must be finite, got {scale}")
    return scale


def _empty_result(q, tensor_layout: str, return_lse: bool):
    b, h, n = (q.shape[0], q.shape[1], q.shape[2]) if tensor_layout == "HND" else (q.shape[0], q.shape[2], q.shape[1])
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return (o, torch.empty((b, h, n), dtype=torch.float32, device=q.device)) if return_lse else o


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    precision: str = "auto",
    granularity: str = "per_thread",
    smooth_k: bool = True,
    smooth_q: bool | None = None,
    smooth_v: bool = False,
    backend: str = "auto",
    force_int4_emulation: bool = False,
    hadamard: bool = False,
):
    """SageAttention2: softmax(Q K^T * sm_scale) V with INT8/INT4 QK and FP8/FP16 PV.

    q: (B, Hq, Nq, D) for tensor_layout "HND" or (B, Nq, Hq, D) for "NHD"; k, v with Hkv
    heads (Hq % Hkv == 0, GQA) and Nk tokens. fp16/bf16 (fp32 is cast to bf16 and back).
    precision: "auto" (fastest accurate level for this GPU), "int8+fp8", "int8+fp16",
    "int4+fp8", "int4+fp16", or "exact" (PyTorch SDPA).
    granularity: "per_thread" (default), "per_warp", "per_block" quantization groups.
    smooth_k / smooth_q / smooth_v: subtract the K mean (default on), per-block Q means
    (default: on for int4), the V mean. They change rounding, never the math.
    hadamard: rotate Q and K by an orthonormal Walsh-Hadamard transform of the head dim
    before quantizing (docs/numerics.md §1.6): Q K^T is unchanged, and a few outlier channels
    no longer set every quantization scale. Off by default; every head dim the kernels serve
    is zero-padded to 64, 128 or 256 and rotated at that size. "exact" ignores it.
    backend: "auto" (kernels where built, else exact), "cuda" (same, for clarity),
    "reference" (the pure-PyTorch emulation of the kernels, any device), "exact".
    Returns O in q's dtype and layout, and with return_lse also lse (B, Hq, Nq) float32 in
    natural-log units (exact lse up to quantization error, smoothing included).
    Inputs the kernels cannot serve (CPU, head dim > 256, kernels not built, ...) run exact
    attention and log the reason once.
    sm_scale: a finite real number (default 1/sqrt(D)); a negative one is served exactly as
    -Q with |sm_scale|. Flags must be real bools. An empty query side (B, Hq or Nq of 0)
    returns empty O (and lse); empty keys for non-empty queries are a ValueError.
    """
    eager = not torch.compiler.is_compiling()
    key = None
    if eager:
        try:
            # Everything the checks and the plan below read: a call with an equal key passes them
            # and is served alike. The classes keep True apart from 1, and 1.0 from True.
            key = (q.__class__, q.shape, q.stride(), q.dtype, q.device, k.__class__, k.shape, k.stride(), k.dtype,
                   k.device, v.__class__, v.shape, v.stride(), v.dtype, v.device, tensor_layout, is_causal,
                   sm_scale, return_lse, precision, granularity, smooth_k, smooth_q, smooth_v, backend,
                   force_int4_emulation, hadamard, is_causal.__class__, sm_scale.__class__, return_lse.__class__,
                   smooth_k.__class__, smooth_q.__class__, smooth_v.__class__, force_int4_emulation.__class__,
                   hadamard.__class__)
            call = _calls.get(key)
        except Exception:  # not tensors, an unhashable argument: the checks below say what is wrong
            key = call = None
        if call is not None:
            return call(q, k, v, eager)

    validate(q, k, v, tensor_layout)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("granularity", granularity, _GRANULARITIES)
    _check_choice("backend", backend, dispatch.BACKENDS)
    for name, flag in (("is_causal", is_causal), ("return_lse", return_lse), ("smooth_k", smooth_k),
                       ("smooth_v", smooth_v), ("force_int4_emulation", force_int4_emulation),
                       ("hadamard", hadamard)):
        check_flag(name, flag)
    check_flag("smooth_q", smooth_q, optional=True)
    sm_scale = checked_scale(sm_scale, q.shape[-1])
    h, n = (1, 2) if tensor_layout == "HND" else (2, 1)
    if is_empty_query(q.shape[0], q.shape[h], q.shape[n]):
        return _empty_result(q, tensor_layout, return_lse)
    p = dispatch.plan(
        q, k, v,
        layout=tensor_layout, precision=precision, granularity=granularity,
        smooth_k=smooth_k, smooth_q=smooth_q, smooth_v=smooth_v, is_causal=is_causal,
        backend=backend, force_int4_emulation=force_int4_emulation, hadamard=hadamard,
    )
    call = _Call(p, q, k, tensor_layout, is_causal, sm_scale, return_lse, precision == "auto")
    if key is not None:
        if len(_calls) >= _MAX_CALLS:
            _calls.clear()
        _calls[key] = call
    return call(q, k, v, eager)


_GRANULARITIES = tuple(g.value for g in Granularity)
# Call signature (sageattn's key) -> how it is served. Bounded: a workflow makes a few.
_calls: dict[tuple, "_Call"] = {}
_MAX_CALLS = 1024


class _Call:
    """How `sageattn` serves calls of one signature (shapes, strides, dtypes, devices, options),
    decided on its first call: the plan, the folded scale, `auto`'s decision key, and (once it
    runs eagerly) the backend's plan."""

    def __init__(self, plan, q, k, layout: str, is_causal: bool, sm_scale: float, return_lse: bool, auto: bool):
        self.plan, self.layout, self.is_causal, self.return_lse = plan, layout, is_causal, return_lse
        self.signed_scale, self.sm_scale = sm_scale, fold_scale_sign(0.0, sm_scale)[1]
        self.exact = plan.backend == "exact"
        quantized = not self.exact
        self.to_bf16 = quantized and plan.backend != "reference" and q.dtype == torch.float32
        self.auto = auto and quantized and plan.backend != "reference"
        self.tune_key = autotune.shape_key(q, k, layout, is_causal) if self.auto else None
        self.runner = None

    def __call__(self, q, k, v, eager: bool):
        if self.sm_scale != self.signed_scale:
            q = fold_scale_sign(q, self.signed_scale)[0]
        if self.exact:
            o, lse = self.exact_sdpa(q, k, v)
        else:
            in_dtype = q.dtype
            qc, kc, vc = (t.to(torch.bfloat16) for t in (q, k, v)) if self.to_bf16 else (q, k, v)
            if self.auto and not autotune.quantized_pays_off(
                q, k, self.layout, self.is_causal, lambda: self.quantized(qc, kc, vc, eager),
                lambda: self.exact_sdpa(q, k, v), key=self.tune_key,
            ):
                o, lse = self.exact_sdpa(q, k, v)
            else:
                o, lse = self.quantized(qc, kc, vc, eager)
                if self.to_bf16:
                    o = o.to(in_dtype)
        return (o, lse) if self.return_lse else o

    def exact_sdpa(self, q, k, v):
        return exact_sdpa(q, k, v, self.layout, self.is_causal, self.sm_scale, self.return_lse)

    def quantized(self, q, k, v, eager: bool):
        p = self.plan
        if not eager:  # torch.compile sees the custom op
            return ops.run(p, q, k, v, self.layout, self.is_causal, self.sm_scale, self.return_lse)
        run = self.runner
        if run is None:
            run = self.runner = ops.runner(p.backend, p.cfg, p.force_int4_emulation, q, k, v, self.layout,
                                           self.is_causal, self.sm_scale, self.return_lse)
        return run(q, k, v)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    precision: str = "auto",
    hadamard: bool = False,
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention ((B, H, L, D) tensors).

    Serves what SageAttention can (no mask, no dropout, 4-D inputs); everything else goes to
    PyTorch's SDPA unchanged, with one log line per reason. `precision` and `hadamard` are
    `sageattn`'s.
    """
    reason = None
    if attn_mask is not None:
        reason = "attention masks"
    elif dropout_p != 0.0:
        reason = "dropout"
    elif any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (query, key, value)):
        reason = "inputs that are not 4-D"
    elif query.shape[1] != key.shape[1] and not enable_gqa:
        reason = "different head counts without enable_gqa"
    if reason is not None:
        dispatch.log_once(f"exact attention: {reason} go to PyTorch SDPA")
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return sageattn(query, key, value, "HND", is_causal, scale, precision=precision, hadamard=hadamard)
