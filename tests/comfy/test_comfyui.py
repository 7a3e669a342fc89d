"""The nodes inside a real ComfyUI tree: tiny random WAN 2.1 and Flux models built through
ComfyUI's own classes, wrapped in ModelPatcher, sampled with comfy.sample.sample.

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfy -q
    COMFYUI_PATH=... SAGEATTN2_TEST_DEVICE=cuda python -m pytest tests/comfy -q   (real kernels)

On CPU the quantized path is the reference emulation of the kernels (backend="reference");
on CUDA it is the built kernels (backend="auto": a missing kernel makes these tests fail,
since every call must be served).
"""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comfy_env import ENV, comfyui_path, setup  # noqa: E402

if not comfyui_path():
    pytest.skip(f"{ENV} is not set (the path of a ComfyUI source tree)", allow_module_level=True)

DEVICE = torch.device(os.environ.get("SAGEATTN2_TEST_DEVICE", "cpu"))
setup(comfyui_path(), cpu=DEVICE.type == "cpu")

import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from test_nodes_support import load_pack  # noqa: E402

pack = load_pack()
from sageattn2_pack.nodes import calibration as cal  # noqa: E402
from sageattn2_pack.nodes import comfy_nodes  # noqa: E402
from sageattn2_pack.nodes import override as ov  # noqa: E402
from sageattn2_pack.nodes.layers import step_of  # noqa: E402
from sageattn2_pack.nodes.schedule import parse  # noqa: E402

BACKEND = "reference" if DEVICE.type == "cpu" else "auto"
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
# Accuracy of a whole (tiny) sampling run against the stock run, per level. The control
# (attention output zeroed) lands far below these, so they can fail.
MIN_COS = {"int8+fp16": 0.9995, "int8+fp8": 0.999, "int4+fp16": 0.995, "int4+fp8": 0.995}


def _fill(model, seed=0, std=0.1):
    """Random weights large enough that attention shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                base = 1.0 if ("norm" in name or "scale" in name) else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + base)


def _patcher(cfg):
    cfg.set_inference_dtype(DTYPE, None)
    model = cfg.get_model({}, device=DEVICE)
    _fill(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=DEVICE, offload_device=torch.device("cpu"))


class Tiny:
    def __init__(self, name, patcher, latent, positive, negative, layers):
        self.name, self.patcher, self.latent = name, patcher, latent
        self.positive, self.negative, self.layers = positive, negative, layers

    def sample(self, model, steps=4, sampler="euler", cfg=2.0, **kw):
        noise = torch.randn(self.latent.shape, generator=torch.Generator().manual_seed(1))
        return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", self.positive, self.negative,
                                   self.latent, seed=0, disable_pbar=True, **kw)


def tiny_wan():
    cfg = comfy.supported_models.WAN21_T2V({
        "image_model": "wan2.1", "model_type": "t2v", "dim": 256, "num_heads": 2, "ffn_dim": 512, "num_layers": 2,
        "in_dim": 16, "out_dim": 16, "text_dim": 64, "freq_dim": 256, "text_len": 32})
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 32, 64, generator=g)
    return Tiny("wan", _patcher(cfg), torch.zeros(1, 16, 3, 8, 8), [[ctx, {}]], [[ctx * 0, {}]],
                [f"double {i}" for i in range(2)])


def tiny_flux():
    cfg = comfy.supported_models.Flux({
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
        "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
        "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
        "txt_ids_dims": []})
    g = torch.Generator().manual_seed(3)
    extra = {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}
    ctx = torch.randn(1, 16, 64, generator=g)
    return Tiny("flux", _patcher(cfg), torch.zeros(1, 16, 16, 16), [[ctx, extra]], [[ctx * 0, extra]],
                ["double 0", "double 1", "single 0", "single 1"])


@pytest.fixture(scope="module", params=["wan", "flux"])
def tiny(request):
    return {"wan": tiny_wan, "flux": tiny_flux}[request.param]()


def patch(model, precision="int8+fp8", schedule=None, **kw):
    settings = ov.PatchSettings(precision=precision, min_seq_len=0, backend=BACKEND, **kw)
    state = ov.PatchState(settings, parse(schedule) if schedule else None)
    state.trace = []
    return ov.install(model, state), state


def cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


class Counter:
    """An override from another node: counts the calls, runs func."""

    def __init__(self):
        self.n = 0

    def __call__(self, func, *args, **kwargs):
        self.n += 1
        return func(*args, **kwargs)


def count_calls(tiny, **kw):
    m = tiny.patcher.clone()
    counter = Counter()
    m.model_options["transformer_options"]["optimized_attention_override"] = counter
    out = tiny.sample(m, **kw)
    return counter.n, out


def served(state):
    return {k[1]: n for k, n in state.stats.items() if isinstance(k, tuple) and k[0] == "sage"}


def declined(state):
    return {k[1]: n for k, n in state.stats.items() if isinstance(k, tuple) and k[0] == "declined"}


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8+fp16", "int8+fp8", "int4+fp8"])
def test_every_call_is_served_and_output_is_close_to_stock(tiny, precision):
    calls, _ = count_calls(tiny)
    assert calls >= 2 * len(tiny.layers)
    reference = tiny.sample(tiny.patcher.clone())
    patched, state = patch(tiny.patcher, precision)
    out = tiny.sample(patched)
    assert served(state) == {precision: calls} and not declined(state)
    c = cos(out, reference)
    print(f"{tiny.name} {precision} on {DEVICE}: cosine to stock run {c:.6f}")
    assert c > MIN_COS[precision]
    # Control: without attention the output is far off, so the threshold above can fail.
    zeroed = tiny.patcher.clone()
    zeroed.model_options["transformer_options"]["optimized_attention_override"] = lambda f, *a, **k: f(*a, **k) * 0
    assert cos(tiny.sample(zeroed), reference) < 0.99


def test_bypass_and_other_models_stay_stock(tiny):
    reference = tiny.sample(tiny.patcher.clone())
    patched, state = patch(tiny.patcher, "int4+fp8")
    tiny.sample(patched)
    assert "optimized_attention_override" not in tiny.patcher.model_options["transformer_options"]
    again = tiny.sample(tiny.patcher.clone())  # the node bypassed: the unpatched model
    assert torch.equal(again, reference) if DEVICE.type == "cpu" else cos(again, reference) > 0.99999


def test_two_models_with_different_settings_stay_independent():
    wan, flux = tiny_wan(), tiny_flux()
    n_wan, _ = count_calls(wan)
    n_flux, _ = count_calls(flux)
    a, sa = patch(wan.patcher, "int8+fp16")
    b, sb = patch(flux.patcher, "int4+fp8", schedule="single: exact")
    c, sc = patch(wan.patcher, "int8+fp8")  # the same model, patched twice with other settings
    for _ in range(2):
        wan.sample(a)
        flux.sample(b)
        wan.sample(c)
    assert served(sa) == {"int8+fp16": 2 * n_wan} and not declined(sa)
    assert served(sc) == {"int8+fp8": 2 * n_wan} and not declined(sc)
    single = sum(1 for _, name, _ in sb.trace if name.startswith("single"))
    assert single > 0 and declined(sb) == {"exact": single}
    assert served(sb) == {"int4+fp8": 2 * n_flux - single}


def test_previous_override_gets_the_declined_calls():
    flux = tiny_flux()
    base = flux.patcher.clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = Counter()
    patched, state = patch(base, "int8+fp8", schedule="single: exact")
    previous = patched.model_options["transformer_options"]["optimized_attention_override"].previous
    assert isinstance(previous, Counter)  # deep-copied by clone(), as ComfyUI does
    flux.sample(patched)
    assert previous.n == declined(state)["exact"] > 0
    assert served(state)["int8+fp8"] > 0


def test_later_override_is_kept_behind_ours():
    wan = tiny_wan()
    patched, state = patch(wan.patcher, "int8+fp8", schedule="double 1: exact")
    later = patched.clone()
    foreign = Counter()
    later.model_options["transformer_options"]["optimized_attention_override"] = foreign
    wan.sample(later)
    assert foreign.n == declined(state)["exact"] > 0
    assert served(state)["int8+fp8"] > 0


@pytest.mark.parametrize("sampler, steps, window", [
    ("euler", 8, None),
    ("heun", 4, None),  # two evaluations per step, the second between steps
    ("euler", 10, (3, 7)),  # KSamplerAdvanced-style start/end steps
])
def test_schedule_switches_levels_at_the_right_sigmas(tiny, sampler, steps, window):
    schedule = "0-30%: int8+fp16\n30-100%: int4+fp8\n80-100% double 0: exact"
    patched, state = patch(tiny.patcher, "int8+fp8", schedule=schedule)
    kw = {} if window is None else {"start_step": window[0], "last_step": window[1]}
    tiny.sample(patched, steps=steps, sampler=sampler, **kw)
    to_sigma = tiny.patcher.get_model_object("model_sampling").percent_to_sigma
    s30, s80 = to_sigma(0.3), to_sigma(0.8)
    assert state.trace
    for sigma, layer, level in state.trace:
        if sigma <= s80 and layer == "double 0":
            want = "exact"
        else:
            want = "int8+fp16" if sigma > s30 else "int4+fp8"
        assert level == want, (sigma, layer, level)
    levels = {level for _, _, level in state.trace}
    if window is None:  # the run crosses the 30% boundary
        assert {"int8+fp16", "int4+fp8"} <= levels
    sigmas = sorted({s for s, _, _ in state.trace}, reverse=True)
    if window is not None:  # only the window's sigmas were evaluated
        full = tiny.patcher.get_model_object("model_sampling")
        assert max(sigmas) < float(full.sigma_max) - 1e-3


def test_calibrate_then_schedule(tmp_path, monkeypatch):
    """Calibration run with ComfyUI's sampler, selection, file; then a run with the schedule
    follows the choice per (layer, step)."""
    monkeypatch.setenv(comfy_nodes.BACKEND_ENV, BACKEND)
    wan = tiny_wan()
    reference = wan.sample(wan.patcher.clone(), steps=5)
    model, calibration = comfy_nodes.SageAttn2Calibrate().patch(wan.patcher, "per_thread", True, "auto", False)
    out = wan.sample(model, steps=5)
    assert torch.equal(out, reference) if DEVICE.type == "cpu" else cos(out, reference) > 0.99999
    rec = calibration.recorder
    assert len(rec.sigmas) == 6 and set(rec.layers) == set(wan.layers)
    assert {s for _, s in rec.cells} == set(range(5))
    table = rec.table()
    target = sorted(per[rec.order[0]][0] for per in table.values())[len(table) // 2]
    monkeypatch.setattr(comfy_nodes, "output_directory", lambda: str(tmp_path))
    result = comfy_nodes.SageAttn2CalibrationSchedule().build(calibration, {"samples": out}, target, 0.0, "wan")
    schedule, heatmap, text = result["result"]
    assert heatmap.shape[0] == 1 and heatmap.shape[-1] == 3
    saved = json.loads((tmp_path / "sageattn2" / "wan_00001.json").read_text())
    assert saved["schedule"] == text
    choice = cal.select_levels(table, rec.order, target)
    assert len(set(choice.values())) >= 2

    (patched,) = comfy_nodes.SageAttn2Patch().patch(wan.patcher, "exact", "per_thread", True, "auto", False, 0,
                                                     schedule=schedule)
    state = patched.model_options["transformer_options"]["optimized_attention_override"].state
    state.trace = []
    wan.sample(patched, steps=5)
    for sigma, layer, level in state.trace:
        assert level == choice[(layer, step_of(rec.sigmas, sigma))], (sigma, layer)


def test_unmatched_schedule_rules_are_logged_with_their_line(caplog):
    """On Flux, rules naming layers it does not have are reported once after the first
    model evaluation; rules that match are not."""
    flux = tiny_flux()
    schedule = "blocks 999: int8+fp16\nsingle 50: int8+fp16\ninput 0-3: exact\ndouble 1: int4+fp8\nblocks last 1: exact"
    patched, state = patch(flux.patcher, "int8+fp8", schedule=schedule)
    with caplog.at_level(logging.INFO, logger="sageattn2.nodes"):
        flux.sample(patched, steps=3)
        flux.sample(patched, steps=3)
    found = [r.message for r in caplog.records if "matches no attention layer" in r.message]
    assert [m.split("schedule rule on ")[1].split(")")[0] + ")" for m in found] == [
        "line 1 ('blocks 999: int8+fp16')", "line 2 ('single 50: int8+fp16')", "line 3 ('input 0-3: exact')"]
    assert all("layers: double 0-1, single 0-1)" in m for m in found)
    # Rules that match do apply ('blocks last 1' is the more accurate candidate until the count is known).
    assert {level for _, layer, level in state.trace if layer == "double 1"} == {"int4+fp8", "exact"}
    assert {level for _, layer, level in state.trace if layer == "single 1"} == {"exact"}


def test_calibration_files_stay_in_comfyuis_output_folder(tmp_path, monkeypatch):
    """With ComfyUI's folder_paths (its own check and %date% fields) and ours (links)."""
    import time

    import folder_paths

    from sageattn2_pack.nodes.override import PatchSettings
    from sageattn2_pack.nodes.recording import CalibrationState

    output, outside = tmp_path / "output", tmp_path / "outside"
    output.mkdir(), outside.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    (output / "sageattn2").mkdir()
    os.symlink(outside, output / "sageattn2" / "link")
    calibration = CalibrationState(PatchSettings(backend=BACKEND))
    calibration.recorder.order = ("int8+fp8", "exact")
    calibration.recorder.add("double 0", 0, "int8+fp8", 0.9999, 0.01)
    calibration.recorder.calls = 1
    node = comfy_nodes.SageAttn2CalibrationSchedule()
    for prefix in ["../x", "../../x", str(outside / "x"), "link/x", "%year%/../../x", "sub/../link/y/x"]:
        assert "leads outside" in node.VALIDATE_INPUTS(filename_prefix=prefix), prefix
        with pytest.raises(ValueError, match="leads outside"):
            node.build(calibration, {"samples": None}, 0.999, 0.0, prefix)
    assert not list(outside.iterdir()) and sorted(os.listdir(tmp_path)) == ["output", "outside"]
    node.build(calibration, {"samples": None}, 0.999, 0.0, "%year%/run")
    node.build(calibration, {"samples": None}, 0.999, 0.0, "%year%/run")
    year = str(time.localtime().tm_year)
    assert sorted(os.listdir(output / "sageattn2" / year)) == ["run_00001.json", "run_00002.json"]
    (schedule,) = comfy_nodes.SageAttn2Schedule().build("", f"{year}/run_00002.json")
    assert schedule.text == "all: int8+fp8"


def run_comfyui_process(cmd, cwd):
    """Runs a script that imports ComfyUI's server side (nodes.py and its node packs). Those
    need packages the model tests do not (av, aiohttp, ...): where one is missing, the test
    is skipped with its name rather than failed; any other error fails it."""
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True)
    if proc.returncode != 0:
        missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", proc.stderr)
        if missing:
            pytest.skip(f"ComfyUI's server modules need {missing.group(1)!r}, not installed here")
        raise AssertionError(f"{cmd[1]} failed:\n{proc.stderr[-4000:]}")


def test_comfyui_loads_the_pack_and_the_workflow_nodes_exist(tmp_path):
    """ComfyUI's own loader imports the pack; every node type of the example workflows is
    registered; core_nodes.json (used by the CPU workflow tests) matches this tree."""
    repo = HERE.parents[1]
    script = f"""
import asyncio, json, sys
sys.path.insert(0, {str(HERE)!r})
from comfy_env import setup
setup({comfyui_path()!r}, cpu=True)
import nodes, dump_core_nodes
asyncio.run(nodes.init_builtin_extra_nodes())
ok = asyncio.run(nodes.load_custom_node({str(repo)!r}))
types = {{}}
for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
    try:
        types[name] = dump_core_nodes.describe(cls)
    except Exception:
        types[name] = None
json.dump({{"loaded": ok, "types": types}}, open({str(tmp_path / "types.json")!r}, "w"))
"""
    run_comfyui_process([sys.executable, "-c", script], tmp_path)
    live = json.loads((tmp_path / "types.json").read_text())
    assert live["loaded"] is True
    assert set(pack.NODE_CLASS_MAPPINGS) <= set(live["types"])
    core = json.loads((HERE / "core_nodes.json").read_text())["nodes"]
    for path in sorted((repo / "example_workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in ("Note", "MarkdownNote"):
                continue
            assert node["type"] in live["types"], (path.name, node["type"])
            if node["type"] not in pack.NODE_CLASS_MAPPINGS:
                assert live["types"][node["type"]] == core[node["type"]], (path.name, node["type"])


def test_model_sampling_changed_after_the_patch_moves_the_windows():
    """ModelSamplingSD3 after the patch node: the windows follow the new shift."""
    import comfy.model_sampling

    class FlowShift(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    wan = tiny_wan()  # shift 8 by default
    patched, state = patch(wan.patcher, "int8+fp8", schedule="0-50%: int8+fp16")
    shifted = patched.clone()
    sampling = FlowShift(wan.patcher.model.model_config)
    sampling.set_parameters(shift=1.0, multiplier=1000)
    shifted.add_object_patch("model_sampling", sampling)
    wan.sample(shifted, steps=6)
    half = sampling.percent_to_sigma(0.5)
    assert abs(half - 0.5) < 1e-6 and abs(wan.patcher.get_model_object("model_sampling").percent_to_sigma(0.5)
                                           - 0.5) > 0.3
    assert {lvl for _, _, lvl in state.trace} == {"int8+fp16", "int8+fp8"}
    for sigma, _, level in state.trace:
        assert level == ("int8+fp16" if sigma > half else "int8+fp8"), sigma


def test_comfyui_validates_every_example_workflow(tmp_path):
    """What 'Queue' does: the UI workflow in API form through execution.validate_prompt
    (node types, link types, required inputs, combo values, our VALIDATE_INPUTS)."""
    out = tmp_path / "validation.json"
    run_comfyui_process([sys.executable, str(HERE / "validate_workflows.py"), comfyui_path(), str(out)], tmp_path)
    results = json.loads(out.read_text())
    assert set(results) == {p.stem for p in (HERE.parents[1] / "example_workflows").glob("*.json")}
    for name, r in results.items():
        assert r["valid"] is True and not r["node_errors"], (name, r["error"], r["node_errors"])
        assert r["outputs"], name


def test_e2e_bench_forward_takes_the_samplers_path(monkeypatch):
    """bench/bench_e2e.py times apply_model as the sampler calls it: through the node's
    APPLY_MODEL wrapper (one deferred non-finite check per forward, auto's whole-model race),
    not the per-call fallback a bare apply_model call gets."""
    sys.path.insert(0, str(HERE.parents[1] / "bench"))
    import bench_e2e

    checks = []
    serve = ov.PatchState.serve
    monkeypatch.setattr(ov.PatchState, "serve", lambda self, call, forward, *a, **k: (
        checks.append(forward.deferred_check), serve(self, call, forward, *a, **k))[1])
    wan = tiny_wan()
    patched, state = patch(wan.patcher)
    g = torch.Generator().manual_seed(4)
    kw = {"x": torch.randn(1, 16, 3, 8, 8, generator=g).to(DEVICE, DTYPE), "t": torch.tensor([0.5], device=DEVICE),
          "c_crossattn": torch.randn(1, 32, 64, generator=g).to(DEVICE, DTYPE)}
    bench_e2e.forward_fn(wan.patcher.model, kw, extra_options=bench_e2e.sampler_options(patched))()
    assert len(checks) == 2 * len(wan.layers) and all(checks)
    checks.clear()
    bench_e2e.forward_fn(wan.patcher.model, kw, extra_options=dict(patched.model_options["transformer_options"]))()
    assert len(checks) == 2 * len(wan.layers) and not any(checks)  # the fallback this guards against
