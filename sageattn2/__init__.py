"""SageAttention2 with our own kernels: INT8/INT4 QK, FP8/FP16 PV, exact fallback.

Imports without a GPU and without ComfyUI; kernels load lazily on first use.
"""
from .api import exact_sdpa, sageattn, scaled_dot_product_attention, validate
from .config import PRECISIONS, QUANTIZED_PRECISIONS, AttnConfig, Family, Granularity, PVDType, QKDType
from .dispatch import Plan, plan

__all__ = [
    "sageattn",
    "scaled_dot_product_attention",
    "exact_sdpa",
    "validate",
    "plan",
    "Plan",
    "AttnConfig",
    "Family",
    "Granularity",
    "PVDType",
    "QKDType",
    "PRECISIONS",
    "QUANTIZED_PRECISIONS",
]
__version__ = "0.1.0"
