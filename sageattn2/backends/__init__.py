"""Kernel backends. Each module here serves `attention()` for one kernel family.

Every backend module exposes the same two functions:

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

The numeric contract is docs/numerics.md; tile layouts come from sageattn2.config.
"""


class KernelError(RuntimeError):
    """A kernel launch or CUDA call failed (carries the library's message)."""
