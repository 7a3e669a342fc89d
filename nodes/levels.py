"""Precision levels as the nodes see them: what users may type, how accurate and how cheap
each one is. No ComfyUI and no torch imports: the grammar and the calibration use this.
"""
from __future__ import annotations

EXACT = "exact"
AUTO = "auto"
# Same names and order as sageattn2.config.PRECISIONS (kept literal so this module stays
# importable without torch; test_nodes_schedule checks that the two agree).
LEVELS = (AUTO, "int8+fp8", "int8+fp16", "int4+fp8", "int4+fp16", EXACT)
QUANTIZED = ("int8+fp8", "int8+fp16", "int4+fp8", "int4+fp16")

# A quantized level (or `auto`) with Q and K rotated by a Hadamard transform before quantizing
# (sageattn(hadamard=True), docs/numerics.md §1.6) is written with this suffix: "int4+fp8+hadamard".
ROTATED = "+hadamard"
ROTATABLE = (AUTO,) + QUANTIZED
# Every level a schedule cell can run.
SCHEDULE_LEVELS = LEVELS + tuple(level + ROTATED for level in ROTATABLE)

# Least to most accurate. INT4 Q.K^T loses more than FP8 P.V does (the paper's 4-bit
# variants are its least accurate), so both INT4 levels sit below both INT8 levels.
# `auto` means int8+fp8 on GPUs with FP8 tensor cores, int8+fp16 elsewhere: ranked with
# the cheaper of the two so that a conservative choice never picks it over int8+fp16.
# A rotated level sits just above the same level unrotated: on data with outlier channels it
# is much more accurate, on data without them about as accurate.
_ACCURACY = ("int4+fp8", "int4+fp16", AUTO, "int8+fp8", "int8+fp16")
ACCURACY_RANK = {level: i for i, level in enumerate(
    [variant for level in _ACCURACY for variant in (level, level + ROTATED)] + [EXACT])}


def rotated(level: str, rotate: bool = True) -> str:
    """`level` with the rotation suffix when `rotate` (and it can be rotated)."""
    return level + ROTATED if rotate and level in ROTATABLE else level


def split_rotation(level: str) -> tuple[str, bool]:
    """"int4+fp8+hadamard" -> ("int4+fp8", True); "int8+fp8" -> ("int8+fp8", False)."""
    if level.endswith(ROTATED):
        return level[: -len(ROTATED)], True
    return level, False


def most_accurate(levels) -> str:
    return max(levels, key=ACCURACY_RANK.__getitem__)


def cost_order(capability: tuple[int, int] | None) -> tuple[str, ...]:
    """Levels that are distinct kernels on this GPU, cheapest first, `exact` last.

    Q.K^T and P.V cost the same number of MACs, so the time of a level is roughly
    1/rate(QK) + 1/rate(PV) with INT4 = 4x, INT8 = FP8 = 2x, FP16 = 1x: int4+fp8 (0.75) <
    int8+fp8 (1.0) < int4+fp16 (1.25) < int8+fp16 (1.5). Levels the GPU runs as another one
    (sageattn2/archs.py: no FP8 MMA -> fp16 PV, no INT4 MMA -> INT8 QK) are left out.
    `capability=None` (the CPU reference emulation) keeps all four.
    """
    arch = None
    if capability is not None:
        from ..sageattn2 import archs  # the arch table (imports torch: only when asked about a GPU)

        arch = archs.arch(*capability)
    has_fp8 = arch is None or arch.fp8_mma
    has_int4 = arch is None or arch.int4_mma
    order = [
        level
        for level in ("int4+fp8", "int8+fp8", "int4+fp16", "int8+fp16")
        if (has_fp8 or not level.endswith("fp8")) and (has_int4 or not level.startswith("int4"))
    ]
    return tuple(order) + (EXACT,)


def calibration_candidates(order: tuple[str, ...], rotation: bool) -> tuple[str, ...]:
    """The levels calibration measures, cheapest first: `order` (cost_order) with, when
    `rotation`, each quantized level followed by its rotated variant, which costs a little
    more (the quantizer rotates every Q and K row) and less than the next level."""
    return tuple(variant for level in order
                 for variant in ((level, level + ROTATED) if rotation and level in QUANTIZED else (level,)))
