"""The ComfyUI nodes (V1 API: NODE_CLASS_MAPPINGS). Thin: the logic lives in override.py,
schedule.py, calibration.py and recording.py. ComfyUI modules are imported lazily, so the
pack imports (and its tests run) without a ComfyUI tree.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import calibration as calibration_module
from .levels import LEVELS, ROTATED
from .override import GRANULARITIES, PatchSettings, PatchState, install
from .recording import CalibrationState
from .schedule import Schedule, ScheduleError, parse

CATEGORY = "model/patch"
SCHEDULE_TYPE = "SAGE_SCHEDULE"
CALIBRATION_TYPE = "SAGE_CALIBRATION"
CALIBRATION_DIR = "sageattn2"
NO_FILE = "none"
# Debugging aid: SAGEATTN2_NODE_BACKEND=reference runs the pure-PyTorch emulation of the
# kernels (any device, slow) instead of the CUDA kernels.
BACKEND_ENV = "SAGEATTN2_NODE_BACKEND"

EXAMPLE_SCHEDULE = """# later rules override earlier ones; unmatched cells use the patch node's precision
0-20%: int8+fp16
20-90%: int4+fp8
90-100%: int8+fp8
blocks first 2, last 2: int8+fp16"""
ROTATE_QK_TOOLTIP = ("Outlier rotation (Hadamard): rotate Q and K by a Hadamard transform of the head dim before "
                     "quantizing. Q.K^T is unchanged, and a few outlier channels no longer set every quantization "
                     "scale, which helps INT4 Q.K most. Costs a little quantizer time. Applies where no schedule "
                     "rule applies (a rule's level says '+hadamard' or not itself).")


def _backend() -> str:
    backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in ("auto", "cuda", "reference"):
        raise ValueError(f"{BACKEND_ENV} must be auto, cuda or reference, got {backend!r}")
    return backend


def output_directory() -> str:
    try:
        import folder_paths
    except ImportError:
        return os.path.join(os.getcwd(), "output")
    return folder_paths.get_output_directory()


def calibration_root() -> str:
    return os.path.abspath(os.path.join(output_directory(), CALIBRATION_DIR))


def calibration_files() -> list[str]:
    """Calibration files the Schedule node offers: regular files under output/sageattn2/
    (links leading elsewhere are left out: they could not be read)."""
    root = calibration_root()
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            name = os.path.relpath(os.path.join(dirpath, f), root)
            try:
                readable = f.endswith(".json") and os.path.isfile(calibration_module.inside(root, name, "file"))
            except ValueError:
                readable = False
            if readable:
                found.append(name.replace(os.sep, "/"))
    return sorted(found)


def check_prefix(prefix: str) -> str:
    """output/sageattn2/, after checking that `prefix` stays inside it (ValueError).
    Resolves links and creates nothing (ComfyUI's own check does neither)."""
    root = calibration_root()
    calibration_module.inside(root, os.path.dirname(os.path.normpath(prefix.strip() or ".")), "filename_prefix")
    return root


def calibration_save_path(prefix: str) -> str:
    """A new output/sageattn2/<prefix>_NNNNN.json; a prefix leading outside that folder is
    refused before anything is created."""
    root = check_prefix(prefix)
    try:
        import folder_paths
    except ImportError:
        return calibration_module.next_path(root, prefix)
    # ComfyUI's own check, and its %year%/%month%/... fields, as in its image savers.
    folder, name, *_ = folder_paths.get_save_image_path(prefix.strip() or "calibration", root)
    return calibration_module.next_path(root, os.path.relpath(os.path.join(folder, name), root))


def _smooth_q(choice: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[choice]


def _kernel_inputs(precision: bool) -> dict:
    inputs = {}
    if precision:
        inputs["precision"] = (list(LEVELS), {
            "default": "auto",
            "tooltip": "Precision level for every attention call (cells a schedule sets differently excepted). "
                       "auto: fastest accurate level for this GPU (stock attention where quantizing does not pay). "
                       "int8+fp8 is SageAttention2-8b, int4+fp8 the fastest and least accurate, int8+fp16 "
                       "near-lossless, exact = stock attention.",
        })
    inputs["qk_granularity"] = (list(GRANULARITIES), {
        "default": "per_thread",
        "tooltip": "How many query/key rows share one quantization scale: per_thread (finest, most accurate, "
                   "the default), per_warp, per_block (coarsest).",
    })
    inputs["smooth_k"] = ("BOOLEAN", {
        "default": True,
        "tooltip": "Subtract the mean of K before quantizing (removes the channel bias diffusion models have; "
                   "costs nothing at the output). Keep on.",
    })
    inputs["smooth_q"] = (["auto", "on", "off"], {
        "default": "auto",
        "tooltip": "Subtract per-block means of Q before quantizing. auto: on for INT4 Q.K, off for INT8.",
    })
    inputs["smooth_v"] = ("BOOLEAN", {
        "default": False,
        "tooltip": "Subtract the mean of V before the FP8 P.V product (helps when V has a large common offset).",
    })
    return inputs


class SageAttn2Patch:
    DESCRIPTION = (
        "Routes this model's attention to SageAttention2 (INT8/INT4 Q.K, FP8/FP16 P.V) through ComfyUI's "
        "per-model attention override. Returns a patched copy: other models, and this one with the node "
        "bypassed, keep stock attention. Calls it cannot serve (masks, unsupported head dims/dtypes/GPUs, "
        "short sequences, exact cells of a schedule) run stock attention or the override that was there "
        "before, with one log line per reason."
    )
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with Sage Attention; connect it to the sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to patch (the input model is not changed)."}),
                **_kernel_inputs(precision=True),
                "min_seq_len": ("INT", {
                    "default": 1024, "min": 0, "max": 1 << 20, "step": 64,
                    "tooltip": "Attention calls with fewer query tokens than this run stock attention "
                               "(quantization does not pay on short sequences). 0 = quantize everything.",
                }),
                "rotate_qk": ("BOOLEAN", {"default": False, "label_on": "outlier rotation (Hadamard)",
                                          "label_off": "off", "tooltip": ROTATE_QK_TOOLTIP}),
            },
            "optional": {
                "schedule": (SCHEDULE_TYPE, {
                    "tooltip": "Optional Sage Attention Schedule: a precision level per sampling time and layer. "
                               "Where no rule of it applies, 'precision' above runs.",
                }),
            },
        }

    def patch(self, model, precision, qk_granularity, smooth_k, smooth_q, smooth_v, min_seq_len, rotate_qk=False,
              schedule=None):
        settings = PatchSettings(precision=precision, granularity=qk_granularity, smooth_k=smooth_k,
                                 smooth_q=_smooth_q(smooth_q), smooth_v=smooth_v, min_seq_len=min_seq_len,
                                 backend=_backend(), rotate_qk=rotate_qk)
        return (install(model, PatchState(settings, schedule)),)


class SageAttn2Schedule:
    DESCRIPTION = (
        "A precision level per sampling time (percent of the schedule, mapped to the model's sigmas) and per "
        "layer, for Patch Sage Attention. One rule per line or ';'-separated: 'selector: level'. Later rules "
        "override earlier ones. Selectors: time windows '0-20%', layers 'double 0-3', 'single 10-37', "
        "'blocks first 2, last 2', 'input 0-3' (UNet), both ('0-10% double 0-3'), or 'all'."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SCHEDULE_TYPE,)
    OUTPUT_TOOLTIPS = ("The parsed schedule; connect it to Patch Sage Attention's 'schedule' input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "schedule": ("STRING", {
                    "multiline": True, "default": EXAMPLE_SCHEDULE,
                    "tooltip": "Rules 'selector: level', one per line or separated by ';'; '#' starts a comment. "
                               "Windows 'A-B%' (A <= p < B of the sampling schedule), layers 'double N', "
                               "'single N-M', 'blocks first N, last N', 'input/middle/output N'. Levels: "
                               + ", ".join(LEVELS) + f"; any but exact may end in '{ROTATED}' (Q and K "
                               "rotated before quantizing: outlier channels).",
                }),
                "calibration_file": ([NO_FILE] + calibration_files(), {
                    "default": NO_FILE,
                    "tooltip": "A file written by 'Sage Attention Calibration to Schedule' (output/sageattn2/). "
                               "Its rules come first; the text above is applied after them.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, schedule=None):
        if schedule is None:  # linked from another node: checked when the node runs
            return True
        try:
            parse(schedule)
        except ScheduleError as e:
            return str(e)
        return True

    def build(self, schedule, calibration_file):
        rules = Schedule(())
        if calibration_file != NO_FILE:
            path = calibration_module.inside(calibration_root(), calibration_file, "calibration_file")
            try:
                rules = parse(calibration_module.load_schedule_text(path), origin=calibration_file)
            except ScheduleError as e:
                raise ValueError(f"in {calibration_file}: {e}") from None
        return (rules + parse(schedule),)


class SageAttn2Calibrate:
    DESCRIPTION = (
        "Calibration mode. Sample with the MODEL this returns: every attention call runs stock attention (the "
        "result looks like the unpatched model's), and each precision level also runs on the same tensors to "
        "measure its error per layer and step (with try_rotation, each level also with Q and K rotated). Then "
        "connect the SAGE_CALIBRATION output and the sampler's LATENT to 'Sage Attention Calibration to "
        "Schedule'. Slow (every level runs once per call)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL", CALIBRATION_TYPE)
    RETURN_NAMES = ("model", "calibration")
    OUTPUT_TOOLTIPS = (
        "The model in calibration mode; sample with it once (any sampler, steps and resolution you will use).",
        "The recording; connect to 'Sage Attention Calibration to Schedule'.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to calibrate (not changed)."}),
                **_kernel_inputs(precision=False),
                "try_rotation": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Also measure every level with outlier rotation (Q and K Hadamard-rotated before "
                               "quantizing); the schedule then runs a rotated level in the cells where only the "
                               "rotation meets the targets. Doubles the calibration's extra work.",
                }),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def patch(self, model, qk_granularity, smooth_k, smooth_q, smooth_v, try_rotation=True, unique_id=None):
        settings = PatchSettings(precision="auto", granularity=qk_granularity, smooth_k=smooth_k,
                                 smooth_q=_smooth_q(smooth_q), smooth_v=smooth_v, min_seq_len=0,
                                 backend=_backend())
        state = CalibrationState(settings, node_id=unique_id, try_rotation=try_rotation)
        return (install(model, state), state)


class SageAttn2CalibrationSchedule:
    DESCRIPTION = (
        "Turns a calibration recording into a schedule: per layer and step, the cheapest precision level whose "
        "measured error meets the targets (cost order on this GPU, cheapest first: int4+fp8, int8+fp8, "
        "int4+fp16, int8+fp16, exact; levels the GPU does not have natively are skipped; a level with "
        "'+hadamard' rotation, where measured, right after the same level unrotated). Saves the result "
        "under output/sageattn2/ for the Schedule node's calibration_file, and draws a heatmap."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    OUTPUT_NODE = True
    RETURN_TYPES = (SCHEDULE_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("schedule", "heatmap", "schedule_text")
    OUTPUT_TOOLTIPS = (
        "The calibrated schedule; connect to Patch Sage Attention's 'schedule' input.",
        "Layers x steps coloured by the chosen level (a black corner: rotated), annotated with 1 - cosine.",
        "The schedule as text (the same rules the saved file holds).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "calibration": (CALIBRATION_TYPE, {"tooltip": "From 'Sage Attention Calibrate'."}),
                "samples": ("LATENT", {
                    "tooltip": "The LATENT output of the sampler that used the calibration model; it only makes "
                               "this node run after that sampling.",
                }),
                "min_cosine": ("FLOAT", {
                    "default": 0.999, "min": 0.9, "max": 1.0, "step": 0.0001,
                    "tooltip": "Target: cosine similarity to stock attention each chosen level must reach, in "
                               "its worst call of the cell.",
                }),
                "max_rel_l1": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                    "tooltip": "Optional second target: relative L1 error (sum|o - ref| / sum|ref|) at most this. "
                               "0 = not used.",
                }),
                "filename_prefix": ("STRING", {
                    "default": "calibration",
                    "tooltip": "File name under output/sageattn2/ (a number is appended).",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        """Refuses a prefix leading outside the output folder at queue time, before sampling."""
        if filename_prefix is None:  # linked from another node: checked when the node runs
            return True
        try:
            check_prefix(filename_prefix)
        except ValueError as e:
            return str(e)
        return True

    def build(self, calibration: CalibrationState, samples, min_cosine, max_rel_l1, filename_prefix):
        if calibration.recorder.calls == 0:
            raise ValueError(
                "Sage Attention calibration recorded nothing: sample with the MODEL output of 'Sage Attention "
                "Calibrate' and connect that sampler's LATENT to 'samples'. If it did sample, no attention call "
                "could be measured (the log says why, e.g. no kernels for this GPU)."
            )
        s = calibration.settings
        result = calibration_module.calibrate(
            calibration.recorder, calibration.percent_to_sigma, min_cosine, max_rel_l1 or None,
            extra={"settings": {"qk_granularity": s.granularity, "smooth_k": s.smooth_k,
                                "smooth_q": s.smooth_q, "smooth_v": s.smooth_v, "backend": s.backend,
                                "try_rotation": calibration.try_rotation}},
        )
        path = calibration_save_path(filename_prefix)
        calibration_module.save(result, path)
        heatmap = torch.from_numpy(calibration_module.render_heatmap(result).astype(np.float32) / 255.0)[None]
        return {"ui": {"text": [f"saved {path}\n{result.schedule}"]},
                "result": (parse(result.schedule), heatmap, result.schedule)}


NODE_CLASS_MAPPINGS = {
    "SageAttn2Patch": SageAttn2Patch,
    "SageAttn2Schedule": SageAttn2Schedule,
    "SageAttn2Calibrate": SageAttn2Calibrate,
    "SageAttn2CalibrationSchedule": SageAttn2CalibrationSchedule,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SageAttn2Patch": "Patch Sage Attention (SA2)",
    "SageAttn2Schedule": "Sage Attention Schedule (SA2)",
    "SageAttn2Calibrate": "Sage Attention Calibrate (SA2)",
    "SageAttn2CalibrationSchedule": "Sage Attention Calibration to Schedule (SA2)",
}
