"""The kernel catalogue: every kernel instantiation, which archs' product builds contain it, and
the NVRTC unit that compiles it.

A unit is a few generated lines: the family header, the instantiation (an NVRTC name
expression), the launch constants the host reads back from the cubin (`sa2_launch_info`), and
the ABI static_asserts of sageattn2/abi.py. Every header under csrc/include is passed to NVRTC
in memory, so no include path (and no CUDA header) is needed.

Product builds hold what dispatch can reach on that arch; the other instantiations (wgmma
schedules kept for experiments, INT4 emulation on Hopper) compile on first use.
"""
from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import abi
from .archs import Arch

CSRC_INCLUDE = Path(__file__).resolve().parent.parent / "csrc" / "include"
# -default-device: the sources are device-only; NVRTC 13.0 otherwise treats the call operator of
# a generic lambda inside a kernel as a host function and refuses it (13.5 does not).
BASE_OPTIONS = ("-std=c++17", "-default-device")

# wgmma schedules: name -> (Schedule enumerator, consumer warpgroups). Head dim 64 builds only
# the sequential ones (ping-pong / overlap were 10-20 % slower there, docs/notes-wgmma.md v5).
WGMMA_SCHEDULES = {"sequential": ("kSequential", 2), "pingpong": ("kPingPong", 2), "overlap": ("kOverlap", 2),
                   "sequential3wg": ("kSequential", 3)}
WGMMA_HEAD_DIM_64 = ("sequential", "sequential3wg")
# The schedule dispatch runs, per (FP8 PV, padded head dim): fastest measured on H100 (notes v6).
WGMMA_DEFAULT_SCHEDULE = {(True, 128): "sequential3wg", (True, 64): "sequential3wg",
                          (False, 128): "overlap", (False, 64): "sequential3wg"}
MMA_HEAD_DIMS = (64, 128, 256)
WGMMA_HEAD_DIMS = (64, 128)
QUANT_HEAD_DIMS = (64, 128, 256)
# Segment-kind masks of the quantizer launches (quant_kernels.cuh): statistics alone, Q +
# statistics, K / V (+ Q).
QUANT_KINDS = {"stats": 1, "qstats": 3, "kvq": 6}
QUANT_ROW_KINDS = ("qstats", "kvq")  # the launches that quantize Q or K rows
_PV_NAMES = {abi.PV_FP16: "fp16", abi.PV_BF16: "bf16", abi.PV_FP8: "fp8"}
_PV_ENUM = {abi.PV_FP16: "sa2::PVType::kFp16", abi.PV_BF16: "sa2::PVType::kBf16", abi.PV_FP8: "sa2::PVType::kFp8"}


@dataclass(frozen=True)
class Kernel:
    """One instantiation. `info` names the launch constants read back from the cubin."""

    name: str
    header: str
    traits: str  # the type `T` the expressions below use
    expr: str  # the __global__ function, an NVRTC name expression
    params: type  # its abi.py struct
    params_c: str  # its C struct
    info: tuple[tuple[str, str], ...]

    def source(self) -> str:
        values = ", ".join(f"(long long)({e})" for _, e in self.info)
        return "\n".join([
            f'#include "{self.header}"',
            f"using SA2_T = {self.traits};",
            f'extern "C" __constant__ long long sa2_launch_info[{len(self.info)}] = {{{values}}};',
            abi.enum_asserts(),
            abi.layout_asserts(self.params, self.params_c),
            "",
        ])


def mma_kernel(head_dim: int, qk_int4: bool, pv: int, f16_accum: bool = False) -> Kernel:
    """`f16_accum`: P.V accumulated in fp16 inside a key tile (FP8 or fp16 PV only). `smem` is
    the launch's shared memory with Q smoothing, `smem_no_qbar` without."""
    if f16_accum and pv == abi.PV_BF16:
        raise ValueError("an fp16 P.V accumulator needs fp16 or FP8 operands, not bf16")
    acc = "sa2::PVAccum::kFp16" if f16_accum else "sa2::PVAccum::kFp32"
    traits = (f"sa2::AttnMmaTraits<{head_dim}, sa2::QKType::{'kInt4' if qk_int4 else 'kInt8'}, "
              f"{_PV_ENUM[pv]}, {acc}>")
    name = f"mma-d{head_dim}-{'int4' if qk_int4 else 'int8'}-{_PV_NAMES[pv]}{'-acc16' if f16_accum else ''}"
    return Kernel(name, "sa2/attn_mma.cuh", traits, f"sa2::attn_mma_kernel<{traits}>", abi.MmaAttnParams,
                  "sa2::MmaAttnParams",
                  (("threads", "SA2_T::kThreads"), ("smem", "SA2_T::kSmemBytes"),
                   ("smem_no_qbar", "SA2_T::kQbarOffset"), ("cta_q", "SA2_T::kCtaQ"),
                   ("k_tile", "SA2_T::kKTile"), ("warp_q", "SA2_T::kWarpQ"),
                   ("row_sums_by_mma", "SA2_T::kRowSumsByMma")))


def wgmma_kernel(head_dim: int, pv: int, schedule: str) -> Kernel:
    enum, wgs = WGMMA_SCHEDULES[schedule]
    traits = f"sa2::wgmma_attn::Traits<{head_dim}, {_PV_ENUM[pv]}, sa2::wgmma_attn::Schedule::{enum}, {wgs}>"
    return Kernel(f"wgmma-d{head_dim}-{_PV_NAMES[pv]}-{schedule}", "sa2/attn_wgmma.cuh", traits,
                  f"sa2::wgmma_attn::attention_kernel<{traits}>", abi.WgmmaAttnParams, "sa2::WgmmaAttnParams",
                  (("threads", "SA2_T::kThreads"), ("smem", "SA2_T::kSmemBytes"), ("cta_q", "SA2_T::kBlockM"),
                   ("k_tile", "SA2_T::kBlockN")))


_QUANT_INFO = (("threads", "sa2::quantize::kThreads"), ("stats_chunk_rows", "sa2::quantize::kStatsChunkRows"),
               ("stats_stage_bytes", "sa2::quantize::kStatsStageBytes"),
               ("v_tile_tokens", "sa2::quantize::kVTileTokens"))


def quant_kernel(bf16: bool, head_dim: int, kinds: str, hadamard: bool = False) -> Kernel:
    """`hadamard`: Q and K rows rotated before quantization (docs/numerics.md §1.6); only the
    launches that quantize rows have it."""
    if hadamard and kinds not in QUANT_ROW_KINDS:
        raise ValueError(f"the {kinds!r} quantizer launch has no rows to rotate")
    if hadamard and head_dim & (head_dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head dim, got {head_dim}")
    traits = f"sa2::{'bf16' if bf16 else 'f16'}"
    return Kernel(f"quant-{'bf16' if bf16 else 'fp16'}-d{head_dim}-{kinds}{'-hadamard' if hadamard else ''}",
                  "sa2/quant_kernels.cuh", traits,
                  f"sa2::quantize::quantize_qkv_kernel<{traits}, {head_dim}, {QUANT_KINDS[kinds]}, "
                  f"{'true' if hadamard else 'false'}>",
                  abi.QuantizeParams, "sa2::QuantizeParams", _QUANT_INFO)


def smooth_v16_kernel(bf16: bool) -> Kernel:
    traits = f"sa2::{'bf16' if bf16 else 'f16'}"
    return Kernel(f"smooth_v16-{'bf16' if bf16 else 'fp16'}", "sa2/quant_kernels.cuh", traits,
                  f"sa2::quantize::smooth_v16_kernel<{traits}>", abi.SmoothV16Params, "sa2::SmoothV16Params",
                  (("threads", "sa2::quantize::kThreads"),))


def product_kernels(arch: Arch) -> list[Kernel]:
    """What install.py builds for `arch`: every kernel dispatch can pick there. The rotating
    quantizers (`sageattn(hadamard=True)`) serve both families at every padded head dim."""
    out = [quant_kernel(bf16, d, kinds) for bf16 in (False, True) for d in QUANT_HEAD_DIMS for kinds in QUANT_KINDS]
    out += [quant_kernel(bf16, d, kinds, hadamard=True) for bf16 in (False, True) for d in QUANT_HEAD_DIMS
            for kinds in QUANT_ROW_KINDS]
    out += [smooth_v16_kernel(bf16) for bf16 in (False, True)]
    pvs = (abi.PV_FP16, abi.PV_BF16) + ((abi.PV_FP8,) if arch.fp8_mma else ())
    qks = (False, True) if arch.int4_mma else (False,)
    # FP8 PV runs with the arch's default accumulator (archs.Arch.fp8_pv_fp16_accum).
    out += [mma_kernel(d, int4, pv, pv == abi.PV_FP8 and arch.fp8_pv_fp16_accum)
            for d in MMA_HEAD_DIMS for int4 in qks for pv in pvs]
    if arch.wgmma:
        for d in WGMMA_HEAD_DIMS:
            for pv in (abi.PV_FP8, abi.PV_FP16, abi.PV_BF16):
                out.append(wgmma_kernel(d, pv, WGMMA_DEFAULT_SCHEDULE[(pv == abi.PV_FP8, d)]))
    return out


def test_kernels(arch: Arch) -> list[Kernel]:
    """The product kernels plus those only tests and benchmarks reach: every wgmma schedule, INT4
    QK where the arch emulates it and the P.V accumulator dispatch does not pick (FP8 with the
    other one, fp16 PV with an fp16 accumulator) (`install.py --all`; otherwise they compile on
    first use)."""
    out = product_kernels(arch)
    extra = []
    pvs = (abi.PV_FP16, abi.PV_BF16) + ((abi.PV_FP8,) if arch.fp8_mma else ())
    if not arch.int4_mma:
        extra += [mma_kernel(d, True, pv) for d in MMA_HEAD_DIMS for pv in pvs]
    qks = (False, True)
    extra += [mma_kernel(d, int4, pv, True) for d in MMA_HEAD_DIMS for int4 in qks
              for pv in (abi.PV_FP16,) + ((abi.PV_FP8,) if arch.fp8_mma else ())]
    if arch.fp8_mma:
        extra += [mma_kernel(d, int4, abi.PV_FP8) for d in MMA_HEAD_DIMS for int4 in qks]
    if arch.wgmma:
        extra += [wgmma_kernel(d, pv, s) for d in WGMMA_HEAD_DIMS for pv in (abi.PV_FP8, abi.PV_FP16, abi.PV_BF16)
                  for s in WGMMA_SCHEDULES if d == 128 or s in WGMMA_HEAD_DIM_64]
    names = {k.name for k in out}
    for k in extra:  # each once: the lists above overlap (INT4 + FP8 where INT4 is emulated)
        if k.name not in names:
            names.add(k.name)
            out.append(k)
    return out


def headers() -> dict[str, str]:
    """Every header a unit may include, by include name ("sa2/attn_mma.cuh")."""
    return {p.relative_to(CSRC_INCLUDE).as_posix(): p.read_text() for p in sorted(CSRC_INCLUDE.rglob("*.cuh"))}


def options(arch: Arch, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"--gpu-architecture={arch.target}", *BASE_OPTIONS, *arch.defines(), *extra]


def cache_key(kernel: Kernel, arch: Arch, nvrtc_version: tuple[int, int], extra: tuple[str, ...],
              hdrs: dict[str, str]) -> str:
    """Changes with the unit, any header, the options, the arch and the NVRTC version."""
    h = hashlib.sha256()
    for part in (kernel.source(), kernel.expr, " ".join(options(arch, extra)), f"nvrtc {nvrtc_version}"):
        h.update(part.encode() + b"\0")
    for name, text in hdrs.items():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Reading a cubin (an ELF64 file): its arch and the launch constants.


def _sections(data: bytes):
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 cubin")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]


def cubin_sm(data: bytes) -> int:
    """The SM number a cubin was built for (EM_CUDA e_flags bits 8-15: 90 for sm_90a)."""
    import struct

    flags, = struct.unpack_from("<I", data, 0x30)
    return (flags >> 8) & 0xFF


def cubin_symbol(data: bytes, symbol: str) -> bytes:
    """The initial bytes of a global `symbol` (e.g. a __constant__ array) in a cubin."""
    import struct

    secs = _sections(data)

    def name_at(table, off):
        start = table[4] + off
        return data[start:data.index(b"\0", start)].decode()

    symtab = next(s for s in secs if s[1] == 2)  # SHT_SYMTAB
    strtab = secs[symtab[6]]
    for j in range(symtab[5] // 24):
        st_name, _, _, shndx, value, size = struct.unpack_from("<IBBHQQ", data, symtab[4] + j * 24)
        if st_name and name_at(strtab, st_name) == symbol:
            sec = secs[shndx]
            return data[sec[4] + value:sec[4] + value + size]
    raise KeyError(symbol)


def launch_info(kernel: Kernel, cubin: bytes) -> dict[str, int]:
    raw = cubin_symbol(cubin, "sa2_launch_info")
    values = (ctypes.c_int64 * len(kernel.info)).from_buffer_copy(raw)
    return {name: int(v) for (name, _), v in zip(kernel.info, values)}
