"""The example workflows load in ComfyUI: known node types, consistent links, inputs and
outputs as the node definitions declare them, widget values that fit the widgets.

Core node definitions come from tests/comfy/core_nodes.json (dumped from a ComfyUI tree
by tests/comfy/dump_core_nodes.py; tests/comfy checks it against a live tree when
COMFYUI_PATH is set)."""
import json
from pathlib import Path

import pytest

from test_nodes_support import ROOT, pack

from sageattn2_pack.nodes.schedule import parse

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CORE = json.loads((ROOT / "tests" / "comfy" / "core_nodes.json").read_text())["nodes"]
OPTIONAL, SEED_CONTROL = 1, 2
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def our_schema(cls):
    spec = cls.INPUT_TYPES()
    inputs = []
    for section, flag in (("required", 0), ("optional", OPTIONAL)):
        for name, (kind, options) in spec.get(section, {}).items():
            t = "COMBO" if isinstance(kind, list) else kind
            inputs.append((name, t if t in WIDGET_TYPES else f"link:{t}", flag, kind, options))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return {"inputs": inputs, "outputs": list(zip(names, cls.RETURN_TYPES))}


OURS = {name: our_schema(cls) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


def schema_of(node_type):
    if node_type in OURS:
        return OURS[node_type]
    entry = CORE[node_type]
    return {"inputs": [(n, t, f, None, None) for n, t, f in entry["inputs"]],
            "outputs": [tuple(o) for o in entry["outputs"]]}


def test_there_are_the_promised_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert {"flux_patch", "wan21_t2v_patch", "wan22_t2v_patch", "sdxl_patch", "hunyuan_video_patch",
            "adaptive_schedule", "calibrate_then_adaptive"} <= names
    assert (ROOT / "workflows" / "flux_patch.png").stat().st_size > 10_000


def test_core_node_list_is_a_real_dump():
    assert len(CORE) > 400
    for name in ("KSampler", "UNETLoader", "DualCLIPLoader", "EmptySD3LatentImage", "ModelSamplingSD3",
                 "SaveAnimatedWEBP", "EmptyHunyuanLatentVideo", "Note"):
        assert name in CORE
    assert not set(OURS) & set(CORE), "our ids must not collide with core ids"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid(path: Path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and isinstance(wf["groups"], list) and isinstance(wf["extra"], dict)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    links = {l[0]: l for l in wf["links"]}
    assert len(links) == len(wf["links"]), "duplicate link ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(links, default=0)

    notes = [n for n in nodes.values() if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(n["widgets_values"][0].strip() for n in notes), "each workflow explains itself"

    for n in nodes.values():
        assert n["type"] in OURS or n["type"] in CORE, f"unknown node type {n['type']}"
        schema = schema_of(n["type"])
        link_inputs = [(name, t[5:], flag) for name, t, flag, _, _ in schema["inputs"] if t.startswith("link:")]
        assert [(i["name"], i["type"]) for i in n["inputs"]] == [(name, t) for name, t, _ in link_inputs], n["type"]
        for inp, (name, _, flag) in zip(n["inputs"], link_inputs):
            if not flag & OPTIONAL:
                assert inp["link"] is not None, f"{n['type']}.{name} is not connected"
        assert [(o["name"], o["type"]) for o in n["outputs"]] == list(schema["outputs"]), n["type"]
        assert [o.get("slot_index", i) for i, o in enumerate(n["outputs"])] == list(range(len(n["outputs"])))

        widgets = [(name, t, flag, kind, options) for name, t, flag, kind, options in schema["inputs"]
                   if not t.startswith("link:")]
        full = len(widgets) + sum(1 for w in widgets if w[2] & SEED_CONTROL)
        required = sum(1 + bool(w[2] & SEED_CONTROL) for w in widgets if not w[2] & OPTIONAL)
        values = n["widgets_values"]
        if n["type"] in OURS:
            assert len(values) == full, n["type"]
            check_our_widget_values(n["type"], widgets, values)
        else:
            assert required <= len(values) <= full, n["type"]

    # Links: both ends exist and agree with each other and with the node definitions.
    for link_id, src, src_slot, dst, dst_slot, t in wf["links"]:
        s, d = nodes[src], nodes[dst]
        assert link_id in s["outputs"][src_slot]["links"]
        assert s["outputs"][src_slot]["type"] == t == schema_of(s["type"])["outputs"][src_slot][1]
        assert d["inputs"][dst_slot]["link"] == link_id
        assert d["inputs"][dst_slot]["type"] == t
    for n in nodes.values():
        for i, inp in enumerate(n["inputs"]):
            if inp["link"] is not None:
                assert links[inp["link"]][3:5] == [n["id"], i]
        for slot, out in enumerate(n["outputs"]):
            for link_id in out["links"]:
                assert links[link_id][1:3] == [n["id"], slot]

    # Acyclic, and "order" is a valid execution order.
    order = {n["id"]: n["order"] for n in nodes.values()}
    assert sorted(order.values()) == list(range(len(nodes)))
    for _, src, _, dst, _, _ in wf["links"]:
        assert order[src] < order[dst]


def check_our_widget_values(node_type, widgets, values):
    for (name, t, _, kind, options), value in zip(widgets, values):
        where = f"{node_type}.{name}"
        if t == "COMBO":
            if name == "calibration_file":
                assert value == "none", "example workflows must not depend on a local file"
            else:
                assert value in kind, where
        elif t == "BOOLEAN":
            assert isinstance(value, bool), where
        elif t in ("INT", "FLOAT"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), where
            assert options["min"] <= value <= options["max"], where
            if t == "INT":
                assert isinstance(value, int), where
        elif t == "STRING":
            assert isinstance(value, str), where
            if name == "schedule":
                parse(value)
