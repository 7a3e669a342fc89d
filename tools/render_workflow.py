"""Draw the template-browser picture of each example workflow: `<name>.jpg` beside
`<name>.json` in example_workflows/, square like the browser's cards. It shows what a card
is too small to show as a graph: the workflow's title and its model path (loader ->
model patches -> sampler, one column per sampler) as ComfyUI-styled nodes with the one
setting that matters on each.

    python tools/render_workflow.py            (every workflow)

Needs Pillow (with FreeType, as PyPI's wheels have). Not used by the tests.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "example_workflows"))
import build_workflows  # noqa: E402  (node schemas: widget names per node type)

SIZE = 600
HEAD_H = 36  # node title bar
BG, GRID = (32, 32, 32), (40, 40, 40)
NODE_BG, NODE_TITLE, NODE_EDGE = (53, 53, 53), (34, 34, 34), (20, 20, 20)
OURS_TITLE = (36, 82, 96)
TEXT, DIM, ACCENT = (235, 235, 235), (175, 175, 175), (77, 208, 180)
SAMPLERS = {"KSampler", "KSamplerAdvanced"}
# Titles ComfyUI shows for core nodes whose display name differs from the type.
CORE_DISPLAY_NAMES = {
    "UNETLoader": "Load Diffusion Model", "CheckpointLoaderSimple": "Load Checkpoint",
    "KSamplerAdvanced": "KSampler (Advanced)",
}
TYPE_COLORS = {"MODEL": (179, 157, 219), "SAGE_SCHEDULE": (77, 208, 180), "SAGE_CALIBRATION": (129, 199, 132)}


def font(size):
    return ImageFont.load_default(size=size)


def widgets_of(node, schemas) -> dict:
    names = []
    for name, t, flag in schemas[node["type"]]["inputs"]:
        if not t.startswith("link:"):
            names.append(name)
            if flag & build_workflows.SEED_CONTROL:
                names.append(f"{name}_control")
    return dict(zip(names, node["widgets_values"]))


def setting(node, schemas) -> str:
    """The one line a thumbnail shows under a node's title."""
    w = widgets_of(node, schemas)
    kind = node["type"]
    if kind in ("UNETLoader", "CheckpointLoaderSimple"):
        return next(v for v in w.values() if isinstance(v, str) and v.endswith(".safetensors"))
    if kind == "ModelSamplingSD3":
        return f"shift {w['shift']:g}"
    if kind == "SageAttn2Patch":
        return f"precision: {w['precision']}"
    if kind == "SageAttn2Calibrate":
        return "measures every precision level"
    if kind == "KSampler":
        return f"{w['steps']} steps, {w['sampler_name']}"
    if kind == "KSamplerAdvanced":
        end = w["end_at_step"] if w["end_at_step"] < w["steps"] else w["steps"]
        return f"steps {w['start_at_step']}-{end} of {w['steps']}"
    return ""


def model_chains(workflow) -> list[list[dict]]:
    """Per sampler, the nodes its MODEL input comes through, loader first."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}
    chains = []
    for sampler in sorted((n for n in nodes.values() if n["type"] in SAMPLERS), key=lambda n: n["pos"]):
        chain, node = [sampler], sampler
        while True:
            model_in = next((i for i in node["inputs"] if i["name"] == "model" and i["link"] is not None), None)
            if model_in is None:
                break
            node = nodes[links[model_in["link"]][1]]
            chain.insert(0, node)
        chains.append(chain)
    return chains


def side_inputs(node, workflow) -> list[tuple[str, dict]]:
    """(type, source node) of the pack's own inputs fed into `node` besides the model."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}
    return [(i["type"], nodes[links[i["link"]][1]]) for i in node["inputs"]
            if i["type"] in TYPE_COLORS and i["type"] != "MODEL" and i["link"] is not None]


def wrap(draw, text, f, width) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=f) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def fit(draw, text, f, width) -> str:
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "…", font=f) > width:
        text = text[:-1]
    return text + "…"


def thumbnail(title: str, workflow: dict, schemas: dict, ours: set, display_names: dict) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BG)
    d = ImageDraw.Draw(img)
    for g in range(0, SIZE, 30):
        d.line([(g, 0), (g, SIZE)], fill=GRID)
        d.line([(0, g), (SIZE, g)], fill=GRID)

    f_head = font(42)
    y = 24
    for line in wrap(d, title, f_head, SIZE - 60)[:3]:
        d.text((30, y), line, font=f_head, fill=TEXT)
        y += 50
    top = y + 18

    chains = model_chains(workflow)
    gap_x = 24
    col_w = (SIZE - 60 - gap_x * (len(chains) - 1)) // len(chains)
    rows = max(len(c) for c in chains)
    pitch = (SIZE - top - 20) / rows
    box_h = min(pitch - 18, 104)
    wide = col_w > 300
    f_title, f_value, f_side = font(26 if wide else 21), font(23 if wide else 18), font(19 if wide else 15)
    for c, chain in enumerate(chains):
        x = 30 + c * (col_w + gap_x)
        for r, node in enumerate(chain):
            by = top + r * pitch
            if r:
                d.line([(x + col_w / 2, by - pitch + box_h), (x + col_w / 2, by)], fill=TYPE_COLORS["MODEL"],
                       width=5)
            head = NODE_TITLE if node["type"] not in ours else OURS_TITLE
            d.rounded_rectangle([x, by, x + col_w, by + box_h], radius=10, fill=NODE_BG, outline=NODE_EDGE, width=2)
            d.rounded_rectangle([x, by, x + col_w, by + HEAD_H], radius=10, fill=head,
                                corners=(True, True, False, False))
            name = (node.get("title") or display_names.get(node["type"], node["type"])).replace(" (SA2)", "")
            d.text((x + 12, by + HEAD_H / 2), fit(d, name, f_title, col_w - 24), font=f_title, fill=TEXT, anchor="lm")
            lines = [(setting(node, schemas), f_value, DIM)]
            lines += [(f"{kind.split('_', 1)[1].lower()}: {display_names.get(src['type'], src['type'])}".replace(
                " (SA2)", ""), f_side,
                       TYPE_COLORS[kind]) for kind, src in side_inputs(node, workflow)]
            ly = by + HEAD_H + 8
            for text, f, color in lines:
                if text and ly + f.size <= by + box_h:
                    d.text((x + 12, ly), fit(d, text, f, col_w - 24), font=f, fill=color)
                    ly += f.size + 6
    return img


def main() -> None:
    pack = build_workflows.load_pack()
    schemas = dict(json.loads(build_workflows.CORE.read_text())["nodes"])
    schemas.update(build_workflows.our_schemas(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS))
    display_names = dict(CORE_DISPLAY_NAMES, **pack.NODE_DISPLAY_NAME_MAPPINGS)
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        img = thumbnail(path.stem, json.loads(path.read_text()), schemas, set(pack.NODE_CLASS_MAPPINGS),
                        display_names)
        out = path.with_suffix(".jpg")
        img.save(out, quality=88, optimize=True)
        print(f"{out.name}: {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
