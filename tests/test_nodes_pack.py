"""The pack as ComfyUI loads it: mappings, node definitions, the nodes' own functions."""
import subprocess
import sys

import pytest
import torch

from test_nodes_support import ROOT, STOCK, FakePatcher, TinyDiT, pack, sample

from sageattn2_pack.nodes import comfy_nodes
from sageattn2_pack.nodes.levels import LEVELS
from sageattn2_pack.nodes import override as ov
from sageattn2_pack.nodes.override import SageOverride
from sageattn2_pack.nodes.schedule import parse

LINK_TYPES = {"MODEL", "LATENT", "SAGE_SCHEDULE", "SAGE_CALIBRATION"}


def test_mappings_and_ids():
    ids = set(pack.NODE_CLASS_MAPPINGS)
    assert ids == {"SageAttn2Patch", "SageAttn2Schedule", "SageAttn2Calibrate", "SageAttn2CalibrationSchedule"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == ids
    assert len(set(pack.NODE_DISPLAY_NAME_MAPPINGS.values())) == len(ids)


@pytest.mark.parametrize("node_id", sorted(comfy_nodes.NODE_CLASS_MAPPINGS))
def test_node_definitions(node_id):
    cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
    assert cls.CATEGORY == "model/patch" and cls.DESCRIPTION
    spec = cls.INPUT_TYPES()
    inputs = {**spec["required"], **spec.get("optional", {})}
    for name, (kind, options) in inputs.items():
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, list):
            assert options["default"] in kind
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    fn = getattr(cls, cls.FUNCTION)
    params = fn.__code__.co_varnames[1 : fn.__code__.co_argcount]
    assert set(params) == set(inputs) | set(spec.get("hidden", {}))


def test_precision_combo_is_the_api_levels():
    spec = comfy_nodes.SageAttn2Patch.INPUT_TYPES()["required"]
    assert tuple(spec["precision"][0]) == LEVELS


def test_pack_imports_without_comfyui_and_without_a_gpu():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pk', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pk'] = m; spec.loader.exec_module(m)\n"
        "assert len(m.NODE_CLASS_MAPPINGS) == 4\n"
        "assert not any(k.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') for k in sys.modules)\n"
        "import torch; assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_patch_node_end_to_end(monkeypatch):
    monkeypatch.setenv(comfy_nodes.BACKEND_ENV, "reference")
    dit = TinyDiT()
    base = FakePatcher()
    (patched,) = comfy_nodes.SageAttn2Patch().patch(base, "int8+fp8", "per_warp", True, "on", False, 0,
                                                     schedule=parse("single: exact"))
    o = patched.model_options["transformer_options"]["optimized_attention_override"]
    assert isinstance(o, SageOverride)
    s = o.state.settings
    assert (s.precision, s.granularity, s.smooth_q, s.min_seq_len, s.backend) == \
        ("int8+fp8", "per_warp", True, 0, "reference")
    STOCK.calls.clear()
    sample(patched, dit, [1.0, 0.0])
    assert len(STOCK.calls) == 6 and o.state.stats[("sage", "int8+fp8")] == 4


def test_patch_node_rotation_reaches_the_kernels(monkeypatch):
    """rotate_qk: every call the node serves asks sageattn for hadamard=True, except where a
    schedule rule sets a level without '+hadamard'; on Q and K with outlier channels the
    sampled result is then closer to the stock one (one block, so errors do not compound:
    measured 0.043 against 0.114 relative L2)."""
    monkeypatch.setenv(comfy_nodes.BACKEND_ENV, "reference")
    calls = []
    real = ov.sa2.sageattn
    monkeypatch.setattr(ov.sa2, "sageattn", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    sigmas = [1.0, 0.5, 0.0]
    node = comfy_nodes.SageAttn2Patch()

    def run(dit, rotate_qk, schedule=None):
        calls.clear()
        (patched,) = node.patch(FakePatcher(), "int8+fp8", "per_thread", True, "auto", False, 0, rotate_qk, schedule)
        outs = sample(patched, dit, sigmas)
        state = patched.model_options["transformer_options"]["optimized_attention_override"].state
        return state, [kw["hadamard"] for kw in calls], outs

    dit = TinyDiT(qk_outliers=True)  # 5 blocks, 10 calls per evaluation
    state, rotations, _ = run(dit, True)
    assert state.settings.rotate_qk and state.settings.level == "int8+fp8+hadamard" and "+hadamard" in state.label
    assert rotations == [True] * 20 and state.stats[("sage", "int8+fp8+hadamard")] == 20
    state, rotations, _ = run(dit, False)
    assert rotations == [False] * 20 and state.stats[("sage", "int8+fp8")] == 20
    state, rotations, _ = run(dit, True, parse("single: int4+fp8; double 1: int8+fp16+hadamard"))
    assert sorted(rotations) == [False] * 12 + [True] * 8
    assert (state.stats[("sage", "int8+fp8+hadamard")], state.stats[("sage", "int4+fp8")],
            state.stats[("sage", "int8+fp16+hadamard")]) == (4, 12, 4)

    one_block = TinyDiT(blocks=(("double", 1),), qk_outliers=True)
    stock = sample(FakePatcher(), one_block, sigmas)
    error = lambda outs: max(float((o - s).norm() / s.norm()) for o, s in zip(outs, stock))
    rotated, plain = error(run(one_block, True)[2]), error(run(one_block, False)[2])
    assert rotated < 0.5 * plain, (rotated, plain)
    with pytest.raises(TypeError, match="rotate_qk must be a bool"):
        node.patch(FakePatcher(), "auto", "per_thread", True, "auto", False, 0, "False")


def test_patch_node_default_min_seq_len_keeps_short_calls_stock(monkeypatch):
    monkeypatch.setenv(comfy_nodes.BACKEND_ENV, "reference")
    dit = TinyDiT()  # 96 tokens
    (patched,) = comfy_nodes.SageAttn2Patch().patch(FakePatcher(), "auto", "per_thread", True, "auto", False, 1024)
    STOCK.calls.clear()
    sample(patched, dit, [1.0, 0.0])
    assert len(STOCK.calls) == dit.attention_calls_per_forward()


def test_bad_backend_env_is_an_error(monkeypatch):
    monkeypatch.setenv(comfy_nodes.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="SAGEATTN2_NODE_BACKEND"):
        comfy_nodes.SageAttn2Patch().patch(FakePatcher(), "auto", "per_thread", True, "auto", False, 0)


def test_schedule_node_validates_and_builds():
    node = comfy_nodes.SageAttn2Schedule
    assert node.VALIDATE_INPUTS(comfy_nodes.EXAMPLE_SCHEDULE) is True
    msg = node.VALIDATE_INPUTS("0-20%: int8+fp16\nsingle 3-: exact")
    assert isinstance(msg, str) and msg.startswith("schedule line 2")
    (s,) = node().build("0-20%: int8+fp16", comfy_nodes.NO_FILE)
    assert s == parse("0-20%: int8+fp16")


def test_schedule_node_reports_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_nodes, "output_directory", lambda: str(tmp_path))
    assert comfy_nodes.calibration_files() == []
    with pytest.raises(ValueError, match="cannot read calibration file"):
        comfy_nodes.SageAttn2Schedule().build("", "gone.json")


def test_calibrate_node_returns_model_and_recording(monkeypatch):
    monkeypatch.setenv(comfy_nodes.BACKEND_ENV, "reference")
    base = FakePatcher()
    model, calibration = comfy_nodes.SageAttn2Calibrate().patch(base, "per_thread", True, "auto", False,
                                                                  unique_id="7")
    assert model.model_options["transformer_options"]["optimized_attention_override"].state is calibration
    assert calibration.node_id == "7" and calibration.settings.min_seq_len == 0
    dit = TinyDiT(blocks=(("double", 1),))
    sample(model, dit, [1.0, 0.5, 0.0])
    assert calibration.recorder.calls == 4 and torch.isfinite(torch.tensor(calibration.recorder.sigmas)).all()
    assert calibration.try_rotation and "int8+fp8+hadamard" in calibration.recorder.order
    _, plain = comfy_nodes.SageAttn2Calibrate().patch(base, "per_thread", True, "auto", False, try_rotation=False)
    assert not plain.try_rotation
    sample(_, dit, [1.0, 0.0])
    assert not any(lv.endswith("+hadamard") for lv in plain.recorder.order)
