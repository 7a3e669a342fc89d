"""`auto` per model input: which attention calls run Sage Attention, decided from timings taken
inside the first model evaluations of sampling, without making the host wait for the GPU
(except once, at the decision, if the timed work has not finished yet).

Measuring. Calls of one attention signature (query/key shapes, layout, dtype) alternate
between Sage Attention and the stock function ComfyUI gave us, each bracketed by CUDA events
on the current stream. No call runs twice: a stock sample is a real call that returned the
stock output. Where the GPU waits for the host (CPU-bound models such as SDXL or a Flux slice
on an H100) the events span the host time of each path too, so the node's own host cost is in
the samples. The first call of each side is a warm-up (kernel loading, cuDNN plans) and is not
counted. Calls a signature does not time (its samples are in, or it is too small to matter) run
stock until the samples say Sage Attention is faster: measuring costs only the timed Sage calls.

Deciding, per signature, sequentially (`assess`): after MIN_SAMPLES samples per side it stops
if every sample of one side beats every sample of the other by CLEAR of a stock call (more
than noise or two timing modes a few percent apart could show); else after SAMPLES, if two
estimates of the saving (difference of the medians, robust to noise; of the minima, which
hiccups, only ever adding time, cannot move) agree in sign; else (bimodal or noisy timings)
after WINDOW. Its saving per call is the smaller estimate. Per evaluation,
the predicted saving = sum over signatures that save of (calls per evaluation x saving). Sage
Attention runs (on those signatures) only if the prediction is at least ENTER of the
evaluation's time (CUDA events around whole evaluations; a prediction under twice that first
takes WINDOW samples on each signature); otherwise every later evaluation of that input runs
stock attention without our override in the way: no host cost at all.

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
MIN_SAMPLES = 3
SAMPLES = 4
WINDOW = 6  # samples kept per side, and the most a signature takes before deciding
CLEAR = 0.20
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
    return tuple(x.shape), x.dtype, x.device, tuple(c.shape) if isinstance(c, torch.Tensor) else None


def median(xs) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def estimate(stock: list[float], sage: list[float]) -> float:
    """Saving per call in ms (negative: Sage Attention is slower): the smaller of the difference
    of the medians and that of the minima."""
    return min(median(stock) - median(sage), min(stock) - min(sage))


def assess(stock: list[float], sage: list[float]) -> float | None:
    """A signature's saving per call (ms) once its samples decide, None while more are needed
    (the sequential rule in the module docstring)."""
    n = min(len(stock), len(sage))
    if n < MIN_SAMPLES:
        return None
    clear = CLEAR * median(stock)
    if min(stock) - max(sage) >= clear or min(sage) - max(stock) >= clear:
        return estimate(stock, sage)
    if n < SAMPLES:
        return None
    by_median, by_minimum = median(stock) - median(sage), min(stock) - min(sage)
    if (by_median > 0) != (by_minimum > 0) and n < WINDOW:
        return None
    return estimate(stock, sage)


class SignatureTimes:
    """Timed calls of one signature: sides alternate, the first call of each is a warm-up."""

    def __init__(self):
        self.turn = SAGE
        self.warmed: set[str] = set()
        self.marks = {SAGE: deque(maxlen=WINDOW), STOCK: deque(maxlen=WINDOW)}
        self.latest = None  # the mark recorded last (its end event completes after the others)
        self.limit = SAMPLES  # samples to take before assessing with a wait (WINDOW if they disagree)
        self.saving: float | None = None  # ms per call, once assessed
        self.settle_at = MIN_SAMPLES  # fewest samples a saving may rest on (WINDOW once extended)
        self._assessed = 0  # samples at the last assessment

    def next_side(self) -> str:
        side = self.turn
        self.turn = STOCK if side == SAGE else SAGE
        return side

    def add(self, side: str, mark) -> None:
        self.latest = mark
        if side in self.warmed:
            self.marks[side].append(mark)
        else:
            self.warmed.add(side)

    def samples(self) -> int:
        return min(len(self.marks[SAGE]), len(self.marks[STOCK]))

    def all_marks(self) -> list:
        return [*self.marks[SAGE], *self.marks[STOCK]]

    def ms(self, clock, side: str) -> list[float]:
        return [clock.ms(m) for m in self.marks[side]]

    def measuring(self) -> bool:
        return self.saving is None and self.samples() < self.limit

    def untimed_side(self) -> str:
        """Where its untimed calls go before the verdict: stock unless measured faster."""
        return SAGE if self.saving is not None and self.saving > 0 else STOCK

    def extend(self) -> None:
        """Measure on to WINDOW samples before settling (a prediction close to the line)."""
        self.limit = self.settle_at = WINDOW
        self.saving = None

    def try_assess(self, clock, wait: bool = False) -> bool:
        """Assesses new samples whose events are complete (waits for them when `wait`); True
        once `saving` is set. Samples that do not decide at `limit` raise it to WINDOW."""
        n = self.samples()
        if self.saving is not None:
            return True
        if n < self.settle_at or n == self._assessed:
            return False
        if not clock.ready(self.latest) or not all(clock.ready(m) for m in self.all_marks()):
            if not wait:
                return False
            for m in self.all_marks():
                if not clock.ready(m):
                    clock.wait(m)
        self._assessed = n
        self.saving = assess(self.ms(clock, STOCK), self.ms(clock, SAGE))
        if self.saving is None and n >= self.limit:
            self.limit = WINDOW
        return self.saving is not None


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
            times = self.times.get(sig)
            if times is None:
                times = self.times[sig] = SignatureTimes()
            if times.saving is None:
                times.try_assess(self.clock)  # never waits: decides as soon as the events are complete
                if times.measuring():
                    return times.next_side(), True
            return times.untimed_side(), False
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
        if self.verdict is None:
            return self.judge()
        if self._pending:
            return self.recheck()
        return None

    # -- the decision --------------------------------------------------------------------

    def judge(self) -> str | None:
        timed = [s for s in self.counts if self.worth_timing(s)]
        if not timed:
            if not self.counts and self.evaluations < 2:
                return None  # nothing seen yet (the first evaluation may have been recomputed)
            return self._set(STOCK, frozenset(), 0.0, 0.0)
        pending = False
        for s in timed:
            times = self.times.get(s)
            if times is None:
                pending = True
            elif not times.try_assess(self.clock) and not times.measuring():
                # Its samples are in but their events are not complete: wait once for the
                # evaluation's end (recorded last) rather than measure on.
                self._wait_for_evaluation()
                pending |= not times.try_assess(self.clock, wait=True)
            else:
                pending |= times.saving is None
        if pending:
            return None
        winners = frozenset(s for s in timed if self.times[s].saving > 0)
        gain = sum(self.counts[s] * self.times[s].saving for s in winners)
        if not winners:  # no evaluation time needed (and none waited for)
            return self._set(STOCK, frozenset(), 0.0, self._evaluation_ms(wait=False))
        eval_ms = self._evaluation_ms(wait=True)
        short = [s for s in winners if self.times[s].samples() < WINDOW]
        if ENTER * eval_ms <= gain < 2 * ENTER * eval_ms and short:
            # Close to the line: a few samples' noise could carry it over; measure on.
            for s in short:
                self.times[s].extend()
            return None
        verdict = SAGE if gain >= ENTER * eval_ms else STOCK
        return self._set(verdict, winners if verdict == SAGE else frozenset(), gain, eval_ms)

    def recheck(self) -> str | None:
        """A marginal Sage verdict with one more pair per signature: judged on the latest WINDOW
        samples once their events are complete (never waited for)."""
        marks = [m for s in self.sage_signatures for m in self.times[s].all_marks()] + list(self.eval_marks)
        if not all(self.clock.ready(m) for m in marks):
            return None
        saving = {s: estimate(self.times[s].ms(self.clock, STOCK), self.times[s].ms(self.clock, SAGE))
                  for s in self.sage_signatures}
        winners = frozenset(s for s, ms in saving.items() if ms > 0)
        gain = sum(self.counts.get(s, 0) * saving[s] for s in winners)
        eval_ms = self._evaluation_ms(wait=False)
        verdict = SAGE if winners and gain >= STAY * eval_ms else STOCK
        return self._set(verdict, winners if verdict == SAGE else frozenset(), gain, eval_ms)

    def _wait_for_evaluation(self) -> None:
        if self.eval_marks and not self.clock.ready(self.eval_marks[-1]):
            self.clock.wait(self.eval_marks[-1])

    def _evaluation_ms(self, wait: bool) -> float:
        """Median time of the timed evaluations (0.0 when none is complete and `wait` is off)."""
        if wait:
            self._wait_for_evaluation()
            for m in self.eval_marks:
                if not self.clock.ready(m):
                    self.clock.wait(m)
        done = [self.clock.ms(m) for m in self.eval_marks if self.clock.ready(m)]
        return median(done) if done else 0.0

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
