"""Calibration mode: during the user's own sampling run, every attention call returns
stock attention (`func`, so the run's picture is the stock one) and, on the same live
q/k/v, each precision level that is a distinct kernel on this GPU runs too (and, with
`try_rotation`, each again with Q and K Hadamard-rotated); its error against that stock
output is recorded per (layer, step)."""
from __future__ import annotations

import logging
import math

import torch

from .. import sageattn2 as sa2
from .adapter import Decline, from_kernel_layout, parse_call
from .calibration import Recorder
from .layers import step_of
from .levels import EXACT, calibration_candidates, cost_order, split_rotation
from .override import PatchSettings, PatchState


def error_metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, sum|out - ref| / sum|ref|) over the whole tensor, in float32."""
    o, r = out.float().reshape(-1), ref.float().reshape(-1)
    denom = float(o.norm() * r.norm())
    if not math.isfinite(denom):
        return math.nan, math.nan
    cos = float(o @ r) / denom if denom > 0 else (1.0 if float((o - r).abs().max()) == 0 else 0.0)
    ref_l1 = float(r.abs().sum())
    diff_l1 = float((o - r).abs().sum())
    rel_l1 = diff_l1 / ref_l1 if ref_l1 > 0 else (0.0 if diff_l1 == 0 else math.inf)
    return cos, rel_l1


class CalibrationState(PatchState):
    reads_sigma = True  # start_forward counts sampling steps by sigma

    def __init__(self, settings: PatchSettings, node_id=None, try_rotation: bool = True):
        super().__init__(settings)
        self.try_rotation = try_rotation  # also measure every level with Q and K rotated
        self.auto = None  # calibration runs every candidate level: no `auto` decision
        self.label = self.label.replace("model #", "calibration #", 1)
        self.recorder = Recorder()
        self.node_id = node_id
        self.percent_to_sigma = None
        self._progress = None
        self._sample_sigmas = (None, [])

    def on_pre_run(self, patcher, *_) -> None:
        """A sampling run starts: record it from scratch (the last run is what counts)."""
        super().on_pre_run(patcher)
        self.recorder.reset()
        self._progress = None
        try:
            self.percent_to_sigma = patcher.get_model_object("model_sampling").percent_to_sigma
        except AttributeError:
            self.percent_to_sigma = None

    def start_forward(self, forward, to) -> None:
        ref = to.get("sample_sigmas")
        if ref is None or forward.sigma is None:
            return
        if ref is not self._sample_sigmas[0]:
            self._sample_sigmas = (ref, [float(s) for s in ref.reshape(-1).tolist()])
        sigmas = self._sample_sigmas[1]
        if self.recorder.sigmas != sigmas:
            self.recorder.sigmas = list(sigmas)
        forward.step = step_of(sigmas, forward.sigma)
        self._report_progress(forward.step + 1, max(len(sigmas) - 1, 1))

    def _report_progress(self, done: int, total: int) -> None:
        try:
            import comfy.utils
        except ImportError:
            return
        if self._progress is None:
            self._progress = comfy.utils.ProgressBar(total, node_id=self.node_id)
        if done > self._progress.current:
            self._progress.update_absolute(done, total)

    def handle(self, override, func, args, kwargs):
        try:
            call = parse_call(args, kwargs)
            forward = self.forward_state(call.transformer_options)
            _, pos = forward.position(call.transformer_options or {}, self.memory)
            q4, k4, v4, layout = self.kernel_inputs(call, forward)
        except Decline as why:
            return self.declined(override, func, args, kwargs, str(why))
        except Exception as e:
            self.note(f"cannot calibrate a call ({type(e).__name__}: {str(e)[:200]})", logging.WARNING)
            return self.declined(override, func, args, kwargs, f"error: {type(e).__name__}", log_it=False)
        exact = func(*args, **kwargs)
        step = forward.step if forward.step is not None else 0
        try:
            self.measure(call, pos, step, q4, k4, v4, layout, exact)
        except Exception as e:
            self.note(f"measurement failed ({type(e).__name__}: {str(e)[:200]})", logging.WARNING)
        return exact

    def measure(self, call, pos, step, q4, k4, v4, layout, exact) -> None:
        on_gpu = q4.is_cuda and self.settings.backend != "reference"
        order = calibration_candidates(cost_order(torch.cuda.get_device_capability(q4.device) if on_gpu else None),
                                       self.try_rotation)
        self.recorder.order = order
        measured = 0
        for level in order:
            if level == EXACT:
                continue
            try:
                self.planned(q4, k4, v4, layout, level)
            except Decline as why:
                self.note(f"cannot measure {level}: {why}", logging.WARNING)
                continue
            precision, rotate = split_rotation(level)
            out = sa2.sageattn(q4, k4, v4, tensor_layout=layout, sm_scale=call.scale, precision=precision,
                               hadamard=rotate, **self.settings.kernel_kwargs())
            cos, rel_l1 = error_metrics(from_kernel_layout(out, layout, call.skip_output_reshape), exact)
            self.recorder.add(pos.name, step, level, cos, rel_l1)
            measured += 1
        if measured:
            self.recorder.calls += 1
        self.stats[("calibrated", measured)] += 1
