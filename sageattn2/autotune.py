"""`auto` never slower than exact attention: per shape and GPU, time our quantized path
against PyTorch SDPA once, cache the winner, reuse it for every later call of that shape.

Short sequences (SDXL's low stages, cross-attention to 77-512 text tokens) are where the
quantization passes cost more than the faster kernel saves; this is how `auto` notices.
"""
from __future__ import annotations

import os

import torch

from . import loader
from .dispatch import log_once

# Calls below this many score elements per (batch x head) are too small to be worth timing:
# quantization overhead dominates and exact attention wins on every GPU we measured.
MIN_SCORES_FOR_QUANTIZED = 1024 * 1024
_decisions: dict[tuple, bool] = {}


def shape_key(q, k, layout: str, is_causal: bool) -> tuple:
    h, n = (1, 2) if layout == "HND" else (2, 1)
    capability = loader.capability(q.device) if q.is_cuda else None
    return (q.device.index, capability, q.dtype, layout, is_causal,
            q.shape[0], q.shape[h], k.shape[h], q.shape[n], k.shape[n], q.shape[-1])


def _median_ms(fn, iters: int) -> float:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    fn()  # warm-up (first launch loads modules)
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return times[len(times) // 2]


def quantized_pays_off(q, k, layout: str, is_causal: bool, run_quantized, run_exact, iters: int = 5) -> bool:
    """True when the quantized path is faster than exact for this shape (decided once).

    While a CUDA graph is being captured nothing can be timed: the decision then follows the
    size rule alone and is not cached, so the first eager call still measures.
    """
    if os.environ.get("SAGEATTN2_AUTOTUNE", "1") == "0":
        return True
    key = shape_key(q, k, layout, is_causal)
    if key in _decisions:
        return _decisions[key]
    n_q, n_k = key[8], key[9]
    if n_q * n_k < MIN_SCORES_FOR_QUANTIZED:
        decision = False
    elif torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return True
    else:
        t_quant = _median_ms(run_quantized, iters)
        t_exact = _median_ms(run_exact, iters)
        decision = t_quant < t_exact
        log_once(
            f"auto: {'quantized' if decision else 'exact'} attention for shape "
            f"B={key[5]} H={key[6]}/{key[7]} N={n_q}x{n_k} D={key[10]} "
            f"({t_quant:.3f} ms quantized vs {t_exact:.3f} ms exact)"
        )
    _decisions[key] = decision
    return decision
