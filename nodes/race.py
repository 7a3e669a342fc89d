"""`auto` per model input: which attention calls run Sage Attention, decided from timings taken
inside the first model evaluations of sampling, without making the host wait for the GPU
(except once, at the decision, if the timed work has not finished yet).

Measuring. Calls of one attention signature (query/key shapes, layout, dtype) alternate
between Sage Attention and the stock function ComfyUI gave us, each bracketed by CUDA events
on the current stream. No call runs twice: a stock sample is a real call that returned the
stock output. Where the GPU waits for the host (CPU-bound models such as SDXL or a Flux slice
on an H100) the events span the host time of each path too, so the node's own host cost is in
the samples. The first call of each side is a warm-up (kernel loading, cuDNN plans) and is not
counted; once a signature has SAMPLES samples per side, its further calls run Sage Attention
until the verdict.

Deciding. Per signature, saving = stock ms - Sage ms (the smaller of the difference of the
medians and that of the minima: robust to noise and to hiccups); per evaluation, the
predicted saving = sum over signatures that save of (calls per evaluation x saving). Sage
Attention runs (on those signatures) only if the prediction is at least ENTER of the
evaluation's time (CUDA events around whole evaluations); otherwise every later evaluation of
that input runs stock attention without our override in the way: no host cost at all.

Re-checking. A Sage verdict within RECHECK_BELOW of the line is re-timed: every RECHECK
evaluations one more pair per signature; it falls back to stock when the prediction over the
latest WINDOW samples drops below STAY (hysteresis: ENTER to enter, STAY to stay).
"""
from __future__ import annotations

from collections import deque

import torch

SAGE, STOCK = "sage", "stock"
ENTER = 0.03
STAY = 0.01
RECHECK_BELOW = 0.10
SAMPLES = 4
WINDOW = 6
RECHECK = 8


class CudaClock:
    """Marks are CUDA event pairs on the current stream."""

    def start(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return start, end

    def ready(self, mark) -> bool:
        return mark[1].query()

    def wait(self, mark) -> None:
        mark[1].synchronize()

    def ms(self, mark) -> float:
        return mark[0].elapsed_time(mark[1])


def input_key(args, kwargs) -> tuple | None:
    """What a verdict holds for: the latent's shape, dtype and device, and the conditioning's
    shape (prompt length). None when the forward is not on a CUDA device."""
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return None
    c = args[3] if len(args) > 3 else kwargs.get("c_crossattn")
    return tuple(x.shape), x.dtype, str(x.device), tuple(c.shape) if isinstance(c, torch.Tensor) else None


def median(xs) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class SignatureTimes:
    """Timed calls of one signature: sides alternate, the first call of each is a warm-up."""

    def __init__(self):
        self.turn = SAGE
        self.warmed: set[str] = set()
        self.marks = {SAGE: deque(maxlen=WINDOW), STOCK: deque(maxlen=WINDOW)}

    def next_side(self) -> str:
        side = self.turn
        self.turn = STOCK if side == SAGE else SAGE
        return side

    def add(self, side: str, mark) -> None:
        if side in self.warmed:
            self.marks[side].append(mark)
        else:
            self.warmed.add(side)

    def samples(self) -> int:
        return min(len(self.marks[SAGE]), len(self.marks[STOCK]))

    def all_marks(self) -> list:
        return [*self.marks[SAGE], *self.marks[STOCK]]


class InputDecision:
    """`auto`'s verdict for one model input, and the timings it rests on."""

    def __init__(self, key, clock, worth_timing=lambda sig: True):
        self.key = key
        self.clock = clock
        self.worth_timing = worth_timing  # False: the signature runs stock untimed
        self.verdict: str | None = None  # None while measuring
        self.sage_signatures: frozenset = frozenset()
        self.times: dict[tuple, SignatureTimes] = {}
        self.counts: dict[tuple, int] = {}  # calls per evaluation by signature (latest evaluation)
        self.eval_marks: deque = deque(maxlen=WINDOW)
        self.evaluations = 0
        self.timing = False  # this evaluation times calls (measuring or a re-check)
        self.last: tuple[float, float] | None = None  # (predicted saving ms, evaluation ms) of the latest judgement
        self.changes = 0  # verdicts set so far (1: the first)
        self.broken = False  # the clock failed: per-shape decisions instead (the override's fallback)
        self._seen: dict[tuple, int] = {}
        self._pending = False  # a re-check's samples wait to be judged

    # -- per model evaluation ------------------------------------------------------------

    def start_evaluation(self):
        """Returns the evaluation's start mark, or None when this evaluation is not timed."""
        self.evaluations += 1
        self._seen = {}
        self.timing = self.verdict is None or (
            self.verdict == SAGE and self.marginal() and self.evaluations % RECHECK == 0)
        if self.timing and self.verdict is not None:
            self._pending = True
        return self.clock.start() if self.timing else None

    def marginal(self) -> bool:
        return self.last is None or self.last[0] < RECHECK_BELOW * self.last[1]

    def route(self, sig) -> tuple[str, bool]:
        """(side, timed) for one call of signature `sig`."""
        seen = self._seen[sig] = self._seen.get(sig, 0) + 1
        if not self.worth_timing(sig):
            return STOCK, False
        if self.verdict is None:
            times = self.times.setdefault(sig, SignatureTimes())
            if times.samples() < SAMPLES:
                return times.next_side(), True
            return SAGE, False  # enough samples taken: Sage Attention until the verdict
        if sig not in self.sage_signatures:
            return STOCK, False
        if self.timing and seen <= 2:  # a re-check: the signature's first two calls, one per side
            return self.times[sig].next_side(), True
        return SAGE, False

    def record(self, sig, side: str, mark) -> None:
        self.times[sig].add(side, mark)

    def end_evaluation(self, start) -> str | None:
        """Ends the evaluation `start_evaluation` returned `start` for; returns the verdict when
        this evaluation set or changed it."""
        if self._seen:
            self.counts = dict(self._seen)
        if start is not None:
            self.eval_marks.append(self.clock.stop(start))
        if self.verdict is None or self._pending:
            return self.judge()
        return None

    # -- the decision --------------------------------------------------------------------

    def judge(self) -> str | None:
        timed = [s for s in self.counts if self.worth_timing(s)]
        if self.verdict is None and not timed:
            if not self.counts and self.evaluations < 2:
                return None  # nothing seen yet (the first evaluation may have been recomputed)
            return self._set(STOCK, frozenset(), 0.0, 0.0)
        if any(s not in self.times or self.times[s].samples() < SAMPLES for s in timed) or not self.eval_marks:
            return None
        marks = [m for s in timed for m in self.times[s].all_marks()] + list(self.eval_marks)
        if not all(self.clock.ready(m) for m in marks):
            if self.verdict is not None:
                return None  # a re-check waits for its events (next evaluation)
            # Deciding: wait once rather than measure on. The evaluation's end was recorded
            # last; marks of other streams (if any) are waited for one by one.
            self.clock.wait(self.eval_marks[-1])
            for m in marks:
                if not self.clock.ready(m):
                    self.clock.wait(m)
        saving = {}
        for s in timed:
            stock = [self.clock.ms(m) for m in self.times[s].marks[STOCK]]
            sage = [self.clock.ms(m) for m in self.times[s].marks[SAGE]]
            # The smaller of two estimates: medians, and minima (which hiccups, only ever
            # adding time, cannot move).
            saving[s] = min(median(stock) - median(sage), min(stock) - min(sage))
        eval_ms = median(self.clock.ms(m) for m in self.eval_marks)
        winners = frozenset(s for s in timed if saving[s] > 0)
        gain = sum(self.counts[s] * saving[s] for s in winners)
        line = ENTER if self.verdict is None else STAY
        verdict = SAGE if winners and gain >= line * eval_ms else STOCK
        return self._set(verdict, winners if verdict == SAGE else frozenset(), gain, eval_ms)

    def _set(self, verdict: str, signatures: frozenset, gain: float, eval_ms: float) -> str | None:
        changed = verdict != self.verdict
        self.changes += changed
        self.verdict, self.sage_signatures = verdict, signatures
        self.last = (gain, eval_ms)
        self._pending = False
        return verdict if changed else None


class AutoDecisions:
    """One InputDecision per model input key."""

    def __init__(self, clock=None, worth_timing=lambda sig: True):
        self.clock = clock if clock is not None else CudaClock()
        self.worth_timing = worth_timing
        self.inputs: dict[tuple, InputDecision] = {}

    def for_input(self, key) -> InputDecision:
        decision = self.inputs.get(key)
        if decision is None:
            decision = self.inputs[key] = InputDecision(key, self.clock, self.worth_timing)
        return decision
