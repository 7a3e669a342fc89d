"""Kernel backends. Each module here serves `attention()` for one kernel family.

Every backend module exposes the same three functions:

    unsupported_reason(q, k, v, *, layout, cfg, is_causal) -> str | None
        None when the backend can run this call; otherwise a short reason for the log
        ("library not built for sm_86", "head dim 320 > 256", ...). Never raises for
        shapes/dtypes; it is asked before every call, so it must be cheap.

    attention(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse)
        -> tuple[Tensor, Tensor | None]
        q: (B, Hq, Nq, d) for layout "HND" or (B, Nq, Hq, d) for "NHD"; k, v likewise with
        Hkv heads (Hq % Hkv == 0) and Nk keys. fp16 or bf16 on a CUDA device, last dim
        contiguous, any other strides. Returns O in q's dtype and layout (a new tensor,
        contiguous in that layout) and, when return_lse, lse as (B, Hq, Nq) float32 in
        natural-log units including the K-smoothing correction (docs/numerics.md).
        Runs on the current CUDA stream. Raises KernelError on a CUDA failure.

    attention_plan(q, k, v, *, layout, cfg, is_causal, sm_scale, return_lse) -> plan
        What `attention` runs, as a callable plan(q, k, v) -> (O, lse) valid for every call
        whose tensors have these shapes, strides, dtypes and device (built once per such key;
        `attention` is attention_plan(...)(q, k, v)). The public API keeps it per call signature.

The numeric contract is docs/numerics.md; tile layouts come from sageattn2.config.
"""


import torch

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


class KernelError(RuntimeError):
    """A kernel launch or CUDA call failed (carries the library's message)."""


def input_reason(q, k, v, layout: str, max_head_dim: int) -> str | None:
    """Why the kernels cannot take these tensors (any family), or None."""
    if layout not in ("HND", "NHD"):
        return f"unknown layout {layout!r}"
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not on a CUDA device"
    if q.dtype not in _KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k, v must share dtype fp16 or bf16"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "last dim must be contiguous"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return "q, k, v head dims differ"
    if d > max_head_dim:
        return f"head dim {d} > {max_head_dim}"
    h, n = (1, 2) if layout == "HND" else (2, 1)
    if k.shape != v.shape or q.shape[0] != k.shape[0]:
        return "k/v shapes do not match q"
    hq, nq, hk, nk = q.shape[h], q.shape[n], k.shape[h], k.shape[n]
    if q.shape[0] < 1 or hq < 1 or hk < 1 or nq < 1 or nk < 1:
        return "empty batch, heads or sequence"
    if hq % hk:
        return f"{hq} query heads are not a multiple of {hk} kv heads"
    if q.shape[0] > 65535 or hq > 65535:
        return "batch or head count above the CUDA grid limit"
    if nq >= 2**31 - 128 or nk >= 2**31 - 128:
        return "sequence longer than 2^31"
    return None
