"""Draw a UI-format ComfyUI workflow as a PNG (for the README), in the style of ComfyUI's
dark canvas: nodes with their slots and widget values, links coloured by type.

    python tools/render_workflow.py workflows/flux_patch.json workflows/flux_patch.png

Needs Pillow (with FreeType, as PyPI's wheels have). Not used by the tests.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflows"))
import build_workflows  # noqa: E402  (node schemas: widget names per node type)

SCALE = 2
TITLE_H, SLOT_H, WIDGET_H = 30, 22, 26
BG, GRID = (32, 32, 32), (40, 40, 40)
NODE_BG, NODE_TITLE, NODE_EDGE = (53, 53, 53), (34, 34, 34), (20, 20, 20)
OURS_TITLE = (36, 82, 96)
NOTE_BG, NOTE_TITLE = (102, 85, 51), (68, 51, 34)
TEXT, DIM = (230, 230, 230), (160, 160, 160)
WIDGET_BG = (34, 34, 34)
# Titles ComfyUI shows for core nodes whose display name differs from the type.
CORE_DISPLAY_NAMES = {
    "UNETLoader": "Load Diffusion Model", "VAELoader": "Load VAE", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "VAEDecode": "VAE Decode", "SaveImage": "Save Image", "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPLoader": "Load CLIP", "EmptyLatentImage": "Empty Latent Image", "PreviewImage": "Preview Image",
    "KSamplerAdvanced": "KSampler (Advanced)",
}
TYPE_COLORS = {
    "MODEL": (179, 157, 219), "CLIP": (255, 213, 0), "VAE": (255, 110, 110), "CONDITIONING": (255, 169, 49),
    "LATENT": (255, 156, 249), "IMAGE": (100, 181, 246), "SAGE_SCHEDULE": (77, 208, 180),
    "SAGE_CALIBRATION": (129, 199, 132), "STRING": (160, 200, 120),
}


def font(size):
    return ImageFont.load_default(size=size * SCALE)


def widget_names(schemas, node_type):
    schema = schemas.get(node_type)
    if not schema:
        return []
    names = []
    for name, t, flag in schema["inputs"]:
        if not t.startswith("link:"):
            names.append(name)
            if flag & build_workflows.SEED_CONTROL:
                names.append("control after generate")
    return names


def shown(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value).replace("\n", " | ")
    return text if len(text) <= 34 else text[:33] + "…"


def wrap(draw, text, f, width):
    lines = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=f) > width and line:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def render(workflow: dict, schemas: dict, ours: set, display_names: dict, margin=40) -> Image.Image:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    x0 = min(n["pos"][0] for n in nodes.values()) - margin
    y0 = min(n["pos"][1] for n in nodes.values()) - margin - TITLE_H
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + margin
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + margin
    s = SCALE

    def P(x, y):
        return ((x - x0) * s, (y - y0) * s)

    img = Image.new("RGB", (int((x1 - x0) * s), int((y1 - y0) * s)), BG)
    d = ImageDraw.Draw(img)
    for gx in range(0, img.width, 40 * s):
        d.line([(gx, 0), (gx, img.height)], fill=GRID, width=1)
    for gy in range(0, img.height, 40 * s):
        d.line([(0, gy), (img.width, gy)], fill=GRID, width=1)
    f_title, f_text, f_small = font(14), font(12), font(11)

    def in_slot(n, i):
        return n["pos"][0], n["pos"][1] + SLOT_H * i + SLOT_H / 2 + 4

    def out_slot(n, i):
        return n["pos"][0] + n["size"][0], n["pos"][1] + SLOT_H * i + SLOT_H / 2 + 4

    # Links first, under the nodes: cubic curves leaving and entering horizontally.
    for _, src, src_slot, dst, dst_slot, t in workflow["links"]:
        (ax, ay), (bx, by) = out_slot(nodes[src], src_slot), in_slot(nodes[dst], dst_slot)
        dx = max(abs(bx - ax) * 0.5, 60)
        pts = []
        for k in range(41):
            u = k / 40
            x = (1 - u) ** 3 * ax + 3 * (1 - u) ** 2 * u * (ax + dx) + 3 * (1 - u) * u ** 2 * (bx - dx) + u ** 3 * bx
            y = (1 - u) ** 3 * ay + 3 * (1 - u) ** 2 * u * ay + 3 * (1 - u) * u ** 2 * by + u ** 3 * by
            pts.append(P(x, y))
        d.line(pts, fill=TYPE_COLORS.get(t, DIM), width=3 * s, joint="curve")

    for n in sorted(nodes.values(), key=lambda n: n["order"]):
        x, y = n["pos"]
        w, h = n["size"]
        note = n["type"] == "Note"
        title_bg = NOTE_TITLE if note else OURS_TITLE if n["type"] in ours else NODE_TITLE
        body = NOTE_BG if note else NODE_BG
        d.rounded_rectangle([P(x, y - TITLE_H), P(x + w, y + h)], radius=8 * s, fill=body, outline=NODE_EDGE,
                            width=s)
        d.rounded_rectangle([P(x, y - TITLE_H), P(x + w, y)], radius=8 * s, fill=title_bg, corners=(True, True,
                                                                                                  False, False))
        d.ellipse([P(x + 10, y - TITLE_H / 2 - 5), P(x + 20, y - TITLE_H / 2 + 5)], fill=DIM)
        title = n.get("title") or display_names.get(n["type"], n["type"])
        d.text(P(x + 28, y - TITLE_H / 2), title, font=f_title, fill=TEXT, anchor="lm")
        if note:
            for i, line in enumerate(wrap(d, n["widgets_values"][0], f_text, (w - 20) * s)):
                d.text(P(x + 10, y + 10 + 17 * i), line, font=f_text, fill=TEXT)
            continue
        for i, inp in enumerate(n["inputs"]):
            cx, cy = in_slot(n, i)
            color = TYPE_COLORS.get(inp["type"], DIM)
            d.ellipse([P(cx - 5, cy - 5), P(cx + 5, cy + 5)], fill=color if inp["link"] else body, outline=color,
                      width=2 * s)
            d.text(P(cx + 12, cy), inp["name"], font=f_small, fill=TEXT if inp["link"] else DIM, anchor="lm")
        for i, out in enumerate(n["outputs"]):
            cx, cy = out_slot(n, i)
            color = TYPE_COLORS.get(out["type"], DIM)
            d.ellipse([P(cx - 5, cy - 5), P(cx + 5, cy + 5)], fill=color)
            d.text(P(cx - 12, cy), out["name"], font=f_small, fill=TEXT, anchor="rm")
        top = y + SLOT_H * max(len(n["inputs"]), len(n["outputs"])) + 8
        for i, (name, value) in enumerate(zip(widget_names(schemas, n["type"]), n["widgets_values"])):
            wy = top + WIDGET_H * i
            d.rounded_rectangle([P(x + 10, wy), P(x + w - 10, wy + WIDGET_H - 6)], radius=9 * s, fill=WIDGET_BG)
            d.text(P(x + 20, wy + (WIDGET_H - 6) / 2), name, font=f_small, fill=DIM, anchor="lm")
            d.text(P(x + w - 20, wy + (WIDGET_H - 6) / 2), shown(value), font=f_small, fill=TEXT, anchor="rm")
    return img


def main(src: str, dst: str) -> None:
    pack = build_workflows.load_pack()
    schemas = dict(json.loads(build_workflows.CORE.read_text())["nodes"])
    schemas.update(build_workflows.our_schemas(pack.NODE_CLASS_MAPPINGS))
    display_names = dict(CORE_DISPLAY_NAMES, **pack.NODE_DISPLAY_NAME_MAPPINGS)
    img = render(json.loads(Path(src).read_text()), schemas, set(pack.NODE_CLASS_MAPPINGS), display_names)
    img.save(dst, optimize=True)
    print(f"{dst}: {img.width}x{img.height}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
