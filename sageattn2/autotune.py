"""`auto` never slower than exact attention: per shape and GPU, time our quantized path
against the exact path once, cache the winner, reuse it for every later call of that shape.

Short sequences (SDXL's low stages, cross-attention to 77-512 text tokens) are where the
quantization passes cost more than the faster kernel saves; this is how `auto` notices.

The two paths are timed interleaved (quantized, exact, exact, quantized, ...) after two
warm-up calls each, so drift during the timing (a clock still rising after idle time, a queue
still busy with earlier work) hits both alike; in blocks (all quantized calls, then all exact
ones) it is charged to one side. The quantized path must win by MARGIN: a tie goes to exact.
"""
from __future__ import annotations

import os

import torch

from . import loader
from .dispatch import log_once

# Calls below this many score elements per (batch x head) are too small to be worth timing:
# quantization overhead dominates and exact attention wins on every GPU we measured.
MIN_SCORES_FOR_QUANTIZED = 1024 * 1024
MARGIN = 0.02
WARMUPS = 2
ITERS = 7
_decisions: dict[tuple, bool] = {}
# key -> (quantized ms, exact ms) medians behind each timed decision (diagnostics, tests)
timings: dict[tuple, tuple[float, float]] = {}


def shape_key(q, k, layout: str, is_causal: bool, reference: str = "sdpa") -> tuple:
    """What a decision holds for. `reference` names the exact path timed against (the public
    API's SDPA, or ComfyUI's attention function for the nodes)."""
    h, n = (1, 2) if layout == "HND" else (2, 1)
    capability = loader.capability(q.device) if q.is_cuda else None
    return (q.device.index, capability, q.dtype, layout, is_causal,
            q.shape[0], q.shape[h], k.shape[h], q.shape[n], k.shape[n], q.shape[-1], reference)


def paired_medians(run_quantized, run_exact, iters: int = ITERS, warmups: int = WARMUPS) -> tuple[float, float]:
    """(quantized ms, exact ms): medians of `iters` calls each, interleaved in ABBA order."""
    for _ in range(warmups):
        run_quantized()
        run_exact()
    marks = ([], [])  # quantized, exact
    for i in range(iters):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            (run_quantized, run_exact)[side]()
            end.record()
            marks[side].append((start, end))
    torch.cuda.synchronize()

    def median(pairs):
        times = sorted(s.elapsed_time(e) for s, e in pairs)
        return times[len(times) // 2]

    return median(marks[0]), median(marks[1])


def quantized_pays_off(q, k, layout: str, is_causal: bool, run_quantized, run_exact,
                       reference: str = "sdpa", key: tuple | None = None) -> bool:
    """True when the quantized path is at least MARGIN faster than exact for this shape
    (decided once). `key`: `shape_key` of these arguments, when the caller has it already.

    While a CUDA graph is being captured nothing can be timed: the decision then follows the
    size rule alone and is not cached, so the first eager call still measures.
    """
    if os.environ.get("SAGEATTN2_AUTOTUNE", "1") == "0":
        return True
    if key is None:
        key = shape_key(q, k, layout, is_causal, reference)
    decision = _decisions.get(key)
    if decision is not None:
        return decision
    n_q, n_k = key[8], key[9]
    if n_q * n_k < MIN_SCORES_FOR_QUANTIZED:
        decision = False
    elif torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return True
    else:
        t_quant, t_exact = paired_medians(run_quantized, run_exact)
        timings[key] = (t_quant, t_exact)
        decision = t_quant < t_exact * (1 - MARGIN)
        log_once(
            f"auto: {'quantized' if decision else 'exact'} attention for shape "
            f"B={key[5]} H={key[6]}/{key[7]} N={n_q}x{n_k} D={key[10]}{' causal' if is_causal else ''} "
            f"({t_quant:.3f} ms quantized vs {t_exact:.3f} ms {reference})"
        )
    _decisions[key] = decision
    return decision
