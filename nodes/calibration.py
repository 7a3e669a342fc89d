"""Calibration logic: error tables -> cheapest level per (layer, step) -> a schedule, a
heatmap and a file. Pure Python + numpy (PIL if present for text); no ComfyUI, no torch.

The recording itself (running every level on the live tensors during sampling) is in
recording.py; this module only sees numbers.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .layers import layers_text
from .levels import ACCURACY_RANK, EXACT, ROTATED, split_rotation

FILE_FORMAT = "sageattn2-calibration"
FILE_VERSION = 1
# Far above any real file (Flux, 50 steps, four levels measured: about 1.3 MB).
MAX_FILE_BYTES = 64 << 20


class Recorder:
    """Worst error per (layer, step, level) over every call recorded in one sampling run:
    cond and uncond batches, a layer's self and cross attention, a sampler's extra
    evaluations inside a step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.layers: dict[str, int] = {}  # name -> order of first appearance
        self.sigmas: list[float] = []  # the run's sample_sigmas
        self.cells: dict[tuple[str, int], dict[str, list]] = {}
        self.order: tuple[str, ...] = ()  # levels measured, cheapest first (set by the recorder's owner)
        self.calls = 0

    def add(self, layer: str, step: int, level: str, cos: float, rel_l1: float) -> None:
        if not (math.isfinite(cos) and math.isfinite(rel_l1)):
            cos, rel_l1 = -1.0, math.inf  # a non-finite output fails every target
        self.layers.setdefault(layer, len(self.layers))
        entry = self.cells.setdefault((layer, step), {}).setdefault(level, [cos, rel_l1, 0])
        entry[0] = min(entry[0], cos)
        entry[1] = max(entry[1], rel_l1)
        entry[2] += 1

    def table(self) -> dict[tuple[str, int], dict[str, tuple[float, float]]]:
        return {cell: {lv: (e[0], e[1]) for lv, e in per.items()} for cell, per in self.cells.items()}

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 1 + max((s for _, s in self.cells), default=-1))


def select_levels(table, order, min_cosine: float, max_rel_l1: float | None = None) -> dict:
    """Cheapest level of `order` (cheapest first) meeting the targets in each cell, else
    `exact`. Levels a cell has no measurement for are skipped. A rotated level follows its
    unrotated one in `order` (levels.calibration_candidates), so it is chosen only where the
    same level unrotated misses a target that the rotation meets."""
    choice = {}
    for cell, per_level in table.items():
        pick = EXACT
        for level in order:
            m = per_level.get(level)
            if level == EXACT or m is None:
                continue
            cos, rel_l1 = m
            if cos >= min_cosine and (max_rel_l1 is None or rel_l1 <= max_rel_l1):
                pick = level
                break
        choice[cell] = pick
    return choice


def sigma_to_percent(percent_to_sigma: Callable[[float], float], sigma: float) -> float:
    """Inverse of the model's percent_to_sigma (decreasing in percent), in percent 0..100."""
    lo, hi = 0.0, 1.0
    if sigma >= percent_to_sigma(1e-9):
        return 0.0
    if sigma <= 0.0:
        return 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return hi * 100.0


def step_boundaries(percent_to_sigma: Callable[[float], float], sigmas: list[float]) -> list[float]:
    """Percent boundaries b_0 = 0 < b_1 < ... < b_n = 100 such that the schedule window
    [b_i, b_i+1) holds step i's sigma and every evaluation a sampler makes before step i+1's
    sigma (which falls into window i+1): b_i+1 sits just below step i+1's own percent."""
    n = len(sigmas) - 1
    percents = [sigma_to_percent(percent_to_sigma, s) for s in sigmas]
    bounds = [0.0]
    for i in range(1, n):
        b = math.floor((percents[i] - 0.005) * 100) / 100
        if b <= percents[i - 1] or b <= bounds[-1]:
            b = (max(percents[i - 1], bounds[-1]) + percents[i]) / 2
        bounds.append(b)
    bounds.append(100.0)
    return bounds


def schedule_text(choice: dict, layers: list[str], bounds: list[float]) -> str:
    """Rules reproducing `choice` ((layer, step) -> level) with windows from `bounds`: the
    most common level for everything, then one rule per (window, level) listing layers."""
    if not choice:
        return ""
    counts = Counter(choice.values())
    default = max(counts, key=lambda lv: (counts[lv], ACCURACY_RANK[lv]))
    steps = len(bounds) - 1
    grouped: dict[tuple[int, int, str], list[str]] = {}
    for layer in layers:
        run_start, run_level = None, None
        for step in range(steps + 1):
            level = choice.get((layer, step), default) if step < steps else None
            if level != run_level:
                if run_level is not None and run_level != default:
                    grouped.setdefault((run_start, step, run_level), []).append(layer)
                run_start, run_level = step, level
    lines = [f"all: {default}"]
    for (a, b, level), names in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1], ACCURACY_RANK[kv[0][2]])):
        lines.append(f"{bounds[a]:g}-{bounds[b]:g}% {layers_text(names)}: {level}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Result object, file


@dataclass
class CalibrationResult:
    layers: list[str]
    sigmas: list[float]
    bounds: list[float]
    order: tuple[str, ...]
    min_cosine: float
    max_rel_l1: float | None
    table: dict
    choice: dict
    schedule: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        def num(x):
            return x if math.isfinite(x) else None

        cells = {}
        for layer in self.layers:
            row = []
            for step in range(len(self.bounds) - 1):
                per = self.table.get((layer, step))
                row.append(None if per is None else {
                    "level": self.choice[(layer, step)],
                    "measured": {lv: {"cosine": num(c), "rel_l1": num(l1)} for lv, (c, l1) in per.items()},
                })
            cells[layer] = row
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "schedule": self.schedule,
            "targets": {"min_cosine": self.min_cosine, "max_rel_l1": self.max_rel_l1},
            "cost_order": list(self.order),
            "steps": [{"sigma": num(s), "percent_start": b} for s, b in zip(self.sigmas, self.bounds)],
            "layers": self.layers,
            "cells": cells,
            **self.extra,
        }


def calibrate(recorder: Recorder, percent_to_sigma, min_cosine: float, max_rel_l1: float | None,
              extra: dict | None = None) -> CalibrationResult:
    table = recorder.table()
    steps = recorder.steps
    sigmas = list(recorder.sigmas) if len(recorder.sigmas) == steps + 1 else [float("nan")] * (steps + 1)
    if percent_to_sigma is not None and len(recorder.sigmas) == steps + 1:
        bounds = step_boundaries(percent_to_sigma, recorder.sigmas)
    else:  # no sigma mapping: split 0-100% evenly (only an approximation of model time)
        bounds = [round(100.0 * i / steps, 2) for i in range(steps + 1)]
    choice = select_levels(table, recorder.order, min_cosine, max_rel_l1)
    layers = sorted(recorder.layers, key=recorder.layers.get)
    return CalibrationResult(layers, sigmas, bounds, recorder.order, min_cosine, max_rel_l1, table, choice,
                             schedule_text(choice, layers, bounds), dict(extra or {}))


def inside(root: str, relative: str, what: str) -> str:
    """root/relative with '..' and symbolic links resolved. ValueError when that is not
    inside root (an absolute path, '..', a link to elsewhere): files are written only in
    ComfyUI's output folder, and read only from it."""
    if "\0" in relative:
        raise ValueError(f"{what} {relative!r} contains a NUL character")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, relative))
    try:
        ok = os.path.commonpath([os.path.normcase(real_root), os.path.normcase(target)]) == os.path.normcase(real_root)
    except ValueError:  # another drive (Windows)
        ok = False
    if not ok:
        raise ValueError(f"{what} {relative!r} leads outside {root}; use a plain name such as 'calibration' "
                         "or a subfolder such as 'flux/run1'")
    return target


def next_path(directory: str, prefix: str) -> str:
    """directory/prefix_00001.json, the first number not taken; the prefix may name
    subfolders (created), never a place outside `directory` (ValueError)."""
    sub, base = os.path.split(os.path.normpath(prefix.strip() or "."))
    folder = inside(directory, sub, "filename_prefix")
    if base in ("", ".", ".."):
        base = "calibration"
    os.makedirs(folder, exist_ok=True)
    taken = [int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(re.escape(base) + r"_(\d+)\.json", f))]
    return os.path.join(folder, f"{base}_{max(taken, default=0) + 1:05d}.json")


def save(result: CalibrationResult, path: str) -> str:
    """Writes a new file (never replaces one, never follows a link planted at `path`);
    strict JSON: unknown numbers are null."""
    text = json.dumps(result.to_json(), indent=1, allow_nan=False)
    with open(path, "x") as f:
        f.write(text)
    return path


def _read_regular_file(path: str, limit: int) -> bytes:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"larger than {limit / (1 << 20):g} MiB")
    return data


def load_schedule_text(path: str) -> str:
    """The schedule stored in a calibration file; ValueError if it is not one."""
    try:
        data = json.loads(_read_regular_file(path, MAX_FILE_BYTES))
    except (OSError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ValueError(f"cannot read calibration file {path}: {reason}") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a Sage Attention calibration file (no format {FILE_FORMAT!r})")
    text = data.get("schedule")
    if not isinstance(text, str):
        raise ValueError(f"calibration file {path} has no schedule text "
                         f"('schedule' is {type(text).__name__ if text is not None else 'missing'})")
    return text


# ---------------------------------------------------------------------------------------
# Heatmap

LEVEL_COLORS = {
    "int4+fp8": (230, 159, 0),
    "int8+fp8": (0, 158, 115),
    "int4+fp16": (240, 228, 66),
    "int8+fp16": (86, 180, 233),
    EXACT: (150, 150, 150),
}
UNMEASURED = (40, 40, 40)
BACKGROUND = (255, 255, 255)
ROTATION_MARK = (0, 0, 0)  # a square in the top right corner of a cell whose level is rotated
ROTATION_MARK_PX = 6


def _error_label(cos: float) -> str:
    err = 1.0 - cos
    if err <= 0:
        return "0"
    mant, exp = f"{err:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def render_heatmap(result: CalibrationResult, cell_w: int = 38, cell_h: int = 16) -> np.ndarray:
    """Layers (rows) x steps (columns), coloured by the chosen level (a rotated one with a
    black square in its top right corner), each measured cell annotated with 1 - cosine of
    its level. Returns (H, W, 3) uint8. Text needs PIL; without
    it the picture has the colours and the legend swatches only."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        Image = None
    layers, steps = result.layers, len(result.bounds) - 1
    left, top, legend_h = 84, 40, 22 * (len(LEVEL_COLORS) + 2) + 10
    width = max(left + cell_w * steps + 10, 360)
    height = top + cell_h * max(len(layers), 1) + legend_h
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)

    m = ROTATION_MARK_PX
    for r, layer in enumerate(layers):
        for c in range(steps):
            base, rotate = split_rotation(result.choice.get((layer, c), ""))
            y, x = top + r * cell_h, left + c * cell_w
            img[y : y + cell_h - 1, x : x + cell_w - 1] = LEVEL_COLORS.get(base, UNMEASURED)
            if rotate:
                img[y : y + m, x + cell_w - 1 - m : x + cell_w - 1] = ROTATION_MARK
    legend = list(LEVEL_COLORS.items()) + [("not measured", UNMEASURED)]
    y0 = top + cell_h * max(len(layers), 1) + 10
    for i, (_, color) in enumerate(legend):
        img[y0 + 22 * i : y0 + 22 * i + 16, 10:36] = color
    y_mark = y0 + 22 * len(legend)
    img[y_mark : y_mark + 16, 10:36] = LEVEL_COLORS["int8+fp8"]
    img[y_mark : y_mark + m, 36 - m : 36] = ROTATION_MARK
    if Image is None:
        return img

    pic = Image.fromarray(img)
    draw = ImageDraw.Draw(pic)
    font = ImageFont.load_default()
    title = f"cheapest level with cosine >= {result.min_cosine:g}"
    if result.max_rel_l1 is not None:
        title += f", rel L1 <= {result.max_rel_l1:g}"
    draw.text((6, 4), title + "  (cell text: 1 - cosine)", fill=(0, 0, 0), font=font)
    draw.text((left - 30, top - 16), "step", fill=(0, 0, 0), font=font)
    for c in range(steps):
        draw.text((left + c * cell_w + 2, top - 16), str(c), fill=(0, 0, 0), font=font)
    for r, layer in enumerate(layers):
        y = top + r * cell_h
        draw.text((4, y + 2), layer, fill=(0, 0, 0), font=font)
        for c in range(steps):
            per, level = result.table.get((layer, c)), result.choice.get((layer, c))
            if per is None or level not in per:
                continue
            dark = sum(LEVEL_COLORS[split_rotation(level)[0]]) < 300
            draw.text((left + c * cell_w + 2, y + 2), _error_label(per[level][0]),
                      fill=(255, 255, 255) if dark else (0, 0, 0), font=font)
    for i, (name, _) in enumerate(legend):
        draw.text((44, y0 + 22 * i + 2), name, fill=(0, 0, 0), font=font)
    draw.text((44, y_mark + 2), f"corner mark: {ROTATED[1:]} (Q, K rotated)", fill=(0, 0, 0), font=font)
    return np.asarray(pic, dtype=np.uint8).copy()
