"""Randomized test of `sageattn2.sageattn`: random shapes, dtypes, layouts, views, levels and
data, each compared with exact attention; plus bad and extreme inputs run in child processes.

    python tests/gpu/fuzz_attention.py --device cuda --cases 1000 --seed 1 --out $OUT/fuzz
    python tests/gpu/fuzz_attention.py --device cpu  --cases 200            (CI: tests/test_fuzz.py)

A case is fully determined by (seed, index): a failure line prints both, and
`--only INDEX` reruns that case alone. Every case checks:
- accuracy against float32 exact attention (float64 on CPU) with the floors of
  docs/numerics.md §5 for the requested level (`auto` uses int8+fp8's);
- on small cases that ran a kernel, that it is no further from exact than the PyTorch
  reference of the same configuration (a kernel mismatch);
- no NaN/Inf in O or lse; inputs bit-identical afterwards;
- peak extra memory <= 2 x (Q + K + V + O) + 8 MiB: on CUDA torch.cuda.max_memory_allocated,
  on CPU (exact and auto, whose code is the product's) `HostPeakMemory`.
On CPU the quantized levels run backend="reference" (the kernels' emulation).

Bad inputs (wrong types, NaN scale, empty keys, ...) and extreme ones (batch or heads above
the CUDA grid, misaligned storage, 8.4M keys) run in child processes; each must give its
expected exception or a correct result and leave CUDA usable (a child then runs a small
attention and synchronizes). A crash or a broken context is counted, not fatal.

Exit status 0 only when every case passed. Results: summary.json and failures.jsonl in --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import sageattn2  # noqa: E402
from sageattn2 import dispatch  # noqa: E402
from sageattn2.config import PRECISIONS  # noqa: E402
from sageattn2.reference import exact_attention, reference_attention  # noqa: E402

HEAD_DIMS = (32, 33, 40, 48, 57, 64, 72, 80, 96, 100, 112, 128, 136, 160, 192, 200, 256)
GRANULARITIES = ("per_thread", "per_warp", "per_block")
DATA_KINDS = ("normal", "outlier", "sink", "large")
VIEWS = ("contiguous", "sliced", "misaligned", "expanded", "other_layout", "strided_last")
MIB = 1 << 20


# ---------------------------------------------------------------------------------------
# Error floors: the table of docs/numerics.md §5 is the one definition


def load_floors(path: Path = ROOT / "docs" / "numerics.md") -> dict[tuple[str, str], dict[str, float]]:
    """{(level, data kind): {"rel_l1": .., "cos": .., "lse": ..}} from the markdown table
    whose header starts with '| level | data |'."""
    floors, columns = {}, None
    for line in path.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| level | data |"):
            columns = cells
            continue
        if columns and line.startswith("|") and not set(line) <= set("|-: "):
            row = dict(zip(columns, cells))
            floors[(row["level"], row["data"])] = {c: float(row[c]) for c in columns[2:]}
        elif columns and not line.startswith("|"):
            columns = None
    if not floors:
        raise RuntimeError(f"no error floor table in {path}")
    return floors


# ---------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    index: int
    batch: int
    heads_q: int
    heads_kv: int
    n_q: int
    n_k: int
    head_dim: int
    dtype: str
    layout: str
    view: str
    causal: bool
    lse: bool
    precision: str
    granularity: str
    smooth_k: bool
    smooth_q: bool | None
    smooth_v: bool
    sm_scale: float | None
    data: str

    def __str__(self):
        return (f"#{self.index} {self.batch}x{self.heads_q}/{self.heads_kv}x{self.n_q}x{self.n_k}x{self.head_dim} "
                f"{self.dtype} {self.layout} {self.view} {self.precision} {self.granularity} data={self.data} "
                f"causal={self.causal} lse={self.lse} scale={self.sm_scale} smooth=k{int(self.smooth_k)}"
                f"q{self.smooth_q}v{int(self.smooth_v)}")

    @property
    def scores(self) -> int:
        return self.batch * self.heads_q * self.n_q * self.n_k


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def make_case(seed: int, index: int, max_tokens: int, max_scores: int) -> Case:
    rng = random.Random(seed * 1_000_003 + index)
    heads_kv = rng.choice((1, 1, 2, 3, 4))
    group = rng.choice((1, 1, 2, 3, 4, 8))
    batch = rng.choice((1, 1, 1, 2, 3))
    n_q, n_k = _log_uniform(rng, 1, max_tokens), _log_uniform(rng, 1, max_tokens)
    if rng.random() < 0.3:
        n_k = n_q
    # Keep the work bounded: fewer heads and batch first, then shorter sequences.
    while batch * heads_kv * group * n_q * n_k > max_scores:
        if batch > 1:
            batch -= 1
        elif group > 1:
            group //= 2
        elif heads_kv > 1:
            heads_kv -= 1
        elif n_q >= n_k:
            n_q = max(1, n_q // 2 + 1)
        else:
            n_k = max(1, n_k // 2 + 1)
    precision = rng.choice(PRECISIONS + ("auto", "int8+fp8"))
    scale_roll = rng.random()
    sm_scale = None if scale_roll < 0.7 else (round(rng.uniform(0.02, 0.4), 4) * (-1 if scale_roll > 0.9 else 1))
    return Case(
        index=index, batch=batch, heads_q=heads_kv * group, heads_kv=heads_kv, n_q=n_q, n_k=n_k,
        head_dim=rng.choice(HEAD_DIMS), dtype=rng.choice(("float16", "bfloat16", "bfloat16", "float32")),
        layout=rng.choice(("HND", "NHD")), view=rng.choice(VIEWS), causal=rng.random() < 0.3,
        lse=rng.random() < 0.4, precision=precision, granularity=rng.choice(GRANULARITIES),
        smooth_k=rng.random() < 0.8, smooth_q=rng.choice((None, None, True, False)), smooth_v=rng.random() < 0.2,
        sm_scale=sm_scale, data=rng.choice(DATA_KINDS),
    )


def _data(case: Case, gen: torch.Generator, device):
    """float32 HND q, k, v of the case's data kind, made on `device`."""
    B, Hq, Hkv, Nq, Nk, d = case.batch, case.heads_q, case.heads_kv, case.n_q, case.n_k, case.head_dim
    randn = lambda *s: torch.randn(*s, generator=gen, device=device)
    q, k, v = randn(B, Hq, Nq, d), randn(B, Hkv, Nk, d), randn(B, Hkv, Nk, d)
    if case.data == "outlier":  # diffusion-model-like: K channel bias, a few huge Q channels, V bias
        k += 3.0 * randn(1, Hkv, 1, d)
        v += 2.0 * randn(1, Hkv, 1, d)
        q[..., torch.randperm(d, generator=gen, device=device)[:2]] *= 8.0
    elif case.data == "sink":  # key 0 scores about +6 for every query; its value is large
        u = randn(d)
        u /= u.norm()
        q += 2.0 * u
        k[:, :, 0] = 3.0 * math.sqrt(d) * u
        v[:, :, 0] *= 20.0
    elif case.data == "large":  # large magnitudes: peaky softmax, big outputs
        q, k, v = 2.5 * q, 2.5 * k, 60.0 * v
    return q, k, v


def _misaligned_empty(numel: int, dtype, device) -> torch.Tensor:
    """A flat tensor whose storage starts one element past 16-byte alignment."""
    flat = torch.empty(numel + 16, dtype=dtype, device=device)
    size = flat.element_size()
    off = next(i for i in range(16) if (flat.data_ptr() + i * size) % 16 == size)
    return flat[off: off + numel]


def _view(x_hnd: torch.Tensor, case: Case, role: str) -> torch.Tensor:
    """The case's tensor in its layout and memory view (same values as x_hnd)."""
    x = x_hnd if case.layout == "HND" else x_hnd.transpose(1, 2)
    dtype = getattr(torch, case.dtype)
    if case.view == "sliced":  # rows padded by 8 channels: non-contiguous, last dim contiguous
        big = x.new_zeros(*x.shape[:-1], x.shape[-1] + 8, dtype=dtype)
        big[..., : x.shape[-1]] = x
        return big[..., : x.shape[-1]]
    if case.view == "misaligned":
        out = _misaligned_empty(x.numel(), dtype, x.device).view(x.shape)
        out.copy_(x)
        return out
    if case.view == "expanded" and role != "q":  # K/V broadcast over the batch (stride 0)
        return x[:1].to(dtype).expand(x.shape)
    if case.view == "other_layout":  # HND asked, NHD storage (and vice versa)
        return x.transpose(1, 2).to(dtype).contiguous().transpose(1, 2)
    if case.view == "strided_last" and role == "v":  # last dim not contiguous: kernels decline
        big = x.new_zeros(*x.shape, 2, dtype=dtype)
        big[..., 0] = x
        return big[..., 0]
    return x.to(dtype).contiguous()


def make_inputs(case: Case, seed: int, device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + case.index)
    q, k, v = _data(case, gen, device)
    return tuple(_view(x, case, role) for role, x in (("q", q), ("k", k), ("v", v)))


# ---------------------------------------------------------------------------------------
# One case


def metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    o, r = out.double().flatten(), ref.double().flatten()
    denom = r.abs().sum().item()
    rel = (o - r).abs().sum().item() / denom if denom else (o - r).abs().max().item()
    on, rn = o.norm().item(), r.norm().item()
    cos = (o @ r).item() / (on * rn) if on and rn else (1.0 if on == rn else 0.0)
    return {"rel_l1": rel, "cos": cos}


class HostPeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the `with` block and alive at once
    (torch has no allocator statistics on CPU). Every ATen op's output counts, including the
    intermediates of composite ops (a matmul's broadcast copy, a `.float()`), except outputs
    that share storage with an argument (views, in-place and out= ops); temporaries inside
    one ATen kernel are not seen."""

    def __enter__(self):
        self.live = self.peak = 0
        self._tracked = {}
        return super().__enter__()

    def _freed(self, key, nbytes):
        self._tracked.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()  # one Python object per storage while it lives
            key = id(storage)
            if key not in given and key not in self._tracked:
                self._tracked[key] = weakref.finalize(storage, self._freed, key, storage.nbytes())
                self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def _bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def run_case(case: Case, seed: int, device, floors, reference_scores: int) -> dict:
    """Runs one case; returns a record with "failures" (empty when it passed)."""
    q, k, v = make_inputs(case, seed, device)
    before = [t.clone() for t in (q, k, v)]
    quantized = case.precision not in ("auto", "exact")
    kw = dict(tensor_layout=case.layout, is_causal=case.causal, sm_scale=case.sm_scale, return_lse=case.lse,
              precision=case.precision, granularity=case.granularity, smooth_k=case.smooth_k,
              smooth_q=case.smooth_q, smooth_v=case.smooth_v)
    if device.type == "cpu" and quantized:
        kw["backend"] = "reference"
    cuda = device.type == "cuda"
    host = HostPeakMemory() if device.type == "cpu" and not quantized else None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with host or contextlib.nullcontext():
        res = sageattn2.sageattn(q, k, v, **kw)
    o, lse = res if case.lse else (res, None)
    if cuda:
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - base
    elif host:
        extra = host.peak
    seconds = time.perf_counter() - start
    failures = []
    record = {"case": str(case), "seed": seed, "index": case.index, "seconds": round(seconds, 4)}
    if cuda or host:
        limit = 2 * _bytes(q, k, v, o) + 8 * MIB
        record["extra_mib"] = round(extra / MIB, 2)
        if extra > limit:
            failures.append(f"memory: {extra / MIB:.1f} MiB extra > {limit / MIB:.1f} MiB")
    if o.shape != q.shape or o.dtype != q.dtype:
        failures.append(f"shape/dtype: {tuple(o.shape)} {o.dtype}")
    if not torch.isfinite(o).all():
        failures.append("O has NaN/Inf")
    if lse is not None and (lse.shape != (case.batch, case.heads_q, case.n_q) or not torch.isfinite(lse).all()):
        failures.append("lse has NaN/Inf or a wrong shape")
    if not all(torch.equal(a, b) for a, b in zip((q, k, v), before)):
        failures.append("inputs changed")
    del before

    compute = torch.float64 if device.type == "cpu" else torch.float32
    ref_o, ref_lse = exact_attention(q, k, v, tensor_layout=case.layout, is_causal=case.causal,
                                     sm_scale=case.sm_scale, return_lse=case.lse, compute_dtype=compute)
    m = metrics(o, ref_o)
    record.update({k_: round(v_, 7) for k_, v_ in m.items()})
    level = "int8+fp8" if case.precision == "auto" else case.precision
    floor = floors[(level, case.data)]
    if m["rel_l1"] > floor["rel_l1"] or m["cos"] < floor["cos"]:
        failures.append(f"accuracy vs exact: rel_l1 {m['rel_l1']:.4g} cos {m['cos']:.6f} (floor {floor})")
    if lse is not None:
        # Quantization moves each score by a fraction of its magnitude, so the lse error is
        # measured against the size of the exact lse (at least 1).
        lse_err = (lse.double() - ref_lse.double()).abs().max().item()
        lse_rel = lse_err / max(1.0, ref_lse.abs().max().item())
        record.update(lse_err=round(lse_err, 6), lse_rel=round(lse_rel, 6))
        if lse_rel > floor["lse"]:
            failures.append(f"lse error {lse_err:.4g} ({lse_rel:.4g} of max|lse|) > {floor['lse']}")

    plan = _plan(q, k, v, case, kw)
    record["served_by"] = plan.backend + ("" if plan.cfg is None else f" {plan.cfg.precision}")
    if plan.backend in ("mma", "wgmma") and case.scores <= reference_scores:
        qc, kc, vc = ((t.to(torch.bfloat16) if t.dtype == torch.float32 else t) for t in (q, k, v))
        r_o, _ = reference_attention(qc, kc, vc, plan.cfg, tensor_layout=case.layout, is_causal=case.causal,
                                     sm_scale=case.sm_scale)
        m_ref = metrics(r_o, ref_o)
        record["ref_rel_l1"] = round(m_ref["rel_l1"], 7)
        if m["rel_l1"] > 1.1 * m_ref["rel_l1"] + 5e-3:
            failures.append(f"kernel mismatch: rel_l1 {m['rel_l1']:.4g} vs reference {m_ref['rel_l1']:.4g}")
    record["failures"] = failures
    return record


def _plan(q, k, v, case, kw):
    return dispatch.plan(q, k, v, layout=case.layout, precision=case.precision, granularity=case.granularity,
                         smooth_k=case.smooth_k, smooth_q=case.smooth_q, smooth_v=case.smooth_v,
                         is_causal=case.causal, backend=kw.get("backend", "auto"))


# ---------------------------------------------------------------------------------------
# Bad and extreme inputs, each in a child process

# name -> (setup code defining q, k, v and `call`, expected: exception name or "ok").
# `dev` is the device; the child checks an "ok" call against exact attention.
CHILD_CASES = {
    "is_causal_string": ("q = k = v = t(1, 2, 64, 64); call = lambda: sa.sageattn(q, k, v, is_causal='False')",
                         "TypeError"),
    "sm_scale_nan": ("q = k = v = t(1, 2, 64, 64); call = lambda: sa.sageattn(q, k, v, sm_scale=float('nan'))",
                     "ValueError"),
    "sm_scale_inf": ("q = k = v = t(1, 2, 64, 64); call = lambda: sa.sageattn(q, k, v, sm_scale=float('inf'))",
                     "ValueError"),
    "sm_scale_string": ("q = k = v = t(1, 2, 64, 64); call = lambda: sa.sageattn(q, k, v, sm_scale='0.1')",
                        "TypeError"),
    "empty_keys": ("q = t(1, 2, 64, 64); k = v = t(1, 2, 0, 64); call = lambda: sa.sageattn(q, k, v)", "ValueError"),
    "zero_kv_heads": ("q = t(1, 2, 64, 64); k = v = t(1, 0, 64, 64); call = lambda: sa.sageattn(q, k, v)",
                      "ValueError"),
    "gqa_mismatch": ("q = t(1, 3, 64, 64); k = v = t(1, 2, 64, 64); call = lambda: sa.sageattn(q, k, v)",
                     "ValueError"),
    "int_dtype": ("q = k = v = t(1, 2, 64, 64).to(torch.int32); call = lambda: sa.sageattn(q, k, v)", "TypeError"),
    "mixed_devices": ("q = t(1, 2, 64, 64); k = v = q.cpu(); call = lambda: sa.sageattn(q, k, v)", "ValueError"),
    "bad_layout": ("q = k = v = t(1, 2, 64, 64); call = lambda: sa.sageattn(q, k, v, tensor_layout='BHND')",
                   "ValueError"),
    "empty_batch": ("q = k = v = t(0, 2, 64, 64); call = lambda: sa.sageattn(q, k, v, return_lse=True)", "empty"),
    "zero_heads": ("q = t(1, 0, 64, 64); k = v = t(1, 1, 64, 64); call = lambda: sa.sageattn(q, k, v, return_lse=True)",
                   "empty"),
    "batch_65536": ("q = k = v = t(65536, 1, 4, 32); call = lambda: sa.sageattn(q, k, v, return_lse=True)", "ok"),
    "heads_65536": ("q = t(1, 65536, 4, 32); k = v = t(1, 1, 4, 32); call = lambda: sa.sageattn(q, k, v, return_lse=True)",
                    "ok"),
    "misaligned_fp16_exact": ("q, k, v = (misalign(t(1, 8, 1024, 64)) for _ in range(3)); "
                              "call = lambda: sa.sageattn(q, k, v, precision='exact', return_lse=True)", "ok"),
    "misaligned_fp32_auto": ("q, k, v = (misalign(t(1, 8, 1024, 64, dtype=torch.float32)) for _ in range(3)); "
                             "call = lambda: sa.sageattn(q, k, v, return_lse=True)", "ok"),
    "misaligned_mask_dropin": ("q, k, v = (misalign(t(1, 4, 256, 64)) for _ in range(3)); m = misalign(t(1, 1, 256, 256)); "
                               "call = lambda: sa.scaled_dot_product_attention(q, k, v, attn_mask=m)", "mask_ok"),
    "negative_scale_fp8": ("q, k, v = (t(1, 8, 2048, 128) for _ in range(3)); scale = -0.125; "
                           "call = lambda: sa.sageattn(q, k, v, sm_scale=scale, precision='int8+fp8', return_lse=True)",
                           "ok"),
    "negative_scale_fp16": ("q, k, v = (t(1, 8, 2048, 128) for _ in range(3)); scale = -0.125; "
                            "call = lambda: sa.sageattn(q, k, v, sm_scale=scale, precision='int8+fp16', return_lse=True)",
                            "ok"),
    "negative_scale_auto": ("q, k, v = (t(1, 8, 2048, 128) for _ in range(3)); scale = -0.125; "
                            "call = lambda: sa.sageattn(q, k, v, sm_scale=scale, return_lse=True)", "ok"),
    "expanded_v_fp16": ("q = t(2, 8, 1024, 128); k = t(2, 8, 1024, 128); v = t(1, 1, 1024, 128).expand(2, 8, 1024, 128); "
                        "call = lambda: sa.sageattn(q, k, v, precision='int8+fp16', return_lse=True)", "ok"),
    "int4_forced_int8_level": ("q, k, v = (t(1, 4, 1024, 128) for _ in range(3)); "
                               "call = lambda: sa.sageattn(q, k, v, precision='int8+fp8', force_int4_emulation=True)",
                               "ok"),
    "keys_8_4M_dim256": ("q = t(1, 1, 64, 256); k = t(1, 1, 8_400_000, 256); v = t(1, 1, 8_400_000, 256); "
                         "call = lambda: sa.sageattn(q, k, v, precision='int8+fp8', return_lse=True)", "ok"),
}

CHILD_PRELUDE = r"""
import json, math, sys, traceback
import torch
sys.path.insert(0, ROOT)
import sageattn2 as sa
from sageattn2.reference import exact_attention
dev = torch.device(DEVICE)
g = torch.Generator(device=dev).manual_seed(0)
def t(*shape, dtype=torch.float16):
    return torch.randn(*shape, generator=g, device=dev, dtype=dtype)
def misalign(x):
    flat = torch.empty(x.numel() + 16, dtype=x.dtype, device=x.device)
    off = next(i for i in range(16) if (flat.data_ptr() + i * x.element_size()) % 16 == x.element_size())
    out = flat[off:off + x.numel()].view(x.shape); out.copy_(x); return out
def check_ok(res, q, k, v):
    o, lse = res if isinstance(res, tuple) else (res, None)
    if not torch.isfinite(o).all(): return "non-finite output"
    B, H, N = q.shape[0], q.shape[1], q.shape[2]
    sub = slice(0, min(B, 3)), slice(0, min(H, 4))
    kh = k.shape[1]
    if H > kh and kh == 1: ks, vs = k[sub[0]], v[sub[0]]
    else: ks, vs = k[sub], v[sub]
    r, rl = exact_attention(q[sub], ks, vs, return_lse=lse is not None, compute_dtype=torch.float32,
                            sm_scale=scale)
    o = o[sub].double(); r = r.double()
    cos = float((o.flatten() @ r.flatten()) / (o.norm() * r.norm()))
    if cos < 0.99: return f"cos {cos:.4f}"
    if lse is not None and (lse[sub].double() - rl.double()).abs().max() > 0.2: return "lse off"
    return None
"""

CHILD_BODY = r"""
result = {"case": NAME}
try:
    scale = None
    exec(SETUP)
    try:
        res = call()
        if dev.type == 'cuda': torch.cuda.synchronize()
        if EXPECT in ('ok', 'mask_ok'):
            why = check_ok(res, q, k, v) if EXPECT == 'ok' else (None if torch.isfinite(res).all() else 'non-finite')
            result['outcome'] = 'ok' if why is None else 'wrong: ' + why
        elif EXPECT == 'empty':
            o, lse = res
            result['outcome'] = 'ok' if o.shape == q.shape and lse.shape == (q.shape[0], q.shape[1], q.shape[2]) else 'wrong shapes'
        else:
            result['outcome'] = 'no exception (expected ' + EXPECT + ')'
    except Exception as e:
        ok = type(e).__name__ == EXPECT
        result['outcome'] = 'ok' if ok else f'{type(e).__name__}: {str(e)[:300]}'
        result['message'] = str(e)[:300]
except Exception as e:
    result['outcome'] = 'setup failed: ' + repr(e)[:300]
# The context must still work.
try:
    x = torch.randn(1, 2, 128, 64, device=dev, dtype=torch.float16)
    y = sa.sageattn(x, x, x)
    if dev.type == 'cuda': torch.cuda.synchronize()
    result['context'] = 'ok' if torch.isfinite(y).all() else 'non-finite after'
except Exception as e:
    result['context'] = f'broken: {type(e).__name__}: {str(e)[:200]}'
print('RESULT ' + json.dumps(result), flush=True)
"""


def _child_script(names, device) -> str:
    parts = [f"ROOT = {str(ROOT)!r}\nDEVICE = {str(device)!r}\n", CHILD_PRELUDE]
    for name in names:
        setup, expect = CHILD_CASES[name]
        parts.append(f"NAME = {name!r}\nSETUP = {setup!r}\nEXPECT = {expect!r}\n" + CHILD_BODY)
    return "\n".join(parts)


def run_child_cases(device, isolate: bool, timeout: float, names=None, jobs: int = 4) -> list[dict]:
    """Runs CHILD_CASES in child processes (one per case, `jobs` at a time, when `isolate`;
    else one for all); a case whose child died or timed out is reported as a crash."""
    names = list(names or CHILD_CASES)
    if device.type == "cpu":  # cases that only make sense (or fit) on a GPU
        names = [n for n in names if n not in ("keys_8_4M_dim256", "mixed_devices")]
    groups = [[n] for n in names] if isolate else [names]
    pending, running, results = list(groups), [], {}

    def finish(group, proc, out, err):
        rc = proc.returncode if proc.returncode is not None else "timeout"
        seen = {}
        for line in out.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                seen[r["case"]] = r
        for name in group:
            r = seen.get(name, {"case": name, "outcome": f"crash (exit {rc}): {err[-400:]}", "context": "unknown"})
            r["passed"] = r["outcome"] == "ok" and r.get("context") == "ok"
            results[name] = r

    while pending or running:
        while pending and len(running) < jobs:
            group = pending.pop(0)
            proc = subprocess.Popen([sys.executable, "-c", _child_script(group, device)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            running.append((group, proc, time.monotonic()))
        group, proc, started = running.pop(0)
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout * len(group) - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            proc.returncode = None
        finish(group, proc, out or "", err or "")
    return [results[n] for n in names]


# ---------------------------------------------------------------------------------------
# Driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", type=int, default=int(os.environ.get("SA2_FUZZ_CASES", 200)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SA2_FUZZ_SEED", 1)))
    ap.add_argument("--only", type=int, nargs="*", help="run just these case indices")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 131072 on CUDA, 160 on CPU")
    ap.add_argument("--max-scores", type=int, default=None, help="B*Hq*Nq*Nk cap per case")
    ap.add_argument("--no-children", action="store_true", help="skip the child-process cases")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the random cases; past it the run stops and fails (INCOMPLETE)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    max_tokens = args.max_tokens or (131072 if cuda else 160)
    max_scores = args.max_scores or ((1 << 31) if cuda else (1 << 17))
    reference_scores = (1 << 22) if cuda else max_scores
    floors = load_floors()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "cases.jsonl").open("w") if args.out else None

    if cuda:
        _warm_up(device)
    indices = args.only if args.only else range(args.cases)
    passed = failed = errors = 0
    failures = []
    start = time.perf_counter()
    incomplete = False
    for i in indices:
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            incomplete = True
            print(f"INCOMPLETE: time budget of {args.time_budget:.0f} s reached after {passed + failed} cases", flush=True)
            break
        case = make_case(args.seed, i, max_tokens, max_scores)
        try:
            rec = run_case(case, args.seed, device, floors, reference_scores)
        except Exception as e:  # an exception on valid input is a failure, never a stop
            rec = {"case": str(case), "seed": args.seed, "index": i,
                   "failures": [f"raised {type(e).__name__}: {str(e)[:300]}"]}
            errors += 1
            if cuda:
                torch.cuda.synchronize()  # a broken context makes every later case fail loudly
        if rec["failures"]:
            failed += 1
            failures.append(rec)
            print(f"FAIL seed={args.seed} {rec['case']}: {'; '.join(rec['failures'])}", flush=True)
        else:
            passed += 1
        if log:
            log.write(json.dumps(rec) + "\n")
    fuzz_seconds = time.perf_counter() - start

    if cuda:
        torch.cuda.empty_cache()  # the children share the card: leave them this process's cache
    children = [] if args.no_children or args.only else run_child_cases(device, isolate=cuda, timeout=240 if cuda else 120)
    child_failed = [c for c in children if not c["passed"]]
    for c in child_failed:
        print(f"FAIL child case {c['case']}: {c['outcome']} / context {c.get('context')}", flush=True)
    summary = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "seed": args.seed,
        "cases": passed + failed, "passed": passed, "failed": failed, "raised": errors,
        "nan_or_inf": sum(any("NaN" in f for f in r["failures"]) for r in failures),
        "kernel_mismatches": sum(any("mismatch" in f for f in r["failures"]) for r in failures),
        "memory_over": sum(any("memory" in f for f in r["failures"]) for r in failures),
        "seconds": round(fuzz_seconds, 1), "incomplete": incomplete,
        "child_cases": len(children), "child_failed": len(child_failed),
        "child_crashes": sum("crash" in c["outcome"] for c in children),
        "child_broken_context": sum(c.get("context", "").startswith("broken") for c in children),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.out:
        log.close()
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        with (args.out / "failures.jsonl").open("w") as f:
            for r in failures + child_failed:
                f.write(json.dumps(r) + "\n")
        with (args.out / "children.jsonl").open("w") as f:
            for r in children:
                f.write(json.dumps(r) + "\n")
    return 0 if not failed and not child_failed and not incomplete else 1


def _warm_up(device) -> None:
    """Allocations that persist after a process's first matmul / SDPA / kernel call (cuBLAS
    workspace, counters) are made here, so the per-case memory measure sees only the call."""
    x = torch.randn(1, 2, 256, 64, device=device, dtype=torch.float16)
    for dtype in (torch.float16, torch.float32):
        y = x.to(dtype)
        sageattn2.sageattn(y, y, y, return_lse=True, precision="exact")
        sageattn2.sageattn(y, y, y, return_lse=True)
        y @ y.transpose(-1, -2)
    torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
