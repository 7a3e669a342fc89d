"""The quantized attention as one torch.library custom op, so torch.compile sees a single
opaque node (quantization included) with a fake implementation instead of graph-breaking.
"""
from __future__ import annotations

import functools

import torch

from .config import AttnConfig
from .dispatch import Plan, backend_module


def _output_like(q: torch.Tensor) -> torch.Tensor:
    # A new tensor in q's logical shape and layout, contiguous.
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _lse_shape(q: torch.Tensor, layout: str) -> tuple[int, int, int]:
    b, h, n = (q.shape[0], q.shape[1], q.shape[2]) if layout == "HND" else (q.shape[0], q.shape[2], q.shape[1])
    return (b, h, n)


def _attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: str,
    backend: str,
    qk_dtype: str,
    pv_dtype: str,
    granularity: str,
    smooth_k: bool,
    smooth_q: bool,
    smooth_v: bool,
    family: str,
    is_causal: bool,
    sm_scale: float,
    return_lse: bool,
    force_int4_emulation: bool,
    pv_accum: str = "fp32",
    hadamard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = AttnConfig(qk_dtype, pv_dtype, granularity, smooth_k, smooth_q, smooth_v, family, pv_accum, hadamard)
    o, lse = _execute(q, k, v, layout, backend, cfg, is_causal, sm_scale, return_lse, force_int4_emulation)
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return o, lse


def _execute(q, k, v, layout, backend, cfg, is_causal, sm_scale, return_lse, force_int4_emulation):
    return runner(backend, cfg, force_int4_emulation, q, k, v, layout, is_causal, sm_scale, return_lse)(q, k, v)


def runner(backend, cfg, force_int4_emulation, q, k, v, layout, is_causal, sm_scale, return_lse):
    """The eager call of `backend` as a callable (q, k, v) -> (O, lse or None), valid for every
    call whose tensors have these shapes, strides, dtypes and device: a backend's plan."""
    if backend == "reference":
        from .reference import reference_attention

        return functools.partial(reference_attention, cfg=cfg, tensor_layout=layout, is_causal=is_causal,
                                 sm_scale=sm_scale, return_lse=return_lse)
    # Only the mma backend has INT4 QK, so only it takes the flag.
    kwargs = {"force_int4_emulation": True} if force_int4_emulation and backend == "mma" else {}
    return backend_module(backend).attention_plan(
        q, k, v, layout=layout, cfg=cfg, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse, **kwargs
    )


attention_op = torch.library.custom_op("sageattn2::attention", mutates_args=())(_attention_impl)


@attention_op.register_fake
def _(q, k, v, layout, backend, qk_dtype, pv_dtype, granularity, smooth_k, smooth_q, smooth_v,
      family, is_causal, sm_scale, return_lse, force_int4_emulation, pv_accum="fp32", hadamard=False):
    lse_shape = _lse_shape(q, layout) if return_lse else (0,)
    return _output_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def run(plan: Plan, q, k, v, layout: str, is_causal: bool, sm_scale: float, return_lse: bool):
    cfg = plan.cfg
    if not torch.compiler.is_compiling():
        # The op is what torch.compile must see; eagerly its dispatcher round trip is pure
        # host overhead on a call a diffusion model makes thousands of times.
        return _execute(q, k, v, layout, plan.backend, cfg, is_causal, sm_scale, return_lse,
                        plan.force_int4_emulation)
    o, lse = attention_op(
        q, k, v, layout, plan.backend, cfg.qk_dtype.value, cfg.pv_dtype.value, cfg.granularity.value,
        cfg.smooth_k, cfg.smooth_q, cfg.smooth_v, cfg.family.value, is_causal, sm_scale, return_lse,
        plan.force_int4_emulation, cfg.pv_accum.value, cfg.hadamard,
    )
    return o, (lse if return_lse else None)
