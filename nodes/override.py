"""The per-model attention override and its installation on a ModelPatcher.

What gets installed on a clone of the model (nothing global):
- `transformer_options["optimized_attention_override"]`: a `SageOverride`, called by
  ComfyUI's `wrap_attn` as `override(func, q, k, v, heads, ...)` for every attention call
  of the diffusion model;
- an APPLY_MODEL wrapper (once per model evaluation): puts a fresh `ForwardState` (sigma,
  layer counter, `auto`'s decision) into the per-call transformer_options, puts our override
  back on top if a later node replaced it, and times the evaluation while `auto` measures;
- a SAMPLER_SAMPLE wrapper (once per sampling run): the quantized outputs of the whole run are
  checked on the device and read once at its end; if one was inf/NaN the run is redone with
  stock attention. Nothing in a model evaluation waits for the GPU. An evaluation outside a
  sampling run is checked on its own (one read) and recomputed with stock attention;
- ON_PRE_RUN / ON_CLEANUP callbacks: per-run start and reset.

Calls we decline (masks, low_precision_attention=False, short sequences, `exact` cells,
no kernel for this GPU/shape/dtype, any error of ours) go to the override that was there
before us, else to `func`, with the arguments exactly as received; each reason is logged
once per patched model.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from dataclasses import dataclass

import torch

from .. import sageattn2 as sa2
from ..sageattn2 import autotune
from .adapter import (
    Decline,
    drop_padded_keys,
    from_kernel_layout,
    key_length,
    key_padding_length,
    parse_call,
    query_length,
    structural_decline,
    to_kernel_layout,
)
from .layers import FORWARD_KEY, ForwardState, LayerMemory, layers_text
from .levels import AUTO, EXACT, LEVELS, rotated, split_rotation
from .finite import FiniteCheck
from .race import ENTER, SAGE, STAY, STOCK, AutoDecisions, input_key
from .schedule import Schedule

log = logging.getLogger("sageattn2.nodes")

OVERRIDE_KEY = "optimized_attention_override"
HOOK_KEY = "sageattn2"
# Values of comfy.patcher_extension.WrappersMP.APPLY_MODEL / SAMPLER_SAMPLE /
# CallbacksMP.ON_PRE_RUN / ON_CLEANUP (stable since the hook system landed); literal so tests
# need no ComfyUI.
APPLY_MODEL = "apply_model"
SAMPLER_SAMPLE = "sampler_sample"
ON_PRE_RUN = "on_pre_run"
ON_CLEANUP = "on_cleanup"

GRANULARITIES = ("per_thread", "per_warp", "per_block")
_labels = itertools.count(1)
_delegating = threading.local()


@dataclass(frozen=True)
class PatchSettings:
    precision: str = "auto"
    granularity: str = "per_thread"
    smooth_k: bool = True
    smooth_q: bool | None = None  # None: on for INT4 QK, off for INT8
    smooth_v: bool = False
    min_seq_len: int = 1024
    backend: str = "auto"  # "reference": pure-PyTorch emulation of the kernels (tests, debugging)
    rotate_qk: bool = False  # Q and K Hadamard-rotated before quantizing, where no schedule rule applies

    def __post_init__(self):
        if self.precision not in LEVELS:
            raise ValueError(f"precision must be one of {LEVELS}, got {self.precision!r}")
        if not isinstance(self.rotate_qk, bool):
            raise TypeError(f"rotate_qk must be a bool, got {self.rotate_qk!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"qk_granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be >= 0, got {self.min_seq_len}")

    @property
    def level(self) -> str:
        """What runs where no schedule rule applies: `precision`, rotated when rotate_qk is on
        (exact has nothing to rotate)."""
        return rotated(self.precision, self.rotate_qk)

    def kernel_kwargs(self) -> dict:
        return dict(granularity=self.granularity, smooth_k=self.smooth_k, smooth_q=self.smooth_q,
                    smooth_v=self.smooth_v, backend=self.backend)


def _sigma_value(t) -> float | None:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    return float(t) if isinstance(t, (int, float)) else None


def _name_of(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class SageOverride:
    """The callable in transformer_options. Holds only its state and the override it
    chains to; ComfyUI deep-copies model_options on every clone, and all clones of one
    patched model must share one state, so deepcopy returns the object itself."""

    def __init__(self, state: "PatchState", previous=None):
        self.state = state
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, *args, **kwargs):
        if getattr(_delegating, "depth", 0):
            # A previous override we passed a declined call to has called us again (it chains
            # to us too): serve nothing twice, finish the call with the stock function.
            return func(*args, **kwargs)
        return self.state.handle(self, func, args, kwargs)

    def decline(self, func, args, kwargs):
        if self.previous is None:
            return func(*args, **kwargs)
        _delegating.depth = getattr(_delegating, "depth", 0) + 1
        try:
            return self.previous(func, *args, **kwargs)
        finally:
            _delegating.depth -= 1


class PatchState:
    """One Patch Sage Attention node applied to one model: settings, schedule, log-once
    set, learned layer counts, counters of what was served and declined."""

    # Subclasses whose start_forward reads forward.sigma set this (calibration's step count).
    reads_sigma = False

    def __init__(self, settings: PatchSettings, schedule: Schedule | None = None):
        self.settings = settings
        self.schedule = schedule if schedule is not None and schedule.rules else None
        self.label = f"model #{next(_labels)} ({settings.level}{', scheduled' if self.schedule else ''})"
        self.base: SageOverride | None = None
        self.bound = None
        self.bound_for = None
        self.memory = LayerMemory()
        self.stats: Counter = Counter()
        self.exact_for_run = False
        self.trace: list | None = None  # set to [] to record (sigma, layer, level) per call
        self.rules_checked = False  # rules matching no layer are reported after the first forward
        self._logged: set[str] = set()
        self._on_top: dict[int, tuple[object, SageOverride]] = {}
        # Unmasked call signatures the per-shape timing gave to stock: later calls skip straight
        # to stock (layout views, plan and autotune lookups cost host time that CPU-bound models feel).
        self._auto_stock: dict[tuple, str] = {}
        self._routes: dict[tuple, Route] = {}  # PatchState.route
        self.kernel_kwargs = settings.kernel_kwargs()
        # `auto` without a schedule decides per model input from timings inside sampling (race.py).
        self.auto = AutoDecisions(worth_timing=_worth_timing) if settings.precision == AUTO else None
        self.run_check: FiniteCheck | None = None  # set for the length of a sampling run
        self.rerun_pointless = False  # a stock re-run was not finite either

    # -- logging and schedule binding ------------------------------------------------------

    def note(self, message: str, level: int = logging.INFO) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.log(level, "[sageattn2] %s: %s", self.label, message)

    def bind(self, model_sampling) -> None:
        """Windows of the schedule in this model's sigmas; rebinds when a node such as
        ModelSamplingSD3 swapped model_sampling after the patch."""
        if self.schedule is None or (model_sampling is self.bound_for and self.bound is not None):
            return
        to_sigma = getattr(model_sampling, "percent_to_sigma", None)
        if to_sigma is None:
            self.note("the model has no percent_to_sigma; schedule time windows are treated as unknown "
                      "(the most accurate candidate level runs)", logging.WARNING)
        self.bound = self.schedule.bind(to_sigma)
        self.bound_for = model_sampling

    # -- per model evaluation --------------------------------------------------------------

    def needs_sigma(self) -> bool:
        return self.reads_sigma or self.schedule is not None or self.trace is not None

    def override_on_top_of(self, current) -> SageOverride:
        if isinstance(current, SageOverride) and current.state is self:
            return current
        if current is None or current is self.base.previous:
            return self.base
        entry = self._on_top.get(id(current))
        if entry is None or entry[0] is not current:
            self.note(f"another attention override ({_name_of(current)}) was installed after this patch; "
                      "Sage Attention stays in front and passes the calls it declines to it", logging.WARNING)
            entry = (current, SageOverride(self, current))
            self._on_top[id(current)] = entry
        return entry[1]

    def apply_model_wrapper(self, executor, *args, **kwargs):
        args = list(args)
        in_args = len(args) > 5
        to = args[5] if in_args else kwargs.get("transformer_options")
        if not isinstance(to, dict):
            return executor(*args, **kwargs)
        try:
            self.bind(getattr(executor.class_obj, "model_sampling", None))
            # Reading sigma waits for the GPU (it lives there): only when something uses it.
            sigma = (_sigma_value(args[1] if len(args) > 1 else kwargs.get("t"))
                     if self.needs_sigma() else None)
            top = self.override_on_top_of(to.get(OVERRIDE_KEY))
            decision = self.decision_for(args, kwargs)
        except Exception as e:  # never stop sampling over bookkeeping: run the model as it is
            self.note(f"model evaluation left unprepared ({type(e).__name__}: {str(e)[:200]})", logging.WARNING)
            return executor(*args, **kwargs)

        def call_with(call_to: dict):
            if in_args:
                args[5] = call_to
            else:
                kwargs["transformer_options"] = call_to
            return executor(*args, **kwargs)

        if decision is not None and decision.verdict == STOCK:
            # This model as ComfyUI would run it without the patch: the override we chain to.
            call_to = {k: v for k, v in to.items() if k != OVERRIDE_KEY}
            if top.previous is not None:
                call_to[OVERRIDE_KEY] = top.previous
            return call_with(call_to)

        def run(exact: bool, decision):
            forward = ForwardState(sigma, deferred_check=True)
            forward.exact = exact
            forward.auto = decision
            # Inside a sampling run the run's check collects the outputs (read once at its end).
            forward.outputs = self.run_check if self.run_check is not None else FiniteCheck()
            try:
                self.start_forward(forward, to)
            except Exception as e:
                self.note(f"step bookkeeping failed ({type(e).__name__}: {str(e)[:200]})", logging.WARNING)
            mark = self.auto_clock(decision, "start_evaluation") if decision is not None else None
            # A copy: never write into a dict the caller may reuse (apply_model's default).
            out = call_with(dict(to, **{FORWARD_KEY: forward, OVERRIDE_KEY: top}))
            if decision is not None:
                self.auto_clock(decision, "end_evaluation", mark)
            return out, forward

        out, forward = run(self.exact_for_run, decision)
        self.memory.learn(forward)
        self.report_unmatched_rules(forward)
        if forward.outputs is not self.run_check and not forward.outputs.finite():
            # No sampling run around this evaluation: checked (one host read) and recomputed here.
            self.note("non-finite quantized attention output: the model evaluation is recomputed with stock "
                      "attention, and the rest of that sampling run uses stock attention", logging.WARNING)
            self.stats["recomputed"] += 1
            self.exact_for_run = True
            out, _ = run(True, None)
        return out

    def report_unmatched_rules(self, forward: ForwardState) -> None:
        """Once the model's layers are known: the schedule rules that select none of them."""
        if self.schedule is None or self.rules_checked or forward.calls == 0:
            return
        self.rules_checked = True
        try:
            layers = forward.layers(self.memory)
            unmatched = self.schedule.unmatched(layers)
            names = layers_text([p.name for p in layers])
        except Exception as e:  # bookkeeping only: sampling goes on
            self.note(f"schedule check failed ({type(e).__name__}: {str(e)[:200]})", logging.WARNING)
            return
        for rule in unmatched:
            self.note(f"schedule rule on {rule.where} matches no attention layer of this model, so it does "
                      f"nothing (the model's attention layers: {names})", logging.WARNING)

    def sampler_sample_wrapper(self, executor, *args, **kwargs):
        """Around one sampling run (ComfyUI's SAMPLER_SAMPLE): every quantized output of the
        run goes into one device-side check, read once when the run has finished. If one was
        inf/NaN the run is redone with stock attention, from copies of its inputs."""
        if self.run_check is not None or self.exact_for_run:
            return executor(*args, **kwargs)
        saved = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        self.run_check = FiniteCheck()
        try:
            out = executor(*args, **kwargs)
            finite = self.run_check.finite()
        finally:
            self.run_check = None
        if finite:
            return out
        self.stats["rerun"] += 1
        if self.rerun_pointless:
            return out
        self.note("non-finite quantized attention output: the sampling run is redone with stock attention",
                  logging.WARNING)
        self.exact_for_run = True
        try:
            stock = executor(*saved, **kwargs)
        finally:
            self.exact_for_run = False
        if isinstance(stock, torch.Tensor) and not bool(torch.isfinite(stock).all()):
            self.rerun_pointless = True
            self.note("the stock run is not finite either (the model itself overflows): later runs are not redone",
                      logging.WARNING)
        return stock

    def decision_for(self, args, kwargs):
        """`auto`'s decision for this evaluation's input: `auto` without a schedule, on CUDA,
        outside a stock-only run; else None."""
        if self.auto is None or self.schedule is not None or self.exact_for_run:
            return None
        key = input_key(args, kwargs)
        if key is None:
            return None
        decision = self.auto.for_input(key)
        return None if decision.broken else decision

    def auto_clock(self, decision, what: str, *args):
        """decision.<what>(*args). Timing trouble: this input goes back to the per-shape
        decisions (sageattn2.autotune), and sampling goes on."""
        try:
            verdict = getattr(decision, what)(*args)
        except Exception as e:
            self.note(f"auto timing failed ({type(e).__name__}: {str(e)[:200]}); per-shape decisions instead",
                      logging.WARNING)
            decision.broken = True
            return None
        if what == "end_evaluation" and verdict is not None:
            self.report_verdict(decision, verdict)
        return verdict

    def report_verdict(self, decision, verdict: str) -> None:
        self.stats[("auto model", verdict)] += 1
        gain, eval_ms = decision.last
        share = 100 * gain / eval_ms if eval_ms > 0 else 0.0
        first = decision.changes == 1
        if verdict == SAGE:
            what = (f"Sage Attention on {len(decision.sage_signatures)} of {len(decision.times)} timed call shapes "
                    f"(predicted saving {gain:.2f} ms, {share:.1f} % of a {eval_ms:.1f} ms evaluation)")
        elif gain <= 0:
            what = f"stock attention (none of {len(decision.times)} timed call shapes is faster with Sage Attention)"
        else:
            what = (f"stock attention (predicted saving {gain:.2f} ms, {share:.1f} % of a {eval_ms:.1f} ms "
                    f"evaluation; Sage Attention needs {100 * (ENTER if first else STAY):.0f} %)")
        when = f"after {decision.evaluations} evaluations" if first else f"re-checked at evaluation {decision.evaluations}"
        self.note(f"auto, model input {list(decision.key[0])}, {when}: {what}")

    def start_forward(self, forward: ForwardState, to: dict) -> None:
        """Hook for subclasses (calibration: step bookkeeping)."""

    # ON_PRE_RUN / ON_CLEANUP callbacks get (patcher); `*_` takes whatever later ComfyUI adds.
    def on_pre_run(self, patcher, *_) -> None:
        self.exact_for_run = False

    def on_cleanup(self, patcher, *_) -> None:
        self.exact_for_run = False

    # -- per attention call ----------------------------------------------------------------

    def forward_state(self, to) -> ForwardState:
        if not isinstance(to, dict):
            return ForwardState(None)
        forward = to.get(FORWARD_KEY)
        sigmas = to.get("sigmas")
        if forward is None or (not forward.deferred_check and forward.sigmas_ref is not sigmas):
            # No APPLY_MODEL wrapper ran (the diffusion model was called some other way): keep
            # the state in the per-call dict, check outputs call by call.
            forward = ForwardState(_sigma_value(sigmas) if self.needs_sigma() else None, sigmas_ref=sigmas)
            to[FORWARD_KEY] = forward
        return forward

    def level_for(self, forward: ForwardState, key, pos) -> str:
        level = forward.levels.get(key)
        if level is None:
            base = self.settings.level
            level = self.bound.level(forward.sigma, pos, base) if self.bound is not None else base
            forward.levels[key] = level
        return level

    def handle(self, override: SageOverride, func, args, kwargs):
        try:
            call = parse_call(args, kwargs)
            forward = self.forward_state(call.transformer_options)
            if self.schedule is not None or self.trace is not None:
                key, pos = forward.position(call.transformer_options or {}, self.memory)
                level = EXACT if forward.exact else self.level_for(forward, key, pos)
                if self.trace is not None:
                    self.trace.append((forward.sigma, pos.name, level))
            else:  # one level for every layer: which layer is calling does not matter
                level = EXACT if forward.exact else self.settings.level
            out = self.serve(call, forward, level, stock=lambda: func(*args, **kwargs))
        except TimedStock as why:
            out = self.declined(override, func, args, kwargs, str(why))
            self.record_sample(why.decision, why.sig, STOCK, why.start)
            return out
        except Decline as why:
            return self.declined(override, func, args, kwargs, str(why))
        except Exception as e:  # never crash mid-sampling: stock attention finishes the call
            self.note(f"sageattn2 failed ({type(e).__name__}: {str(e)[:200]}); such calls run stock attention",
                      logging.WARNING)
            return self.declined(override, func, args, kwargs, f"error: {type(e).__name__}", log_it=False)
        self.stats[("sage", level)] += 1
        return out

    def record_sample(self, decision, sig, side: str, start) -> None:
        try:
            decision.record(sig, side, decision.clock.stop(start))
        except Exception as e:
            self.note(f"auto timing failed ({type(e).__name__}: {str(e)[:200]}); per-shape decisions instead",
                      logging.WARNING)
            decision.broken = True

    def declined(self, override, func, args, kwargs, reason: str, log_it: bool = True):
        self.stats[("declined", reason)] += 1
        if log_it and reason != EXACT:
            self.note(f"calls go to stock attention: {reason}")
        return override.decline(func, args, kwargs)

    def kernel_inputs(self, call, forward: ForwardState):
        """(q, k, v, layout) for sageattn2, or Decline with the reason."""
        reason = structural_decline(call)
        if reason:
            raise Decline(reason)
        q4, k4, v4, layout = to_kernel_layout(call)
        if call.mask is not None and forward is not None:
            key = id(call.mask)
            if key not in forward.key_padding:
                forward.key_padding[key] = key_padding_length(call.mask, key_length(k4, layout))
            n = forward.key_padding[key]
            if n is None:
                raise Decline("attention masks (other than key padding)")
            k4, v4 = drop_padded_keys(k4, v4, layout, n)
        if query_length(q4, layout) < self.settings.min_seq_len:
            raise Decline(f"sequences shorter than min_seq_len={self.settings.min_seq_len} tokens")
        return q4, k4, v4, layout

    def planned(self, q4, k4, v4, layout, level):
        """The plan of a level ("int4+fp8+hadamard": rotated), or Decline where it runs exact."""
        s = self.settings
        precision, rotate = split_rotation(level)
        p = sa2.plan(q4, k4, v4, layout=layout, precision=precision, granularity=s.granularity,
                     smooth_k=s.smooth_k, smooth_q=s.smooth_q, smooth_v=s.smooth_v, is_causal=False,
                     backend=s.backend, hadamard=rotate)
        if p.backend == "exact":
            raise Decline(p.note or "calls without a quantized kernel")
        return p

    def route(self, call, level: str) -> "Route":
        """What calls like this one get, worked out once per signature (shapes, last strides,
        dtypes, device, heads, flags, level): a decline, or the views and precision to run."""
        q, k, v = call.q, call.k, call.v
        try:
            key = (q.shape, k.shape, v.shape, q.stride(-1), k.stride(-1), v.stride(-1), q.dtype, k.dtype,
                   v.dtype, q.device, call.heads, call.skip_reshape, call.enable_gqa,
                   call.low_precision_attention, level)
            route = self._routes.get(key)
        except Exception:  # not tensors, an unhashable argument: worked out for this call only
            return self.route_for(call, level)
        if route is None:
            if len(self._routes) >= 1024:
                self._routes.clear()
            route = self._routes[key] = self.route_for(call, level)
        return route

    def route_for(self, call, level: str) -> "Route":
        try:
            q4, k4, v4, layout = self.kernel_inputs(call, None)
            plan = self.planned(q4, k4, v4, layout, level)
        except Decline as why:
            return Route(str(why))
        return Route(None, layout, None if layout == "HND" else (q4.shape, k4.shape, v4.shape),
                     plan.cfg.precision, (tuple(q4.shape), tuple(k4.shape), layout, q4.dtype),
                     plan.backend != "reference", plan.cfg.hadamard)

    def serve(self, call, forward, level, stock):
        """Our output in ComfyUI's format, or Decline. `stock` runs ComfyUI's own function."""
        if level == EXACT:
            raise Decline(EXACT)
        auto = split_rotation(level)[0] == AUTO
        decision = forward.auto if auto and not _inside_graph(call.q) else None
        if call.mask is not None or (auto and decision is None):
            return self.serve_unrouted(call, forward, level, stock, decision)
        route = self.route(call, level)
        if route.decline is not None:
            raise Decline(route.decline)
        start = self.auto_side(decision, route.sig) if decision is not None and route.on_gpu else None
        q, k, v = call.q, call.k, call.v
        if route.views is not None:
            q, k, v = q.view(route.views[0]), k.view(route.views[1]), v.view(route.views[2])
        out = sa2.sageattn(q, k, v, tensor_layout=route.layout, sm_scale=call.scale, precision=route.precision,
                           hadamard=route.hadamard, **self.kernel_kwargs)
        self.check_output(out, forward, level)
        if start is not None:
            self.record_sample(decision, route.sig, SAGE, start)
        return from_kernel_layout(out, route.layout, call.skip_output_reshape)

    def auto_side(self, decision, sig):
        """Sage Attention for this call (returns the start mark if it is timed), or raises the
        Decline that sends it to stock (TimedStock when that stock call is timed)."""
        side, timed = decision.route(sig)
        start = decision.clock.start() if timed else None
        if side == STOCK:
            if timed:
                raise TimedStock(AUTO_STOCK, decision, sig, start)
            raise Decline(AUTO_STOCK)
        return start

    def check_output(self, out, forward, level) -> None:
        if forward.deferred_check:
            forward.outputs.add(out)
        elif not bool(torch.isfinite(out.sum(dtype=torch.float32))):
            self.note(f"non-finite {level} output; such calls are recomputed with stock attention", logging.WARNING)
            raise Decline("non-finite quantized output")

    def serve_unrouted(self, call, forward, level, stock, decision):
        """Masked calls (key padding is read once per mask and evaluation), and `auto` where
        nothing can be timed (per-shape decisions, sageattn2.autotune)."""
        signature = None
        auto = split_rotation(level)[0] == AUTO
        if auto and decision is None and call.mask is None:
            signature = (call.q.shape, call.k.shape, call.v.shape, call.q.dtype, call.heads,
                         call.skip_reshape)
            if signature in self._auto_stock:
                raise Decline(self._auto_stock[signature])
        q4, k4, v4, layout = self.kernel_inputs(call, forward)
        plan = self.planned(q4, k4, v4, layout, level)
        run = lambda: sa2.sageattn(q4, k4, v4, tensor_layout=layout, sm_scale=call.scale,
                                   precision=plan.cfg.precision, hadamard=plan.cfg.hadamard, **self.kernel_kwargs)
        start = sig = None
        if decision is not None and plan.backend != "reference":
            sig = (tuple(q4.shape), tuple(k4.shape), layout, q4.dtype)
            start = self.auto_side(decision, sig)
        elif auto and plan.backend != "reference" and not autotune.quantized_pays_off(
            q4, k4, layout, False, run, stock, reference="comfyui"
        ):
            # Timed once per shape against the function ComfyUI gave us, then cached.
            reason = "auto: stock attention is faster for this shape"
            if signature is not None:
                self._auto_stock[signature] = reason
            raise Decline(reason)
        out = run()
        self.check_output(out, forward, level)
        if start is not None:
            self.record_sample(decision, sig, SAGE, start)
        return from_kernel_layout(out, layout, call.skip_output_reshape)


class Route:
    """How every call of one signature is served (PatchState.route)."""

    __slots__ = ("decline", "layout", "views", "precision", "sig", "on_gpu", "hadamard")

    def __init__(self, decline, layout="", views=None, precision="", sig=(), on_gpu=False, hadamard=False):
        self.decline = decline  # the reason these calls go to stock attention, or None
        self.layout = layout
        self.views = views  # (q, k, v) shapes for the kernel's NHD views; None: HND, as they are
        self.precision = precision
        self.sig = sig  # what `auto` times these calls under
        self.on_gpu = on_gpu  # a kernel (not the CPU reference emulation) serves them
        self.hadamard = hadamard  # Q and K rotated before quantizing


AUTO_STOCK = "auto: stock attention is faster here"


class TimedStock(Decline):
    """A stock call `auto` times: the override records its end mark after the stock function ran."""

    def __init__(self, reason: str, decision, sig, start):
        super().__init__(reason)
        self.decision, self.sig, self.start = decision, sig, start


def _inside_graph(q) -> bool:
    """torch.compile tracing or CUDA graph capture: nothing can be timed (per-shape rules then)."""
    return torch.compiler.is_compiling() or (getattr(q, "is_cuda", False) and torch.cuda.is_current_stream_capturing())


def _worth_timing(sig) -> bool:
    """Signatures too small to ever gain (autotune's size rule) run stock untimed."""
    q_shape, k_shape, layout = sig[0], sig[1], sig[2]
    n = 2 if layout == "HND" else 1
    return q_shape[n] * k_shape[n] >= autotune.MIN_SCORES_FOR_QUANTIZED


def install(model, state: PatchState):
    """A clone of `model` with `state`'s override, wrapper and callbacks. Replaces an
    earlier Sage Attention patch on the same model (keeping what that one chained to)."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    previous = to.get(OVERRIDE_KEY)
    if isinstance(previous, SageOverride):
        previous = previous.previous
    state.base = SageOverride(state, previous)
    to[OVERRIDE_KEY] = state.base
    for kind, fn in ((APPLY_MODEL, state.apply_model_wrapper), (SAMPLER_SAMPLE, state.sampler_sample_wrapper)):
        m.remove_wrappers_with_key(kind, HOOK_KEY)
        m.add_wrapper_with_key(kind, HOOK_KEY, fn)
    for kind, fn in ((ON_PRE_RUN, state.on_pre_run), (ON_CLEANUP, state.on_cleanup)):
        m.remove_callbacks_with_key(kind, HOOK_KEY)
        m.add_callback_with_key(kind, HOOK_KEY, fn)
    try:
        state.bind(m.get_model_object("model_sampling"))
    except AttributeError:
        state.bind(None)
    return m
