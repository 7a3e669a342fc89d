"""`auto`, decided per model input: whole forwards with Sage Attention and without it, timed
alternately on the GPU during the first evaluations of sampling, then the faster one for every
later evaluation of that input shape.

Per-shape kernel timing (sageattn2.autotune) sees the attention calls alone. On a CPU-bound
model (SDXL at batch 1 on an H100: bench/results/h100_e2e_comfyui_session3.md) the host time of
the node's own path decides, and only a whole forward shows it. CUDA events around a forward
span the host gaps between its kernels too, so they measure what the user waits for.
"""
from __future__ import annotations

import torch

SAGE, STOCK = "sage", "stock"
# The first forward with Sage Attention is a warm-up (the per-shape kernel timing runs inside
# it); then stock and Sage Attention alternate, two timed forwards each.
PLAN = (SAGE, STOCK, SAGE, STOCK, SAGE)
# Sage Attention must be this much faster: a tie goes to stock (never slower than stock).
MARGIN = 0.01


class CudaClock:
    """Marks are CUDA event pairs on the current stream; reading one waits for its end event
    (once per decision)."""

    def start(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return start, end

    def elapsed_ms(self, mark) -> float:
        start, end = mark
        end.synchronize()
        return start.elapsed_time(end)


def input_key(args, kwargs) -> tuple | None:
    """What a verdict holds for: the latent's shape, dtype and device, and the conditioning's
    shape (prompt length). None when the forward is not on a CUDA device."""
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return None
    c = args[3] if len(args) > 3 else kwargs.get("c_crossattn")
    return tuple(x.shape), x.dtype, str(x.device), tuple(c.shape) if isinstance(c, torch.Tensor) else None


class ForwardRace:
    def __init__(self, clock=None):
        self.clock = clock if clock is not None else CudaClock()
        self.verdicts: dict[tuple, str] = {}
        self._marks: dict[tuple, list] = {}  # key -> [(side, mark or None)] of the pending race

    def side(self, key) -> str:
        """Which path this forward takes: the verdict, or the race's next entry."""
        verdict = self.verdicts.get(key)
        return verdict if verdict is not None else PLAN[len(self._marks.get(key, ()))]

    def timing(self, key) -> bool:
        """Whether this forward is timed (a race is on and it is past the warm-up)."""
        return key not in self.verdicts and len(self._marks.get(key, ())) > 0

    def record(self, key, side: str, mark) -> tuple[str, float, float] | None:
        """Adds one forward; returns (verdict, best Sage ms, best stock ms) when decided."""
        marks = self._marks.setdefault(key, [])
        marks.append((side, mark))
        if len(marks) < len(PLAN):
            return None
        best = {SAGE: float("inf"), STOCK: float("inf")}
        for s, m in marks[1:]:
            best[s] = min(best[s], self.clock.elapsed_ms(m))
        verdict = SAGE if best[SAGE] < best[STOCK] * (1 - MARGIN) else STOCK
        self.verdicts[key] = verdict
        del self._marks[key]
        return verdict, best[SAGE], best[STOCK]

    def restart(self, key) -> None:
        """Drops a pending race (a forward was recomputed: its time says nothing)."""
        self._marks.pop(key, None)
