"""Calibration: cost orders, selection on error tables, windows per step, the generated
schedule (text -> parse -> same levels per cell), heatmap, file, and a recorded run."""
import json
import math
import random
import sys

import numpy as np
import pytest
import torch

from test_nodes_support import DiscreteSampling, FakePatcher, FlowSampling, TinyDiT, sample

from sageattn2_pack.nodes import calibration as cal
from sageattn2_pack.nodes import comfy_nodes, override as ov
from sageattn2_pack.nodes.layers import LayerPosition
from sageattn2_pack.nodes.levels import calibration_candidates, cost_order
from sageattn2_pack.nodes.recording import CalibrationState, error_metrics
from sageattn2_pack.nodes.schedule import parse

FULL = ("int4+fp8", "int8+fp8", "int4+fp16", "int8+fp16", "exact")
ROTATING = ("int4+fp8", "int4+fp8+hadamard", "int8+fp8", "int8+fp8+hadamard", "int4+fp16", "int4+fp16+hadamard",
            "int8+fp16", "int8+fp16+hadamard", "exact")


def position(name, block):
    kind, index = name.rsplit(" ", 1)
    if kind == "blocks":
        return LayerPosition(None, int(index), None, int(index), None)
    return LayerPosition(kind, int(index), None, block, None)


def test_cost_order_per_gpu():
    assert cost_order(None) == FULL
    assert cost_order((8, 9)) == FULL
    assert cost_order((8, 0)) == cost_order((8, 6)) == ("int4+fp16", "int8+fp16", "exact")  # no FP8 MMA
    # No native INT4 MMA (emulated on Hopper and on sm_120): calibration never picks INT4 there.
    assert cost_order((9, 0)) == cost_order((10, 0)) == cost_order((12, 0)) == ("int8+fp8", "int8+fp16", "exact")


def test_calibration_candidates_put_each_rotation_after_its_level():
    assert calibration_candidates(FULL, True) == ROTATING
    assert calibration_candidates(FULL, False) == FULL
    assert calibration_candidates(cost_order((9, 0)), True) == (
        "int8+fp8", "int8+fp8+hadamard", "int8+fp16", "int8+fp16+hadamard", "exact")


def test_select_cheapest_level_meeting_the_targets():
    table = {
        ("a", 0): {"int4+fp8": (0.990, 0.10), "int8+fp8": (0.9992, 0.03), "int8+fp16": (0.99995, 0.01)},
        ("a", 1): {"int4+fp8": (0.9995, 0.09), "int8+fp8": (0.9999, 0.02), "int8+fp16": (0.99999, 0.005)},
        ("b", 0): {"int4+fp8": (0.9, 0.3), "int8+fp8": (0.95, 0.2), "int8+fp16": (0.998, 0.05)},
        ("b", 1): {"int8+fp16": (0.99999, 0.001)},  # only one level measured
        ("c", 0): {"int4+fp8": (-1.0, math.inf), "int8+fp8": (0.9999, 0.01)},  # int4 produced NaN
    }
    order = FULL
    assert cal.select_levels(table, order, 0.999) == {
        ("a", 0): "int8+fp8", ("a", 1): "int4+fp8", ("b", 0): "exact", ("b", 1): "int8+fp16", ("c", 0): "int8+fp8"}
    assert cal.select_levels(table, order, 0.999, max_rel_l1=0.025)[("a", 1)] == "int8+fp8"
    assert cal.select_levels(table, order, 0.999, max_rel_l1=0.025)[("a", 0)] == "int8+fp16"
    # A GPU without INT4: int4 measurements are never chosen.
    assert cal.select_levels(table, ("int8+fp8", "int8+fp16", "exact"), 0.999)[("a", 1)] == "int8+fp8"


def test_select_takes_a_rotated_level_only_where_the_plain_one_misses():
    table = {
        ("a", 0): {"int4+fp8": (0.990, 0.10), "int4+fp8+hadamard": (0.9993, 0.04), "int8+fp8": (0.9995, 0.03)},
        ("a", 1): {"int4+fp8": (0.9995, 0.09), "int4+fp8+hadamard": (0.9997, 0.05), "int8+fp8": (0.9999, 0.02)},
        ("b", 0): {"int4+fp8": (0.90, 0.3), "int4+fp8+hadamard": (0.95, 0.2), "int8+fp8": (0.99, 0.1),
                   "int8+fp8+hadamard": (0.9991, 0.03), "int8+fp16": (0.9992, 0.02)},
        ("b", 1): {"int4+fp8": (0.90, 0.3), "int4+fp8+hadamard": (0.89, 0.3), "int8+fp8": (0.9990, 0.03),
                   "int8+fp8+hadamard": (0.9991, 0.03)},
    }
    assert cal.select_levels(table, ROTATING, 0.999) == {
        ("a", 0): "int4+fp8+hadamard",  # int4 misses, rotated int4 meets: cheaper than int8
        ("a", 1): "int4+fp8",  # both meet: no rotation
        ("b", 0): "int8+fp8+hadamard",
        ("b", 1): "int8+fp8"}
    assert cal.select_levels(table, FULL, 0.999)[("a", 0)] == "int8+fp8"  # rotations not offered
    assert cal.select_levels(table, ROTATING, 0.999, max_rel_l1=0.035)[("b", 0)] == "int8+fp8+hadamard"


def test_recorder_keeps_the_worst_call_per_cell():
    r = cal.Recorder()
    r.add("double 0", 0, "int8+fp8", 0.9999, 0.01)
    r.add("double 0", 0, "int8+fp8", 0.9990, 0.03)  # e.g. the cross attention of the same block
    r.add("double 0", 0, "int8+fp8", 0.9995, 0.02)
    r.add("single 1", 2, "int4+fp8", float("nan"), float("nan"))
    assert r.table() == {("double 0", 0): {"int8+fp8": (0.9990, 0.03)},
                         ("single 1", 2): {"int4+fp8": (-1.0, math.inf)}}
    assert r.cells[("double 0", 0)]["int8+fp8"][2] == 3
    assert list(r.layers) == ["double 0", "single 1"] and r.steps == 3


def test_error_metrics():
    ref = torch.randn(3, 50, 8, dtype=torch.float64)
    assert error_metrics(ref, ref) == pytest.approx((1.0, 0.0))
    noisy = ref + 0.01 * torch.randn_like(ref)
    c, l1 = error_metrics(noisy, ref)
    d = (noisy - ref).flatten()
    assert c == pytest.approx(float(noisy.flatten() @ ref.flatten() / noisy.norm() / ref.norm()), abs=1e-6)
    assert l1 == pytest.approx(float(d.abs().sum() / ref.abs().sum()), rel=1e-5)
    assert math.isnan(error_metrics(torch.full_like(ref, float("nan")), ref)[0])


@pytest.mark.parametrize("sampling, sigmas", [
    (FlowSampling(3.0), None),
    (FlowSampling(1.0), None),
    (DiscreteSampling(), [14.6146, 9.7, 6.1, 3.9, 2.4, 1.5, 0.9, 0.5, 0.25, 0.03, 0.0]),
])
def test_step_windows_contain_their_steps(sampling, sigmas):
    if sigmas is None:
        sigmas = [1.0] + [sampling.percent_to_sigma(p) for p in (0.13, 0.27, 0.4, 0.61, 0.8, 0.93)] + [0.0]
    sigmas = [float(torch.tensor(s)) for s in sigmas]  # as float32 tensors deliver them
    bounds = cal.step_boundaries(sampling.percent_to_sigma, sigmas)
    assert bounds[0] == 0.0 and bounds[-1] == 100.0 and all(a < b for a, b in zip(bounds, bounds[1:]))
    levels = ["int8+fp8", "int8+fp16"] * len(sigmas)
    text = "\n".join(f"{a:g}-{b:g}%: {levels[i]}" for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
    b = parse(text).bind(sampling.percent_to_sigma)
    p = LayerPosition(None, 0, None, 0, None)
    for i in range(len(sigmas) - 1):
        assert b.level(sigmas[i], p, "exact") == levels[i], i
        between = (sigmas[i] * 2 + sigmas[i + 1]) / 3  # a second-order sampler's extra evaluation
        assert b.level(between, p, "exact") == levels[i], i


def test_layers_text():
    assert cal.layers_text(["double 0", "double 1", "double 2", "double 5", "single 3", "single 4"]) == \
        "double 0-2, 5, single 3-4"
    assert cal.layers_text(["blocks 7"]) == "blocks 7"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_schedule_reproduces_every_choice(seed):
    rng = random.Random(seed)
    layers = [f"double {i}" for i in range(4)] + [f"single {i}" for i in range(6)] + ["blocks 11", "blocks 12"]
    steps = 8
    sampling = FlowSampling(3.0)
    sigmas = [1.0] + sorted((sampling.percent_to_sigma(rng.uniform(0.02, 0.98)) for _ in range(steps - 1)),
                            reverse=True) + [0.0]
    bounds = cal.step_boundaries(sampling.percent_to_sigma, sigmas)
    choice = {}
    for layer in layers:
        level = rng.choice(FULL)
        for step in range(steps):
            if rng.random() < 0.3:
                level = rng.choice(FULL)
            choice[(layer, step)] = level
    text = cal.schedule_text(choice, layers, bounds)
    b = parse(text).bind(sampling.percent_to_sigma)
    for (layer, step), level in choice.items():
        assert b.level(sigmas[step], position(layer, layers.index(layer)), "auto") == level, (layer, step, text)


def _result(choice, layers, steps):
    table = {cell: {lv: (0.9991, 0.02)} for cell, lv in choice.items() if lv != "exact"}
    table.update({cell: {"int8+fp16": (0.99, 0.1)} for cell, lv in choice.items() if lv == "exact"})
    bounds = [100.0 * i / steps for i in range(steps + 1)]
    return cal.CalibrationResult(layers, [1.0] * (steps + 1), bounds, FULL, 0.999, None, table, choice,
                                 cal.schedule_text(choice, layers, bounds))


def test_heatmap_colours_each_cell_by_its_level(monkeypatch):
    layers, steps = ["double 0", "double 1", "single 0"], 4
    choice = {(l, s): FULL[(i + s) % 5] for i, l in enumerate(layers) for s in range(steps)}
    del choice[("single 0", 3)]  # not measured
    res = _result(choice, layers, steps)

    def check(img):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        for r, layer in enumerate(layers):
            for c in range(steps):
                y, x = 40 + r * 16 + 14, 84 + c * 38 + 35  # a corner pixel, away from the text
                want = cal.LEVEL_COLORS.get(choice.get((layer, c)), cal.UNMEASURED)
                assert tuple(img[y, x]) == want, (layer, c)

    try:
        import PIL  # noqa: F401  (ComfyUI always has it; a bare CI machine may not)
        with_text = cal.render_heatmap(res)
        check(with_text)
    except ImportError:
        with_text = None
    monkeypatch.setitem(sys.modules, "PIL", None)  # numpy only
    plain = cal.render_heatmap(res)
    check(plain)
    if with_text is not None:
        assert plain.shape == with_text.shape and not np.array_equal(plain, with_text)  # the text


def test_file_round_trip(tmp_path):
    layers = ["double 0", "single 0"]
    res = _result({(l, s): "int8+fp8" if s else "int8+fp16" for l in layers for s in range(3)}, layers, 3)
    path = cal.next_path(str(tmp_path), "cal/run")
    assert path.endswith("cal/run_00001.json")
    cal.save(res, path)
    assert cal.next_path(str(tmp_path), "cal/run").endswith("run_00002.json")
    assert cal.load_schedule_text(path) == res.schedule
    data = json.loads(open(path).read())
    assert data["cells"]["double 0"][0]["level"] == "int8+fp16" and len(data["steps"]) == 4
    bad = tmp_path / "x.json"
    bad.write_text('{"schedule": "all: exact"}')
    with pytest.raises(ValueError, match="not a Sage Attention calibration file"):
        cal.load_schedule_text(str(bad))


def test_recorded_run_gives_a_schedule_that_the_patch_follows(tmp_path, monkeypatch):
    """Calibrate on a sampling run (reference kernels), pick levels, then patch with the
    schedule and check that each (layer, step) runs the chosen level."""
    dit = TinyDiT()
    ms = FlowSampling(3.0)
    base = FakePatcher(ms)
    sigmas = [1.0, 0.92, 0.8, 0.6, 0.35, 0.1, 0.0]
    reference = sample(base, dit, sigmas)

    state = CalibrationState(ov.PatchSettings(min_seq_len=0, backend="reference"))
    calibrating = ov.install(base, state)
    out = sample(calibrating, dit, sigmas)
    # Calibration returns stock attention: the run looks exactly like the unpatched one.
    assert all(torch.equal(a, b) for a, b in zip(out, reference))
    rec = state.recorder
    assert rec.calls == dit.attention_calls_per_forward() * 6
    assert rec.order == ROTATING and rec.sigmas == pytest.approx(sigmas)
    assert set(rec.cells) == {(f"{k} {i}", s) for k, n in dit.blocks for i in range(n) for s in range(6)}
    table = rec.table()
    assert all(set(per) == set(ROTATING[:-1]) for per in table.values())
    # int8+fp16 is the most accurate unrotated level everywhere.
    assert all(per["int8+fp16"][0] >= max(per[lv][0] for lv in FULL[:-1]) - 1e-9 for per in table.values())

    # A target between the measured int8+fp8 errors mixes int8+fp8 and more accurate levels.
    target = float(np.median([per["int8+fp8"][0] for per in table.values()]))
    result = cal.calibrate(rec, state.percent_to_sigma, target, None)
    assert len(set(result.choice.values())) >= 2
    for cell, level in result.choice.items():
        per = table[cell]
        ok = [lv for lv in ROTATING[:-1] if per[lv][0] >= target]
        assert level == (ok[0] if ok else "exact")

    patched_state = ov.PatchState(ov.PatchSettings(precision="int4+fp8", min_seq_len=0, backend="reference"),
                                  parse(result.schedule))
    patched_state.trace = []
    patched = ov.install(base, patched_state)
    sample(patched, dit, sigmas)
    step_of_sigma = {round(float(torch.tensor(s)), 6): i for i, s in enumerate(sigmas[:-1])}
    for sigma, name, level in patched_state.trace:
        assert level == result.choice[(name, step_of_sigma[round(sigma, 6)])], (sigma, name)

    # The node: file under the output dir, IMAGE tensor, schedule; the Schedule node loads the file.
    monkeypatch.setattr(comfy_nodes, "output_directory", lambda: str(tmp_path))
    node_out = comfy_nodes.SageAttn2CalibrationSchedule().build(state, {"samples": None}, target, 0.0, "cal")
    schedule, image, text = node_out["result"]
    assert text == result.schedule and schedule == parse(text)
    assert image.shape[0] == 1 and image.shape[3] == 3 and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert comfy_nodes.calibration_files() == ["cal_00001.json"]
    (loaded,) = comfy_nodes.SageAttn2Schedule().build("double 0: exact", "cal_00001.json")
    assert loaded == parse(text + "\ndouble 0: exact")


def test_calibration_result_node_explains_an_empty_recording():
    state = CalibrationState(ov.PatchSettings(backend="reference"))
    with pytest.raises(ValueError, match="recorded nothing"):
        comfy_nodes.SageAttn2CalibrationSchedule().build(state, {}, 0.999, 0.0, "cal")


def test_calibration_without_kernels_records_nothing_and_says_so(caplog):
    # backend "auto" on CPU: no level can run quantized, so nothing is measured.
    dit = TinyDiT(blocks=(("double", 1),))
    state = CalibrationState(ov.PatchSettings(min_seq_len=0, backend="auto"))
    out = sample(ov.install(FakePatcher(), state), dit, [1.0, 0.5, 0.0])
    assert all(torch.isfinite(o).all() for o in out)
    assert state.recorder.calls == 0 and not state.recorder.cells
    assert any("cannot measure int8+fp8" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="recorded nothing"):
        comfy_nodes.SageAttn2CalibrationSchedule().build(state, {}, 0.999, 0.0, "cal")


def _calibrated(dit, try_rotation, target):
    """Calibrate `dit` on a 3-step run (reference kernels); the result for `target`."""
    state = CalibrationState(ov.PatchSettings(min_seq_len=0, backend="reference"), try_rotation=try_rotation)
    sample(ov.install(FakePatcher(FlowSampling(3.0)), state), dit, [1.0, 0.6, 0.2, 0.0])
    return state, cal.calibrate(state.recorder, state.percent_to_sigma, target, None)


def test_calibration_rotates_where_outlier_channels_need_it(monkeypatch):
    """Q and K with outlier channels (two Q channels x10, two K channels x20 per head): unrotated
    INT8 misses cosine 0.997 in every cell (measured: 0.979-0.996) and rotated INT8 meets it
    (0.9978-0.9994), so every cell runs int8+fp8+hadamard, and the rotated measurement is the
    better one of its cell; without rotation candidates nothing quantized meets it. Plain data
    (int8+fp8 0.9994-0.9996) meets the target unrotated: no cell is rotated. The patch then runs
    the rotation."""
    target = 0.997
    state, outliers = _calibrated(TinyDiT(qk_outliers=True), True, target)
    assert set(outliers.choice.values()) == {"int8+fp8+hadamard"}
    for per in outliers.table.values():
        assert per["int8+fp8+hadamard"][0] >= target > per["int8+fp8"][0]
        assert per["int8+fp8+hadamard"][1] < per["int8+fp8"][1]
        assert per["int4+fp8+hadamard"][0] > per["int4+fp8"][0] + 0.1  # INT4 gains most, still short
    assert outliers.schedule == "all: int8+fp8+hadamard"
    _, without = _calibrated(TinyDiT(qk_outliers=True), False, target)
    assert set(without.choice.values()) == {"exact"}
    _, plain = _calibrated(TinyDiT(), True, target)
    assert set(plain.choice.values()) == {"int8+fp8"}

    calls = []
    real = ov.sa2.sageattn
    monkeypatch.setattr(ov.sa2, "sageattn", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    patched = ov.PatchState(ov.PatchSettings(precision="int4+fp8", min_seq_len=0, backend="reference"),
                            parse(outliers.schedule))
    sample(ov.install(FakePatcher(FlowSampling(3.0)), patched), TinyDiT(qk_outliers=True), [1.0, 0.6, 0.2, 0.0])
    assert calls and all(kw["precision"] == "int8+fp8" and kw["hadamard"] is True for kw in calls)
    assert patched.stats[("sage", "int8+fp8+hadamard")] == len(calls)


def test_heatmap_marks_rotated_cells():
    layers, steps = ["double 0", "single 0"], 2
    choice = {("double 0", 0): "int8+fp8+hadamard", ("double 0", 1): "int8+fp8",
              ("single 0", 0): "int4+fp8+hadamard", ("single 0", 1): "exact"}
    img = cal.render_heatmap(_result(choice, layers, steps))
    for r, layer in enumerate(layers):
        for c in range(steps):
            base, rotate = choice[(layer, c)].split("+hadamard")[0], choice[(layer, c)].endswith("+hadamard")
            y, x = 40 + r * 16, 84 + c * 38
            assert tuple(img[y + 14, x + 35]) == cal.LEVEL_COLORS[base], (layer, c)
            assert (tuple(img[y + 1, x + 35]) == cal.ROTATION_MARK) == rotate, (layer, c)
