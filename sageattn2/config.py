"""Precision levels, quantization granularities and the tile layouts the kernels use.

This module is the contract between the CUDA kernels and the PyTorch reference: the
reference reproduces a kernel's quantization groups from the same `TileShape`, so both
must read it from here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

# ---------------------------------------------------------------------------------------
# Names users type


class QKDType(str, Enum):
    INT8 = "int8"
    INT4 = "int4"


class PVDType(str, Enum):
    FP16 = "fp16"  # P and V in the input dtype (fp16 or bf16), fp32 accumulation
    FP8 = "fp8"  # P and V in FP8 E4M3, two-level accumulation


class PVAccum(str, Enum):
    """Accumulator of the P.V MMA inside one key tile; across tiles O is always fp32."""

    FP32 = "fp32"  # fp32 accumulator (FP8 PV: a fresh one per tile, added into O)
    FP16 = "fp16"  # fp16 accumulator per tile, added into fp32 O ("SageAttention2++"): twice the
    #                MMA rate of fp32 accumulation on GeForce cards; FP8 PV, or FP16 PV on fp16 inputs


class Granularity(str, Enum):
    PER_THREAD = "per_thread"
    PER_WARP = "per_warp"
    PER_BLOCK = "per_block"


class Family(str, Enum):
    """Kernel family: which fragment layout the quantization groups follow."""

    MMA = "mma"  # mma.sync, sm80/86/89/120 (and sm90 through emulation)
    WGMMA = "wgmma"  # Hopper sm90a


# Precision levels offered to users (node combo, `precision=` argument).
PRECISIONS = ("auto", "int8+fp8", "int8+fp16", "int4+fp8", "int4+fp16", "exact")
QUANTIZED_PRECISIONS = ("int8+fp8", "int8+fp16", "int4+fp8", "int4+fp16")

# Largest E4M3 value: P is produced in [0, 448] and V is scaled so |V| <= 448.
FP8_MAX = 448.0
FP16_MAX = 65504.0
INT8_MAX = 127.0
INT4_MAX = 7.0
# Group absmax is clamped to this before computing a scale, so an all-zero group never
# divides by zero and its scale stays finite.
ABSMAX_EPS = 1e-6
# FP16 accumulation (numerics.md §2.6): operand scales that make an overflow of the fp16 tile
# accumulator impossible. FP8 PV keeps P in [0, 448] and scales V to |V_hat| <= 2, so a product
# is <= 7 * 2^7 and a k_tile-key sum <= 64 * 896 = 57344, exactly representable in fp16: no
# rounding of any partial sum can pass it. 16-bit PV cannot rescale V (it is read in place), so
# P is produced in [0, 2^-7]: 64 products of at most 65504 * 2^-7 stay below 32768.
FP8_V_MAX_FP16_ACC = 2.0
P_LOG2_MAX_FP16_ACC_16BIT = -7.0
# Keys per MMA k-step, after each of which an fp16 accumulator is rounded (numerics.md §2.6).
MMA_K_STEP = {PVDType.FP8: 32, PVDType.FP16: 16}

# Largest head dim any kernel serves (after padding); larger goes to exact attention.
MAX_HEAD_DIM = 256


def attention_shape_problem(batch: int, heads_q: int, heads_kv: int, n_q: int, n_k: int, head_dim: int) -> str | None:
    """What is wrong with these attention sizes, or None. The one rule every entry point
    (API, reference, exact) applies: an empty query side (batch, query heads or query tokens
    0) is a valid call with an empty result; keys, key/value heads and the head dim must
    not be empty where there are queries to serve."""
    if head_dim < 1:
        return "head dim must be at least 1"
    if heads_kv == 0 and heads_q > 0:
        return f"query heads ({heads_q}) must be a multiple of key/value heads (0): k and v need a head"
    if heads_kv > 0 and heads_q % heads_kv:
        return f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv}) for GQA"
    if n_k == 0 and not is_empty_query(batch, heads_q, n_q):
        return "k and v need at least one token (a softmax over no keys is undefined)"
    return None


def is_empty_query(batch: int, heads_q: int, n_q: int) -> bool:
    """No query row to compute: the result is an empty O (and lse)."""
    return batch == 0 or heads_q == 0 or n_q == 0


def fold_scale_sign(q, sm_scale: float):
    """(q, sm_scale) with a non-negative scale: softmax(s * Q K^T) = softmax(|s| * (-Q) K^T).

    The kernels (and the reference, which models them) take each row's max of the scaled
    scores assuming sm_scale >= 0 (P = exp2(c * (s - max s))); a negative scale would put P
    far above 1 (FP8 P saturates). Negation is exact in every float format and commutes with
    symmetric quantization and smoothing, and the lse (sm_scale * q . K) is unchanged."""
    return (-q, -sm_scale) if sm_scale < 0 else (q, sm_scale)


def parse_precision(precision: str) -> tuple[QKDType, PVDType]:
    """'int8+fp8' -> (QKDType.INT8, PVDType.FP8). Raises ValueError on anything else."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(
            f"precision must be one of {QUANTIZED_PRECISIONS} (or 'auto'/'exact' where accepted), "
            f"got {precision!r}"
        )
    qk, pv = precision.split("+")
    return QKDType(qk), PVDType(pv)


def padded_head_dim(head_dim: int, family: Family = Family.MMA) -> int:
    """Head dim the kernels compute with: the input is zero-padded to it during quantization.

    Zero channels change neither QK^T nor the first `head_dim` output channels.
    """
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    for d in NATIVE_HEAD_DIMS[Family(family)]:
        if head_dim <= d:
            return d
    raise ValueError(f"the {Family(family).value} kernels serve head dims up to "
                     f"{NATIVE_HEAD_DIMS[Family(family)][-1]}, got {head_dim}")


# Head dims each family instantiates; others are padded up to the next one.
NATIVE_HEAD_DIMS = {
    Family.MMA: (64, 128, 256),
    Family.WGMMA: (64, 128),
}


# ---------------------------------------------------------------------------------------
# Tile shapes: they define the quantization groups


@dataclass(frozen=True)
class TileShape:
    """What one CTA computes, and therefore how the quantization groups fall.

    cta_q       query rows per CTA
    warp_q      query rows owned by one warp (mma) or one warp of a warpgroup (wgmma: 16)
    k_tile      keys per main-loop iteration; also the two-level PV accumulation window
                and the block of the online-softmax running max
    q_mean_rows rows that share one Q-smoothing mean (q-bar) and hence one Delta-S row
    """

    cta_q: int
    warp_q: int
    k_tile: int
    q_mean_rows: int = 64


def tile_shape(family: Family, head_dim_padded: int) -> TileShape:
    """The single source of tile sizes. Kernels mirror these numbers in their traits.

    mma: 4 warps per CTA. At head dim <= 128 a warp owns 32 rows (two m16 tiles) so each
    K fragment loaded from shared memory feeds two MMAs; at 256 the fp32 O fragment
    (warp_q * d / 32 = 256 registers at 32 rows) does not fit, so a warp owns 16 rows.
    wgmma: two consumer warpgroups of 64 rows; a warp's slice of a wgmma is 16 rows.
    """
    family = Family(family)
    if family is Family.MMA:
        if head_dim_padded <= 128:
            return TileShape(cta_q=128, warp_q=32, k_tile=64)
        return TileShape(cta_q=64, warp_q=16, k_tile=64)
    if head_dim_padded <= 128:
        return TileShape(cta_q=128, warp_q=16, k_tile=128)
    raise ValueError(f"wgmma family has no tile for head dim {head_dim_padded}")


# ---------------------------------------------------------------------------------------
# Quantization groups (used by the reference and the tests)
#
# per_thread: the groups are exactly the rows/columns one lane's MMA accumulators cover.
#   Q: inside each warp_q-row slice, rows with the same (row % 8) share a scale:
#      {g, g+8, g+16, g+24} for warp_q 32, {g, g+8} for warp_q 16.
#   K: inside each k_tile-key tile, keys with the same ((key % 8) // 2) share a scale:
#      {8n + 2t, 8n + 2t + 1}, 16 keys per group for k_tile 64, 32 for k_tile 128.
# per_warp:  Q groups are warp_q-row slices, K groups are k_tile tiles.
# per_block: Q groups are cta_q-row blocks,  K groups are k_tile tiles.


def q_group_of_row(row: int, tile: TileShape, gran: Granularity) -> int:
    """Index of the Q scale that row `row` (0-based within one batch-head) uses."""
    gran = Granularity(gran)
    if gran is Granularity.PER_BLOCK:
        return row // tile.cta_q
    if gran is Granularity.PER_WARP:
        return row // tile.warp_q
    return (row // tile.warp_q) * 8 + row % 8


def k_group_of_key(key: int, tile: TileShape, gran: Granularity) -> int:
    """Index of the K scale that key `key` uses."""
    gran = Granularity(gran)
    if gran is Granularity.PER_THREAD:
        return (key // tile.k_tile) * 4 + (key % 8) // 2
    return key // tile.k_tile


def num_q_groups(n_q: int, tile: TileShape, gran: Granularity) -> int:
    """Number of Q scales per batch-head (rows padded up to whole CTAs)."""
    blocks = -(-n_q // tile.cta_q)
    gran = Granularity(gran)
    if gran is Granularity.PER_BLOCK:
        return blocks
    per_block = tile.cta_q // tile.warp_q
    return blocks * per_block * (8 if gran is Granularity.PER_THREAD else 1)


def num_k_groups(n_k: int, tile: TileShape, gran: Granularity) -> int:
    """Number of K scales per batch-head (keys padded up to whole k_tiles)."""
    tiles = -(-n_k // tile.k_tile)
    return tiles * (4 if Granularity(gran) is Granularity.PER_THREAD else 1)


# ---------------------------------------------------------------------------------------
# One resolved configuration


@dataclass(frozen=True)
class AttnConfig:
    """Everything that selects a kernel and its numerics (not the shapes)."""

    qk_dtype: QKDType = QKDType.INT8
    pv_dtype: PVDType = PVDType.FP8
    granularity: Granularity = Granularity.PER_THREAD
    smooth_k: bool = True
    smooth_q: bool = False
    smooth_v: bool = False
    family: Family = Family.MMA
    pv_accum: PVAccum = PVAccum.FP32
    # Q and K rotated by an orthonormal Walsh-Hadamard transform of the (padded) head dim before
    # quantization (numerics.md §1.6): Q K^T is unchanged, outlier channels are spread over all
    # channels. Served by both families' quantizers and the reference; `sageattn(hadamard=True)`.
    hadamard: bool = False

    def __post_init__(self):
        # Accept plain strings and normalise them to the enums, with a clear error.
        for name, enum in (
            ("qk_dtype", QKDType),
            ("pv_dtype", PVDType),
            ("granularity", Granularity),
            ("family", Family),
            ("pv_accum", PVAccum),
        ):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = [e.value for e in enum]
                raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None
        if self.pv_accum is PVAccum.FP16 and self.family is not Family.MMA:
            raise ValueError("pv_accum='fp16' exists only in the mma family")

    @property
    def precision(self) -> str:
        return f"{self.qk_dtype.value}+{self.pv_dtype.value}"

    def with_(self, **changes) -> "AttnConfig":
        return replace(self, **changes)

    @property
    def uri(self) -> str:
        """Stable name for logs, caches and test ids."""
        flags = "".join(
            c for c, on in (("k", self.smooth_k), ("q", self.smooth_q), ("v", self.smooth_v)) if on
        )
        acc = ("_acc-fp16" if self.pv_accum is PVAccum.FP16 else "") + ("_hadamard" if self.hadamard else "")
        return (
            f"{self.family.value}_{self.precision}{acc}_{self.granularity.value}"
            f"_smooth-{flags or 'none'}"
        )

    @property
    def v_fp8_max(self) -> float:
        """Largest |V_hat| of FP8 V (the per-channel quantizer maps max|V - vbar| to it)."""
        return FP8_V_MAX_FP16_ACC if self.pv_accum is PVAccum.FP16 else FP8_MAX

    @property
    def p_log2_max(self) -> float:
        """P is produced as exp2(x - m + p_log2_max): its largest value is 2^p_log2_max."""
        if self.pv_dtype is PVDType.FP8:
            return math.log2(FP8_MAX)
        return P_LOG2_MAX_FP16_ACC_16BIT if self.pv_accum is PVAccum.FP16 else 0.0


def default_smooth_q(qk_dtype: QKDType) -> bool:
    """The paper smooths Q for 4-bit QK (SageAttn2-4b) and not for 8-bit."""
    return QKDType(qk_dtype) is QKDType.INT4
