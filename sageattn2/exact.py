"""Exact attention through PyTorch SDPA, and its logsumexp, in memory proportional to the inputs.

Every call this package makes to `F.scaled_dot_product_attention` goes through `sdpa()`,
which hands torch only what its CUDA backends take safely:
- storage that starts 16-byte aligned: a view one element past alignment (legal, e.g.
  `x[..., 1:]` of a flat buffer) makes cuDNN return garbage and flash / fp32 inputs raise a
  sticky "misaligned address" that breaks the CUDA context; such tensors are copied;
- at most MAX_GRID batch entries and heads per launch (the CUDA grid's y/z limit): larger
  calls are split;
- no `enable_gqa`: torch serves it with flash or the math backend only, and math
  materialises the full score matrix; query heads run in plain calls, one per group
  position (one per kv head, on a broadcast view, for groups above 64);
- on CUDA, head dims in multiples of 8: the memory-efficient backend (the only fused one
  for fp32) needs aligned rows, else torch takes the math backend (O(N^2) memory). Zero
  channels change neither the scores nor the kept output channels.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# CUDA's grid y/z limit: torch's attention kernels put batch and heads there.
MAX_GRID = 65535
# Smallest working set of the lse (fp32 elements, 4 MiB); above it, it follows the input size.
MIN_LSE_CHUNK = 1 << 20
_ALIGN_BYTES = 16
_HEAD_DIM_MULTIPLE = 8
# GQA groups up to this size run one SDPA call per position in the group.
_MAX_GROUP_CALLS = 64


def _aligned(t):
    """t, or a fresh (allocator-aligned) copy when its data does not start 16-byte aligned."""
    if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() % _ALIGN_BYTES:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _rows_ready(t):
    """q, k or v for torch's fused kernels: aligned, and a contiguous last dim (else torch falls
    back to its math backend, which materialises the whole score matrix: N^2 memory)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return t.contiguous()
    return _aligned(t)


def _plain_sdpa(query, key, value, attn_mask, **kw):
    """One torch call; slices of the callers' tensors may start misaligned, so align here."""
    query, key, value = (_rows_ready(t) for t in (query, key, value))
    attn_mask = _aligned(attn_mask)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kw)


def _mask_part(mask, axis: int, index, full: int):
    """The slice `index` of a broadcastable (..., H, L, S) mask along batch (axis 0) or heads
    (axis 1); a mask that broadcasts over that axis is kept whole."""
    if not isinstance(mask, torch.Tensor):
        return mask
    dim = axis - 4
    if mask.dim() < -dim or mask.shape[dim] != full:
        return mask
    return mask[(slice(None),) * (mask.dim() + dim) + (index,)]


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention with the safeguards of this module (same arguments)."""
    kw = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return _plain_sdpa(query, key, value, attn_mask, enable_gqa=enable_gqa, **kw)
    head_dim = query.shape[-1]
    if query.is_cuda and (head_dim % _HEAD_DIM_MULTIPLE or value.shape[-1] % _HEAD_DIM_MULTIPLE):
        pad = lambda t: F.pad(t, (0, -t.shape[-1] % _HEAD_DIM_MULTIPLE))
        scale = head_dim ** -0.5 if scale is None else scale
        out = sdpa(pad(query), pad(key), pad(value), attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return out[..., : value.shape[-1]]
    batch, heads_q, heads_kv = query.shape[0], query.shape[1], key.shape[1]
    if batch > MAX_GRID:
        parts = [sdpa(query[s], key[s], value[s], _mask_part(attn_mask, 0, s, batch), enable_gqa=enable_gqa, **kw)
                 for s in (slice(i, i + MAX_GRID) for i in range(0, batch, MAX_GRID))]
        return torch.cat(parts, dim=0)
    group = heads_q // heads_kv if enable_gqa and heads_kv else 1
    if heads_q > MAX_GRID:
        # Chunks of whole kv groups, or (one group above the limit) slices of one group.
        step = (MAX_GRID // group) * group if group <= MAX_GRID else _largest_divisor_at_most(group, MAX_GRID)
        parts = []
        for h in range(0, heads_q, step):
            kv = slice(h // group, -(-(h + step) // group))
            parts.append(sdpa(query[:, h:h + step], key[:, kv], value[:, kv],
                              _mask_part(attn_mask, 1, slice(h, h + step), heads_q), enable_gqa=enable_gqa, **kw))
        return torch.cat(parts, dim=1)
    if group == 1:
        return _plain_sdpa(query, key, value, attn_mask, **kw)
    out = query.new_empty(query.shape[:-1] + value.shape[-1:])
    if group <= max(heads_kv, _MAX_GROUP_CALLS):
        # Query heads j, j + group, ... read kv heads 0, 1, ...: one plain call per j.
        for j in range(group):
            rows = slice(j, None, group)
            out[:, rows] = _plain_sdpa(query[:, rows], key, value, _mask_part(attn_mask, 1, rows, heads_q), **kw)
        return out
    # Huge groups: one call per kv head against that head broadcast (a stride-0 view).
    for i in range(heads_kv):
        rows = slice(i * group, (i + 1) * group)
        shape = (batch, group) + key.shape[2:]
        key_i, value_i = _aligned(key[:, i:i + 1]), _aligned(value[:, i:i + 1])
        out[:, rows] = _plain_sdpa(query[:, rows], key_i.expand(shape), value_i.expand(shape[:3] + value.shape[3:]),
                                   _mask_part(attn_mask, 1, rows, heads_q), **kw)
    return out


def _box(extents, capacity: int) -> list[int]:
    """Chunk sizes for nested loops over `extents` (outermost first): the innermost dims are
    taken whole first, so that one chunk holds at most `capacity` items (at least 1 each)."""
    sizes = []
    for n in reversed(extents):
        size = max(1, min(n, capacity))
        sizes.append(size)
        capacity = capacity // n if size == n else 0
    return sizes[::-1]


def lse_tiles(batch: int, heads_kv: int, group: int, n_q: int, n_k: int, head_dim: int, capacity: int):
    """Tile sizes of `exact_lse`: ([batch, kv heads, group, rows], keys) such that one tile's
    fp32 working set stays within `capacity` elements (unless a single row and key exceed it):
    a key chunk's fp32 copy takes at most a quarter; each query row costs its fp32 copy and
    two score rows (the scores, reduced in place, and room for the causal mask). Whole heads
    are batched when one fits."""
    keys = min(n_k, max(1, capacity // (4 * head_dim)))
    per_row = 2 * keys + head_dim
    per_head = keys * head_dim + group * n_q * per_row
    if per_head <= capacity:
        return _box((batch, heads_kv), capacity // per_head) + [group, n_q], keys
    return [1, 1] + _box((group, n_q), max(1, (capacity - keys * head_dim) // per_row)), keys


def lse_tile_elements(sizes, keys: int, head_dim: int) -> int:
    """The fp32 elements one tile of `lse_tiles` holds at once (what `capacity` bounds)."""
    heads, rows = sizes[0] * sizes[1], sizes[0] * sizes[1] * sizes[2] * sizes[3]
    return heads * keys * head_dim + rows * (2 * keys + head_dim)


def default_lse_capacity(q, k) -> int:
    """fp32 elements of the lse's working set: a quarter of the inputs' elements (at least
    MIN_LSE_CHUNK), i.e. half of q + k's bytes for 16-bit inputs, a quarter for fp32."""
    return max(MIN_LSE_CHUNK, (q.numel() + k.numel()) // 4)


def _logsumexp_(s):
    """logsumexp over the last dim, overwriting s (torch.logsumexp holds two temporaries of
    s's size). Rows that are all -inf give -inf."""
    peak = s.amax(dim=-1, keepdim=True)
    peak.masked_fill_(peak == float("-inf"), 0.0)
    return s.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))


def exact_lse(q, k, is_causal: bool, sm_scale: float, max_chunk: int | None = None):
    """logsumexp(sm_scale * q k^T) per query row, float32 (B, Hq, Nq), for HND q (B, Hq, Nq, D)
    and k (B, Hkv, Nk, D).

    Memory: tiles of `lse_tiles` with at most `max_chunk` fp32 elements (default
    `default_lse_capacity`): only a tile's rows and keys are ever cast to fp32, query heads
    are viewed as (Hkv, group x rows) against their own kv head (K is never repeated or
    broadcast-copied), and key chunks are merged with logaddexp. Scores are fp32 products of
    the inputs' exact values. Causal tiles skip the keys their rows cannot see."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = torch.empty((B, Hkv, group, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.view(B, Hq, Nq)
    qg = q.unflatten(1, (Hkv, group))
    capacity = default_lse_capacity(q, k) if max_chunk is None else max_chunk
    sizes, keys = lse_tiles(B, Hkv, group, Nq, Nk, D, capacity)
    starts = [range(0, n, s) for n, s in zip((B, Hkv, group, Nq), sizes)]
    for b0, h0, g0, r0 in itertools.product(*starts):
        b, h, g = slice(b0, b0 + sizes[0]), slice(h0, h0 + sizes[1]), slice(g0, g0 + sizes[2])
        r1 = min(r0 + sizes[3], Nq)
        tile = qg[b, h, g, r0:r1]
        rows = tile.shape[2:4]
        q32 = tile.float().flatten(2, 3)  # (b, h, group x rows, D): one matmul per kv head
        lse = None
        for k0 in range(0, min(Nk, r1) if is_causal else Nk, keys):
            k1 = min(k0 + keys, Nk)
            s = torch.matmul(q32, k[b, h, k0:k1].float().transpose(-1, -2)).mul_(sm_scale)
            if is_causal and k1 - 1 > r0:
                hidden = torch.arange(k0, k1, device=q.device)[None, :] > torch.arange(r0, r1, device=q.device)[:, None]
                s.unflatten(2, rows).masked_fill_(hidden, float("-inf"))
            part = _logsumexp_(s)
            del s
            lse = part if lse is None else torch.logaddexp(lse, part, out=lse)
        out[b, h, g, r0:r1] = lse.unflatten(2, rows)
    return out.view(B, Hq, Nq)


def exact_sdpa(q, k, v, tensor_layout, is_causal, sm_scale, return_lse):
    """Exact attention through PyTorch SDPA (and an explicit logsumexp when asked for).
    Returns O in q's layout and lse (B, Hq, Nq) float32 or None."""
    if tensor_layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    o = sdpa(q, k, v, is_causal=is_causal, scale=sm_scale, enable_gqa=q.shape[1] != k.shape[1])
    lse = exact_lse(q, k, is_causal, sm_scale) if return_lse else None
    if tensor_layout == "NHD":
        o = o.transpose(1, 2)
    return o, lse
