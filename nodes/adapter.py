"""ComfyUI's attention call conventions, turned into sageattn2 arguments and back.

ComfyUI calls `override(func, q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)` with `heads` positional or a
keyword, the mask possibly 5th positional, and in kwargs `transformer_options`,
`_inside_attn_wrapper` and (later upstream) `scale`, `enable_gqa`,
`low_precision_attention`. Those last kwargs never reach our kernel; declined calls get
exactly the arguments that came in. `attn_precision=float32` (SD2.x asks for an fp32
softmax) needs no decline: our Q.K^T accumulates in int32 and the softmax runs in fp32.
No ComfyUI imports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Decline(Exception):
    """This call goes to stock attention; the message is the reason (logged once)."""


@dataclass
class AttnCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: object = None
    skip_reshape: bool = False
    skip_output_reshape: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    low_precision_attention: bool | None = None
    transformer_options: dict | None = None


def parse_call(args: tuple, kwargs: dict) -> AttnCall:
    """Name the arguments of one attention call. Raises Decline if they are not the shape
    ComfyUI uses (the call then goes to `func` unchanged)."""
    if len(args) > len(_POSITIONAL):
        raise Decline(f"attention called with {len(args)} positional arguments")
    named = dict(zip(_POSITIONAL, args))
    for name in _POSITIONAL:
        if name in kwargs:
            if name in named:
                raise Decline(f"attention argument {name!r} given twice")
            named[name] = kwargs[name]
    missing = [n for n in ("q", "k", "v", "heads") if n not in named]
    if missing:
        raise Decline(f"attention called without {', '.join(missing)}")
    return AttnCall(
        q=named["q"], k=named["k"], v=named["v"], heads=named["heads"],
        mask=named.get("mask"),
        skip_reshape=bool(named.get("skip_reshape", False)),
        skip_output_reshape=bool(named.get("skip_output_reshape", False)),
        scale=kwargs.get("scale"),
        enable_gqa=bool(kwargs.get("enable_gqa", False)),
        low_precision_attention=kwargs.get("low_precision_attention"),
        transformer_options=kwargs.get("transformer_options"),
    )


# Additive mask values at or below this remove a key (exp underflows to exactly 0 in any
# softmax); HunyuanVideo writes -finfo(dtype).max, others -inf.
_REMOVED = -1e4


def key_padding_length(mask, n_keys: int) -> int | None:
    """n when `mask` keeps exactly the first n keys for every batch row, head and query and
    removes the rest (a text-padding mask such as HunyuanVideo's (1, 1, L)); None for any
    other mask. Attention over the first n keys is then exactly the masked attention.
    Reads the mask on the host (one synchronisation): callers cache the answer per mask.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0 or mask.shape[-1] != n_keys:
        return None
    if any(size != 1 for size in mask.shape[:-1]):
        return None  # differs per batch row, head or query
    m = mask.reshape(-1)
    if m.dtype == torch.bool:
        kept, removed = m, ~m
    elif m.is_floating_point():
        kept, removed = m == 0, m <= _REMOVED
    else:
        return None
    n = kept.sum()
    prefix = torch.arange(n_keys, device=m.device) < n
    valid = (kept | removed).all() & kept.eq(prefix).all()
    n, valid = torch.stack([n, valid.long()]).tolist()
    return n if valid and n > 0 else None


def structural_decline(call: AttnCall) -> str | None:
    """Reasons that hold for any precision: what stock attention must serve. (Masks are
    judged separately: key-padding masks are served by dropping the padded keys.)"""
    if call.low_precision_attention is False:
        return "calls marked low_precision_attention=False"
    for name in ("q", "k", "v"):
        t = getattr(call, name)
        if not isinstance(t, torch.Tensor):
            return f"{name} that is not a tensor ({type(t).__name__})"
        if t.dtype not in _DTYPES:
            return f"{t.dtype} inputs"
    if call.q.dim() != (4 if call.skip_reshape else 3):
        return f"q of shape {tuple(call.q.shape)} with skip_reshape={call.skip_reshape}"
    if not isinstance(call.heads, int) or call.heads < 1:
        return f"heads={call.heads!r}"
    return None


def to_kernel_layout(call: AttnCall):
    """(q, k, v, layout) for sageattn2: views of the inputs, never copies.

    skip_reshape: (B, H, L, D) tensors, possibly strided (RoPE output, views of packed
    qkv) -> HND as they are. Otherwise (B, L, H*D) -> view (B, L, H, D) = NHD; with
    enable_gqa k/v's last dim is Hkv*D.
    """
    q, k, v = call.q, call.k, call.v
    if call.skip_reshape:
        if k.dim() != 4 or v.dim() != 4:
            raise Decline(f"k/v of shapes {tuple(k.shape)}, {tuple(v.shape)} with skip_reshape=True")
        if q.shape[1] != call.heads:
            raise Decline(f"q with {q.shape[1]} heads where heads={call.heads}")
        if k.shape[1] != q.shape[1] and not call.enable_gqa:
            raise Decline("k/v with fewer heads than q without enable_gqa")
        return q, k, v, "HND"
    if k.dim() != 3 or v.dim() != 3:
        raise Decline(f"k/v of shapes {tuple(k.shape)}, {tuple(v.shape)} with skip_reshape=False")
    if q.shape[-1] % call.heads:
        raise Decline(f"q width {q.shape[-1]} not divisible by heads={call.heads}")
    d = q.shape[-1] // call.heads
    if k.shape[-1] % d or v.shape[-1] % d:
        raise Decline(f"k/v widths {k.shape[-1]}, {v.shape[-1]} not a multiple of head dim {d}")
    kv_heads = k.shape[-1] // d
    if kv_heads != call.heads and not call.enable_gqa:
        raise Decline("k/v with fewer heads than q without enable_gqa")
    return (
        q.unflatten(-1, (call.heads, d)),
        k.unflatten(-1, (kv_heads, d)),
        v.unflatten(-1, (v.shape[-1] // d, d)),
        "NHD",
    )


def drop_padded_keys(k4: torch.Tensor, v4: torch.Tensor, layout: str, n: int):
    """Views of k and v with only their first n keys."""
    if layout == "HND":
        return k4[:, :, :n], v4[:, :, :n]
    return k4[:, :n], v4[:, :n]


def key_length(k4: torch.Tensor, layout: str) -> int:
    return k4.shape[2] if layout == "HND" else k4.shape[1]


def query_length(q4: torch.Tensor, layout: str) -> int:
    return q4.shape[2] if layout == "HND" else q4.shape[1]


def from_kernel_layout(out: torch.Tensor, layout: str, skip_output_reshape: bool) -> torch.Tensor:
    """sageattn2 output (q's layout) -> what ComfyUI expects: (B, H, L, D) with
    skip_output_reshape, else (B, L, H*D)."""
    if skip_output_reshape:
        # Rare (no core caller passes (B, L, H*D) in and wants (B, H, L, D) out); callers
        # may .view() the result, so hand back a contiguous tensor as SDPA would.
        return out if layout == "HND" else out.transpose(1, 2).contiguous()
    if layout == "HND":
        out = out.transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)
