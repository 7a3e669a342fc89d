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

# Least to most accurate. INT4 Q.K^T loses more than FP8 P.V does (the paper's 4-bit
# variants are its least accurate), so both INT4 levels sit below both INT8 levels.
# `auto` means int8+fp8 on GPUs with FP8 tensor cores, int8+fp16 elsewhere: ranked with
# the cheaper of the two so that a conservative choice never picks it over int8+fp16.
_ACCURACY = ("int4+fp8", "int4+fp16", AUTO, "int8+fp8", "int8+fp16", EXACT)
ACCURACY_RANK = {level: i for i, level in enumerate(_ACCURACY)}


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
