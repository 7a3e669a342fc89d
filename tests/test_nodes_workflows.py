"""The example workflows load in ComfyUI: known node types, consistent links, inputs and
outputs as the node definitions declare them, widget values that fit the widgets; and they
make a good first impression: a picture and a title for the template browser, the download
of every model they name, a view that shows the whole graph.

Core node definitions come from tests/comfy/core_nodes.json (dumped from a ComfyUI tree
by tests/comfy/dump_core_nodes.py; tests/comfy checks it against a live tree when
COMFYUI_PATH is set)."""
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

from test_nodes_support import ROOT, pack

from sageattn2_pack.nodes.schedule import parse

FOLDER = ROOT / "example_workflows"  # the folder name ComfyUI's template browser looks for
WORKFLOWS = sorted(FOLDER.glob("*.json"))
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


# Where ComfyUI looks for each loader's files (folder_paths' names).
MODEL_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
                 "VAELoader": "vae", "CheckpointLoaderSimple": "checkpoints"}


def test_there_are_the_promised_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert {"Flux with Sage Attention", "WAN 2.1 text to video with Sage Attention",
            "WAN 2.2 with Sage Attention per model", "SDXL with Sage Attention", "HunyuanVideo with Sage Attention",
            "Flux with a Sage Attention schedule", "Flux calibration then adaptive sampling"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_template_card_has_a_title_and_a_picture(path: Path):
    """The browser shows the file name as the card's title (and, with '-' and '_' turned into
    spaces, as its description) and `<name>.jpg` as its picture."""
    assert not set(path.stem) & set('-_<>:"/\\|?*'), "a title without '-', '_' or characters Windows forbids"
    data = path.with_suffix(".jpg").read_bytes()
    width, height = jpeg_size(data)
    assert width == height >= 400, "square, like the cards"
    assert len(data) > 15_000, "a picture, not a blank"


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from a JPEG's start-of-frame segment."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    i = 2
    while i + 9 < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    raise AssertionError("no start-of-frame segment")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_model_file_comes_with_its_download(path: Path):
    """properties.models on each loader: what the frontend's missing-models dialog offers."""
    wf = json.loads(path.read_text())
    loaders = 0
    for n in wf["nodes"]:
        files = [v for v in n["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        models = n["properties"].get("models", [])
        assert [m["name"] for m in models] == files, n["type"]
        for m in models:
            loaders += 1
            assert m["directory"] == MODEL_FOLDERS[n["type"]], (n["type"], m)
            url = urlparse(m["url"])
            assert url.scheme == "https" and url.netloc == "huggingface.co" and not url.query, m["url"]
            assert "/resolve/main/" in url.path and url.path.endswith("/" + m["name"]), m["url"]
    assert loaders >= 1


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_showing_the_whole_graph(path: Path):
    """extra.ds (screen = (canvas + offset) * scale): in a 1400 x 800 browser window the graph
    lies right of the frontend's 56-pixel sidebar and below its menu bars, and fits."""
    wf = json.loads(path.read_text())
    scale, (ox, oy) = wf["extra"]["ds"]["scale"], wf["extra"]["ds"]["offset"]
    left = min((n["pos"][0] + ox) * scale for n in wf["nodes"])
    top = min((n["pos"][1] - 30 + oy) * scale for n in wf["nodes"])
    right = max((n["pos"][0] + n["size"][0] + ox) * scale for n in wf["nodes"])
    bottom = max((n["pos"][1] + n["size"][1] + oy) * scale for n in wf["nodes"])
    assert 56 + 20 <= left and 100 <= top and right <= 1400 and bottom <= 800, (left, top, right, bottom)
    assert 0.4 <= scale <= 1


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
