"""Writes the example workflows (ComfyUI UI format, version 0.4) in this folder.

    python example_workflows/build_workflows.py

ComfyUI's template browser lists the .json files of a node pack's example_workflows/ under
the pack's folder name, shows each file name as the card's title and `<name>.jpg` beside
it as its picture (tools/render_workflow.py draws those): the file names are the titles.

Node inputs, widget order and outputs come from the node definitions themselves: ours from
the pack, core ones from tests/comfy/core_nodes.json (dumped from a ComfyUI tree), so slots
and widgets_values line up with what ComfyUI expects. Loader nodes carry the download of
each model file they name (properties.models), which the frontend offers when the file is
missing. tests/test_nodes_workflows.py checks the written files independently.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORE = ROOT / "tests" / "comfy" / "core_nodes.json"
OPTIONAL, SEED_CONTROL = 1, 2
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COL, GAP, TITLE_H = 380, 40, 30  # column pitch, vertical gap, title bar (canvas pixels)
TITLE_CHAR_W = 7.2  # mean advance of a title character (canvas pixels)
# The view a workflow opens with: the whole graph in a browser window of VIEW_W x VIEW_H
# screen pixels, its left edge right of the frontend's sidebar and below its menu bars.
VIEW_W, VIEW_H, VIEW_LEFT, VIEW_TOP = 1400, 800, 90, 120

# Where each model file of the examples is downloaded (the names and URLs of the model
# cards and of ComfyUI's own example workflows), by the folder of models/ it goes in.
HF = "https://huggingface.co/"
FLUX_TE = HF + "comfyanonymous/flux_text_encoders/resolve/main/"
WAN21 = HF + "Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
WAN22 = HF + "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/"
HUNYUAN = HF + "Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/"
MODELS = {
    "flux1-dev.safetensors": ("diffusion_models", HF + "Comfy-Org/flux1-dev/resolve/main/"),
    "clip_l.safetensors": ("text_encoders", FLUX_TE),
    "t5xxl_fp16.safetensors": ("text_encoders", FLUX_TE),
    "ae.safetensors": ("vae", HF + "Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/"),
    "wan2.1_t2v_1.3B_fp16.safetensors": ("diffusion_models", WAN21 + "diffusion_models/"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", WAN21 + "text_encoders/"),
    "wan_2.1_vae.safetensors": ("vae", WAN21 + "vae/"),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", WAN22 + "diffusion_models/"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", WAN22 + "diffusion_models/"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", HF + "stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"),
    "hunyuan_video_t2v_720p_bf16.safetensors": ("diffusion_models", HUNYUAN + "diffusion_models/"),
    "llava_llama3_fp8_scaled.safetensors": ("text_encoders", HUNYUAN + "text_encoders/"),
    "hunyuan_video_vae_bf16.safetensors": ("vae", HUNYUAN + "vae/"),
}


def load_pack():
    spec = importlib.util.spec_from_file_location("sageattn2_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["sageattn2_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def our_schemas(mappings, display_names) -> dict:
    """Same shape as core_nodes.json entries, plus the display name."""
    table = {}
    for name, cls in mappings.items():
        spec = cls.INPUT_TYPES()
        inputs = []
        for section, flag in (("required", 0), ("optional", OPTIONAL)):
            for input_name, (kind, options) in spec.get(section, {}).items():
                t = "COMBO" if isinstance(kind, list) else kind
                f = flag | (SEED_CONTROL if options.get("control_after_generate") else 0)
                inputs.append([input_name, t if t in WIDGET_TYPES else f"link:{t}", f])
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        table[name] = {"inputs": inputs, "outputs": [[n, t] for n, t in zip(names, cls.RETURN_TYPES)],
                       "display_name": display_names[name]}
    return table


class Node:
    def __init__(self, graph, node_id, type_, schema, x, y, widgets, title, width):
        self.graph, self.id, self.type, self.schema = graph, node_id, type_, schema
        self.links_in = {}
        self.links_out = {}
        self.widget_values = []
        names = []
        for name, t, flag in schema["inputs"]:
            if t.startswith("link:"):
                continue
            names.append(name)
            if name not in widgets:
                raise KeyError(f"{type_}: no value for widget {name!r}")
            self.widget_values.append(widgets[name])
            if flag & SEED_CONTROL:
                self.widget_values.append(widgets.get(f"{name}_control", "randomize"))
        extra = set(widgets) - set(names) - {f"{n}_control" for n in names}
        if extra:
            raise KeyError(f"{type_}: unknown widgets {sorted(extra)}")
        n_links = sum(t.startswith("link:") for _, t, _ in schema["inputs"])
        height = 30 + 22 * max(n_links, len(schema["outputs"])) + 26 * len(names)
        self.pos = [x, y]
        # Wide enough for the title the frontend draws (14 px Inter, after the title dot).
        shown_title = title or schema.get("display_name") or type_
        self.size = [max(width, round(TITLE_CHAR_W * len(shown_title)) + 50), height]
        self.title = title

    def out(self, name):
        return (self, name)


class Graph:
    """Nodes are stacked top to bottom in columns COL pixels apart."""

    def __init__(self, schemas):
        self.schemas = schemas
        self.nodes: list[Node] = []
        self.links = []
        self.bottom: dict[float, float] = {}

    def add(self, type_, col, title=None, node_width=315, skip=0, **widgets) -> Node:
        y = self.bottom.get(col, 0) + skip + TITLE_H
        node = Node(self, len(self.nodes) + 1, type_, self.schemas[type_], col * COL, y, widgets, title, node_width)
        self.bottom[col] = y + node.size[1] + GAP
        self.nodes.append(node)
        return node

    def note(self, text, col, node_width=400, height=180) -> Node:
        """Below everything, starting at column `col`."""
        y = max(self.bottom.values())
        for c in self.bottom:
            self.bottom[c] = y
        node = self.add("Note", col, text=text, node_width=node_width)
        node.size[1] = height
        return node

    def connect(self, src: Node, out_name: str, dst: Node, in_name: str) -> None:
        outputs = [n for n, _ in src.schema["outputs"]]
        slot = outputs.index(out_name)
        out_type = src.schema["outputs"][slot][1]
        link_inputs = [(n, t[5:]) for n, t, _ in dst.schema["inputs"] if t.startswith("link:")]
        in_slot = [n for n, _ in link_inputs].index(in_name)
        in_type = link_inputs[in_slot][1]
        if in_type != out_type:
            raise TypeError(f"{src.type}.{out_name} ({out_type}) -> {dst.type}.{in_name} ({in_type})")
        if in_name in dst.links_in:
            raise ValueError(f"{dst.type}.{in_name} is connected twice")
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, slot, dst.id, in_slot, out_type])
        dst.links_in[in_name] = link_id
        src.links_out.setdefault(slot, []).append(link_id)

    def _order(self) -> dict[int, int]:
        deps = {n.id: set() for n in self.nodes}
        for _, src, _, dst, _, _ in self.links:
            deps[dst].add(src)
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = sorted(i for i in deps if i not in done and deps[i] <= done)
            for i in ready:
                order[i] = len(order)
                done.add(i)
        return order

    def to_json(self) -> dict:
        order = self._order()
        nodes = []
        for n in self.nodes:
            inputs = [{"name": name, "type": t[5:], "link": n.links_in.get(name)}
                      for name, t, _ in n.schema["inputs"] if t.startswith("link:")]
            outputs = [{"name": name, "type": t, "links": n.links_out.get(i, []), "slot_index": i}
                       for i, (name, t) in enumerate(n.schema["outputs"])]
            properties = {} if n.type == "Note" else {"Node name for S&R": n.type}
            models = model_downloads(n.widget_values)
            if models:
                properties["models"] = models
            entry = {
                "id": n.id, "type": n.type, "pos": n.pos, "size": n.size, "flags": {}, "order": order[n.id],
                "mode": 0, "inputs": inputs, "outputs": outputs, "properties": properties,
                "widgets_values": n.widget_values,
            }
            if n.title:
                entry["title"] = n.title
            if n.type == "Note":
                entry["color"], entry["bgcolor"] = "#432", "#653"
            nodes.append(entry)
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes, "links": self.links,
            "groups": [], "config": {}, "extra": {"ds": self.view()}, "version": 0.4,
        }

    def view(self) -> dict:
        """Scale and offset (canvas units; screen = (canvas + offset) * scale) that show the
        whole graph at VIEW_LEFT, VIEW_TOP in a VIEW_W x VIEW_H window, at most 1:1."""
        x0 = min(n.pos[0] for n in self.nodes)
        y0 = min(n.pos[1] for n in self.nodes) - TITLE_H
        x1 = max(n.pos[0] + n.size[0] for n in self.nodes)
        y1 = max(n.pos[1] + n.size[1] for n in self.nodes)
        scale = min(1.0, (VIEW_W - VIEW_LEFT - 20) / (x1 - x0), (VIEW_H - VIEW_TOP - 20) / (y1 - y0))
        scale = round(scale, 3)
        return {"scale": scale, "offset": [round(VIEW_LEFT / scale - x0, 1), round(VIEW_TOP / scale - y0, 1)]}


def model_downloads(widget_values) -> list[dict]:
    """properties.models of a node: the download of each model file among its widget values."""
    models = []
    for value in widget_values:
        if isinstance(value, str) and value.endswith(".safetensors"):
            if value not in MODELS:
                raise KeyError(f"{value}: no download in MODELS")
            directory, url = MODELS[value]
            models.append({"name": value, "url": url + value, "directory": directory})
    return models


PATCH_DEFAULTS = dict(precision="auto", qk_granularity="per_thread", smooth_k=True, smooth_q="auto",
                      smooth_v=False, min_seq_len=1024, rotate_qk=False)
PROMPT = "a red fox reading a newspaper in a sunlit cafe, film photo, shallow depth of field"


def flux_loaders(g: Graph):
    """Flux.1-dev loaders in column 0: (unet, clip, vae)."""
    unet = g.add("UNETLoader", 0, unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", 0, clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                 type="flux", device="default")
    vae = g.add("VAELoader", 0, vae_name="ae.safetensors")
    return unet, clip, vae


def prompts(g: Graph, clip, col, positive: str, negative: str, negative_title="Negative"):
    pos = g.add("CLIPTextEncode", col, title="Prompt", node_width=340, text=positive)
    neg = g.add("CLIPTextEncode", col, title=negative_title, node_width=340, text=negative)
    for text in (pos, neg):
        g.connect(clip, "CLIP", text, "clip")
    return pos, neg


def guided(g: Graph, pos, col, guidance, skip=0):
    node = g.add("FluxGuidance", col, skip=skip, guidance=guidance)
    g.connect(pos, "CONDITIONING", node, "conditioning")
    return node


def ksampler(g, col, model, positive, negative, latent, steps=20, cfg=1.0, sampler="euler", scheduler="simple",
             seed=42, title=None, skip=0):
    k = g.add("KSampler", col, title=title, skip=skip, seed=seed, seed_control="fixed", steps=steps, cfg=cfg,
              sampler_name=sampler, scheduler=scheduler, denoise=1.0)
    g.connect(model[0], model[1], k, "model")
    g.connect(positive, "CONDITIONING", k, "positive")
    g.connect(negative, "CONDITIONING", k, "negative")
    g.connect(latent[0], latent[1], k, "latent_image")
    return k


def decode_save(g, col, k, vae, prefix, video_fps=None, title=None):
    """VAE Decode in column `col`, the saver next to it in col + 1 at the same height."""
    dec = g.add("VAEDecode", col)
    g.connect(k, "LATENT", dec, "samples")
    g.connect(vae, "VAE", dec, "vae")
    skip = max(dec.pos[1] - TITLE_H - g.bottom.get(col + 1, 0), 0)
    if video_fps is None:
        save = g.add("SaveImage", col + 1, title=title, skip=skip, filename_prefix=prefix)
    else:
        save = g.add("SaveAnimatedWEBP", col + 1, title=title, skip=skip, filename_prefix=prefix, fps=video_fps,
                     lossless=False, quality=90, method="default")
    g.connect(dec, "IMAGE", save, "images")
    return dec


def flux_patch(schemas):
    g = Graph(schemas)
    unet, clip, vae = flux_loaders(g)
    patch = g.add("SageAttn2Patch", 1, **PATCH_DEFAULTS)
    g.connect(unet, "MODEL", patch, "model")
    pos, neg = prompts(g, clip, 1, PROMPT, "", "Negative (unused at cfg 1)")
    guidance = guided(g, pos, 2, 3.5, skip=110)
    latent = g.add("EmptySD3LatentImage", 2, width=1024, height=1024, batch_size=1)
    k = ksampler(g, 3, (patch, "MODEL"), guidance, neg, (latent, "LATENT"))
    decode_save(g, 3, k, vae, "flux_sage")
    g.note("Flux.1-dev text-to-image with Patch Sage Attention between the model loader and the sampler.\n\n"
           "auto = the fastest accurate level for this GPU (int8+fp8 on RTX 40/50 and H100, int8+fp16 on RTX 30), "
           "stock attention where quantizing does not pay. Bypass the patch node (Ctrl+B) to compare with stock "
           "attention; other models in the graph are not affected.", 0, node_width=1075, height=110)
    return g


def wan21_t2v_patch(schemas):
    g = Graph(schemas)
    unet = g.add("UNETLoader", 0, unet_name="wan2.1_t2v_1.3B_fp16.safetensors", weight_dtype="default")
    clip = g.add("CLIPLoader", 0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan",
                 device="default")
    vae = g.add("VAELoader", 0, vae_name="wan_2.1_vae.safetensors")
    shift = g.add("ModelSamplingSD3", 1, shift=8.0)
    pos, neg = prompts(g, clip, 1, "a paper boat drifting down a rain-soaked street at dusk, neon reflections",
                       "blurry, static, low quality, watermark, text")
    patch = g.add("SageAttn2Patch", 2, **{**PATCH_DEFAULTS, "precision": "int8+fp8"})
    latent = g.add("EmptyHunyuanLatentVideo", 2, width=832, height=480, length=33, batch_size=1)
    g.connect(unet, "MODEL", shift, "model")
    g.connect(shift, "MODEL", patch, "model")
    k = ksampler(g, 3, (patch, "MODEL"), pos, neg, (latent, "LATENT"), steps=30, cfg=6.0, sampler="uni_pc")
    decode_save(g, 3, k, vae, "wan21_sage", video_fps=16.0)
    g.note("WAN 2.1 text-to-video (1.3B) with Patch Sage Attention at int8+fp8 (SageAttention2-8b).\n\n"
           "WAN's self-attention runs ~32k tokens at 480p x 81 frames, where quantized attention pays most; its "
           "cross-attention to the text goes through the same patch.", 0, node_width=1075, height=110)
    return g


def wan22_t2v_patch(schemas):
    g = Graph(schemas)
    patches = []
    for name, precision in (("high", "int8+fp16"), ("low", "int8+fp8")):
        unet = g.add("UNETLoader", 0, title=f"WAN 2.2 {name} noise",
                     unet_name=f"wan2.2_t2v_{name}_noise_14B_fp8_scaled.safetensors", weight_dtype="default")
        shift = g.add("ModelSamplingSD3", 1, skip=max(unet.pos[1] - TITLE_H - g.bottom.get(1, 0), 0), shift=8.0)
        patch = g.add("SageAttn2Patch", 2, title=f"Patch Sage Attention ({name} noise)",
                      skip=max(unet.pos[1] - TITLE_H - g.bottom.get(2, 0), 0),
                      **{**PATCH_DEFAULTS, "precision": precision})
        g.connect(unet, "MODEL", shift, "model")
        g.connect(shift, "MODEL", patch, "model")
        patches.append(patch)
    clip = g.add("CLIPLoader", 0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan",
                 device="default")
    vae = g.add("VAELoader", 0, vae_name="wan_2.1_vae.safetensors")
    pos, neg = prompts(g, clip, 1, "a hummingbird hovering at a red flower, slow motion, macro lens",
                       "blurry, static, low quality")
    latent = g.add("EmptyHunyuanLatentVideo", 3, width=640, height=640, length=81, batch_size=1)
    stages = []
    for i, (add_noise, start, end, leftover) in enumerate((("enable", 0, 10, "enable"),
                                                           ("disable", 10, 10000, "disable"))):
        k = g.add("KSamplerAdvanced", 3 + i, title=("High noise: steps 0-10", "Low noise: steps 10-20")[i],
                  add_noise=add_noise, noise_seed=42, noise_seed_control="fixed", steps=20, cfg=3.5,
                  sampler_name="euler", scheduler="simple", start_at_step=start, end_at_step=end,
                  return_with_leftover_noise=leftover)
        g.connect(patches[i], "MODEL", k, "model")
        g.connect(pos, "CONDITIONING", k, "positive")
        g.connect(neg, "CONDITIONING", k, "negative")
        stages.append(k)
    g.connect(latent, "LATENT", stages[0], "latent_image")
    g.connect(stages[0], "LATENT", stages[1], "latent_image")
    decode_save(g, 4, stages[1], vae, "wan22_sage", video_fps=16.0)
    g.note("WAN 2.2 14B text-to-video: two models, each with its own Patch Sage Attention.\n\n"
           "The high-noise model (steps 0-10, where the layout forms) runs the near-lossless int8+fp16, the "
           "low-noise model int8+fp8. Settings are per model: the two patches do not affect each other.",
           0, node_width=1075, height=110)
    return g


def sdxl_patch(schemas):
    g = Graph(schemas)
    ckpt = g.add("CheckpointLoaderSimple", 0, ckpt_name="sd_xl_base_1.0.safetensors")
    patch = g.add("SageAttn2Patch", 1, **PATCH_DEFAULTS)
    pos, neg = prompts(g, ckpt, 1, "isometric diorama of a lighthouse on a cliff, stormy sea, volumetric light",
                       "blurry, lowres, watermark")
    latent = g.add("EmptyLatentImage", 2, width=1024, height=1024, batch_size=1)
    g.connect(ckpt, "MODEL", patch, "model")
    k = ksampler(g, 3, (patch, "MODEL"), pos, neg, (latent, "LATENT"), steps=25, cfg=7.0, sampler="dpmpp_2m",
                 scheduler="karras")
    decode_save(g, 3, k, ckpt, "sdxl_sage")
    g.note("SDXL with Patch Sage Attention. The UNet's attention has head dim 64 and at most 4096 tokens "
           "(1024x1024); calls with fewer query tokens than min_seq_len (1024) stay on stock attention, where "
           "quantization would not pay.", 0, node_width=1075, height=90)
    return g


def hunyuan_video_patch(schemas):
    g = Graph(schemas)
    unet = g.add("UNETLoader", 0, unet_name="hunyuan_video_t2v_720p_bf16.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", 0, clip_name1="clip_l.safetensors",
                 clip_name2="llava_llama3_fp8_scaled.safetensors", type="hunyuan_video", device="default")
    vae = g.add("VAELoader", 0, vae_name="hunyuan_video_vae_bf16.safetensors")
    shift = g.add("ModelSamplingSD3", 1, shift=7.0)
    pos, neg = prompts(g, clip, 1, "a cat walking along a mossy stone wall in light rain, cinematic", "",
                       "Negative (unused at cfg 1)")
    patch = g.add("SageAttn2Patch", 2, **PATCH_DEFAULTS)
    guidance = guided(g, pos, 2, 6.0)
    latent = g.add("EmptyHunyuanLatentVideo", 2, width=848, height=480, length=73, batch_size=1)
    g.connect(unet, "MODEL", shift, "model")
    g.connect(shift, "MODEL", patch, "model")
    k = ksampler(g, 3, (patch, "MODEL"), guidance, neg, (latent, "LATENT"))
    decode_save(g, 3, k, vae, "hunyuan_video_sage", video_fps=24.0)
    g.note("HunyuanVideo text-to-video with Patch Sage Attention.\n\nWhen the prompt batch carries a text "
           "padding mask, HunyuanVideo passes it to every attention call: masked calls always run stock "
           "attention (never quantized with the mask dropped), and the log says so once.", 0,
           node_width=1075, height=110)
    return g


ADAPTIVE_SCHEDULE = """# sampling time (percent of the schedule) and layers; later lines win
0-20%: int8+fp16
20-90%: int4+fp8
90-100%: int8+fp8
double first 2, single last 2: int8+fp16"""


def adaptive_schedule(schemas):
    g = Graph(schemas)
    unet, clip, vae = flux_loaders(g)
    schedule = g.add("SageAttn2Schedule", 1, node_width=340, schedule=ADAPTIVE_SCHEDULE, calibration_file="none")
    pos, neg = prompts(g, clip, 1, PROMPT, "", "Negative (unused at cfg 1)")
    patch = g.add("SageAttn2Patch", 2, **{**PATCH_DEFAULTS, "precision": "int8+fp8"})
    g.connect(unet, "MODEL", patch, "model")
    g.connect(schedule, "SAGE_SCHEDULE", patch, "schedule")
    guidance = guided(g, pos, 2, 3.5)
    latent = g.add("EmptySD3LatentImage", 2, width=1024, height=1024, batch_size=1)
    k = ksampler(g, 3, (patch, "MODEL"), guidance, neg, (latent, "LATENT"))
    decode_save(g, 3, k, vae, "flux_sage_adaptive")
    g.note("Adaptive precision: the Schedule node sets a level per sampling time and layer; Patch Sage "
           "Attention applies it and uses its own precision where no rule matches.\n\nPercentages are model "
           "time (mapped to sigmas through the model, so they hold for any step count and for KSamplerAdvanced "
           "start/end). Flux has 'double' blocks 0-18 and 'single' blocks 0-37. Hopper runs int4 requests as "
           "int8.", 0, node_width=1075, height=130)
    return g


def calibrate_then_adaptive(schemas):
    g = Graph(schemas)
    unet, clip, vae = flux_loaders(g)
    calib = g.add("SageAttn2Calibrate", 1, qk_granularity="per_thread", smooth_k=True, smooth_q="auto",
                  smooth_v=False, try_rotation=True)
    g.connect(unet, "MODEL", calib, "model")
    pos, neg = prompts(g, clip, 1, PROMPT, "", "Negative (unused at cfg 1)")
    guidance = guided(g, pos, 2, 3.5)
    latent = g.add("EmptySD3LatentImage", 2, width=1024, height=1024, batch_size=1)
    k1 = ksampler(g, 3, (calib, "model"), guidance, neg, (latent, "LATENT"), title="1. Calibration run")
    decode_save(g, 3, k1, vae, "flux_stock_reference", title="Stock-attention result")
    result = g.add("SageAttn2CalibrationSchedule", 4, skip=300, min_cosine=0.999, max_rel_l1=0.0,
                   filename_prefix="flux_calibration")
    g.connect(calib, "calibration", result, "calibration")
    g.connect(k1, "LATENT", result, "samples")
    preview = g.add("PreviewImage", 4, title="Calibration heatmap")
    g.connect(result, "heatmap", preview, "images")
    patch = g.add("SageAttn2Patch", 5, **{**PATCH_DEFAULTS, "precision": "int8+fp8"})
    g.connect(unet, "MODEL", patch, "model")
    g.connect(result, "schedule", patch, "schedule")
    k2 = ksampler(g, 6, (patch, "MODEL"), guidance, neg, (latent, "LATENT"),
                  title="2. Sampling with the calibrated schedule")
    decode_save(g, 6, k2, vae, "flux_sage_calibrated")
    g.note("Calibrate, then sample adaptively, in one queue run.\n\n1. Sage Attention Calibrate puts the model in "
           "calibration mode: the first KSampler's attention runs stock, and every precision level (with and "
           "without outlier rotation) is measured on the same tensors per layer and step.\n2. Calibration to "
           "Schedule picks the cheapest level meeting min_cosine in each cell, draws the heatmap and saves output/sageattn2/flux_calibration_00001.json "
           "(load it later in a Sage Attention Schedule node's calibration_file: no calibration run needed).\n"
           "3. The second KSampler samples with the calibrated schedule. Calibrate with the resolution, steps and "
           "sampler you will use.", 0, node_width=1075, height=170)
    return g


# File name (the template browser's title) -> builder. No '-' or '_': the browser shows
# them as spaces in the card's description line.
WORKFLOWS = {
    "Flux with Sage Attention": flux_patch,
    "WAN 2.1 text to video with Sage Attention": wan21_t2v_patch,
    "WAN 2.2 with Sage Attention per model": wan22_t2v_patch,
    "SDXL with Sage Attention": sdxl_patch,
    "HunyuanVideo with Sage Attention": hunyuan_video_patch,
    "Flux with a Sage Attention schedule": adaptive_schedule,
    "Flux calibration then adaptive sampling": calibrate_then_adaptive,
}


def main():
    pack = load_pack()
    schemas = dict(json.loads(CORE.read_text())["nodes"])
    schemas.update(our_schemas(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS))
    for name, build in WORKFLOWS.items():
        data = build(schemas).to_json()
        (HERE / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"{name}.json: {len(data['nodes'])} nodes, {len(data['links'])} links")


if __name__ == "__main__":
    main()
