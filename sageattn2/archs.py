"""What each GPU architecture can do: the one table that decides which kernels are compiled
(sageattn2/kernels.py), which family and precision dispatch picks (sageattn2/dispatch.py), and
which levels are native or substituted. Nothing else restates these facts.

    fp8_mma   e4m3 mma.sync exists (sm_89+): FP8 PV in the mma family, the FP8 V quantizer
    int4_mma  INT4 mma.sync runs natively (sm_80-89). Hopper emulates it ~10x slower, and so
              does sm_120: NVRTC 12.8-13.5 turn its m16n8k64.s4 into unpacking and an
              IMMA.16832.S8 loop (2 IMMA in the D=128 kernel's SASS against sm_89's 128
              IMMA.16864.S4); an int4 request runs INT8 there unless emulation is forced
    wgmma     the Hopper family (sm_90a only: wgmma, TMA, setmaxnreg)
    fp8_pv_fp16_accum
              FP8 P.V in the mma family accumulates in fp16 by default: GeForce Ada and
              Blackwell run that MMA at twice the rate of fp32 accumulation, at the same error
              within 0.1 % (numerics.md §2.6); Hopper emulates FP8 mma.sync, so it gains nothing
    fp32_accum_full_rate
              16-bit mma.sync with an fp32 accumulator runs at the fp16-accumulator rate (A100,
              H100, B200; GeForce cards run it at half rate). There the mma family's 16-bit P.V
              kernels take the row sums l from the tensor cores (P against a ones column, 8
              MMAs per 64-key tile at D=64 instead of 64 FADDs), summing P as rounded for the
              MMA (numerics.md step 5); on half-rate cards those MMAs would cost more than the
              adds
    smem_per_sm_kb
              shared memory one SM gives its CTAs (KB). With 160 or more (A100, H100, B200) the
              mma family's D=128 16-bit P.V kernel double-buffers V (64 KB per CTA, two CTAs per
              SM, one barrier per tile), and its D=64 INT8 / 16-bit P.V kernel with an fp32
              accumulator runs three CTAs per SM (168 registers); on the 100 KB GeForce SMs it
              keeps one V stage (48 KB) and two CTAs at D=64
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    major: int
    minor: int
    fp8_mma: bool
    int4_mma: bool
    wgmma: bool
    fp8_pv_fp16_accum: bool = False
    fp32_accum_full_rate: bool = False
    smem_per_sm_kb: int = 100

    @property
    def number(self) -> int:
        return self.major * 10 + self.minor

    @property
    def target(self) -> str:
        """NVRTC's --gpu-architecture (and the cache folder name)."""
        return f"sm_{self.number}a" if self.wgmma else f"sm_{self.number}"

    @property
    def families(self) -> tuple[str, ...]:
        """Kernel families, in dispatch preference order."""
        return ("wgmma", "mma") if self.wgmma else ("mma",)

    def defines(self) -> list[str]:
        """Macros every kernel unit of this arch is compiled with."""
        return [f"-DSA2_ARCH={self.number}", f"-DSA2_HAS_FP8_MMA={int(self.fp8_mma)}",
                f"-DSA2_FP32_ACCUM_FULL_RATE={int(self.fp32_accum_full_rate)}",
                f"-DSA2_SMEM_PER_SM_KB={self.smem_per_sm_kb}"]


# Compute capability -> capabilities. Archs the mma.sync family serves; newer ones fall back to
# the closest row below (same major) when NVRTC knows them.
_TABLE = {
    (8, 0): Arch(8, 0, fp8_mma=False, int4_mma=True, wgmma=False, fp32_accum_full_rate=True, smem_per_sm_kb=164),
    (8, 6): Arch(8, 6, fp8_mma=False, int4_mma=True, wgmma=False),
    (8, 7): Arch(8, 7, fp8_mma=False, int4_mma=True, wgmma=False, smem_per_sm_kb=164),
    (8, 9): Arch(8, 9, fp8_mma=True, int4_mma=True, wgmma=False, fp8_pv_fp16_accum=True),
    (9, 0): Arch(9, 0, fp8_mma=True, int4_mma=False, wgmma=True, fp32_accum_full_rate=True, smem_per_sm_kb=228),
    (10, 0): Arch(10, 0, fp8_mma=True, int4_mma=False, wgmma=False, fp32_accum_full_rate=True, smem_per_sm_kb=228),
    (12, 0): Arch(12, 0, fp8_mma=True, int4_mma=False, wgmma=False, fp8_pv_fp16_accum=True),
}

# What CI compiles every product kernel for.
PRODUCT_ARCHS = ((8, 0), (8, 6), (8, 9), (9, 0), (12, 0))


def arch(major: int, minor: int) -> Arch | None:
    """The capabilities of compute capability major.minor, or None when no kernel serves it
    (older than 8.0)."""
    if (major, minor) in _TABLE:
        return _TABLE[(major, minor)]
    if major < 8:
        return None
    same_major = [cc for cc in _TABLE if cc[0] == major and cc[1] <= minor]
    base = _TABLE[max(same_major)] if same_major else _TABLE[max(_TABLE)]
    return Arch(major, minor, base.fp8_mma, base.int4_mma, wgmma=False, fp8_pv_fp16_accum=base.fp8_pv_fp16_accum,
                fp32_accum_full_rate=base.fp32_accum_full_rate, smem_per_sm_kb=base.smem_per_sm_kb)


def why_unsupported(major: int, minor: int) -> str:
    return f"GPU compute capability {major}.{minor} is older than 8.0 (Ampere): stock attention only"


def default_precision(a: Arch) -> str:
    """What `auto` means on this arch: FP8 PV where the tensor cores have it, else FP16 PV."""
    return "int8+fp8" if a.fp8_mma else "int8+fp16"
