"""Python mirrors of the kernel parameter structs (csrc/include/sa2/abi.cuh) and the enum codes.

Every kernel unit is compiled with a static_assert of each field offset and struct size
computed here (`layout_asserts`), so NVRTC refuses to build a kernel this file would fill
differently; CI compiles every product kernel, on a CPU.
"""
from __future__ import annotations

import ctypes
import struct

import torch

from .config import Granularity, PVAccum, QKDType

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_i32 = ctypes.c_int32

# Enum codes (abi.cuh: QKType, PVType, PVAccum, Granularity).
QK_CODES = {QKDType.INT8: 0, QKDType.INT4: 1}
PV_FP16, PV_BF16, PV_FP8 = 0, 1, 2
PV_ACCUM_CODES = {PVAccum.FP32: 0, PVAccum.FP16: 1}
PV_16BIT = {torch.float16: PV_FP16, torch.bfloat16: PV_BF16}
GRANULARITY_CODES = {Granularity.PER_THREAD: 0, Granularity.PER_WARP: 1, Granularity.PER_BLOCK: 2}
ENUM_ASSERTS = (
    ("int(sa2::QKType::kInt8)", 0), ("int(sa2::QKType::kInt4)", 1),
    ("int(sa2::PVType::kFp16)", PV_FP16), ("int(sa2::PVType::kBf16)", PV_BF16), ("int(sa2::PVType::kFp8)", PV_FP8),
    ("int(sa2::PVAccum::kFp32)", PV_ACCUM_CODES[PVAccum.FP32]), ("int(sa2::PVAccum::kFp16)", PV_ACCUM_CODES[PVAccum.FP16]),
    ("int(sa2::kPerThread)", 0), ("int(sa2::kPerWarp)", 1), ("int(sa2::kPerBlock)", 2),
    ("int(sa2::kStats)", 0), ("int(sa2::kQ)", 1), ("int(sa2::kKV)", 2),
)


class MmaAttnParams(ctypes.Structure):
    _fields_ = [("q", _p), ("k", _p), ("q_scale", _p), ("k_scale", _p), ("qbar", _p), ("qbar_scale", _p),
                ("q_dot_kbar", _p), ("v", _p), ("v_scale", _p), ("v_mean", _p), ("out", _p), ("lse", _p),
                ("batch", _i64), ("heads_q", _i64), ("heads_kv", _i64), ("nq", _i64), ("nk", _i64),
                ("head_dim", _i64), ("padded_head_dim", _i64), ("nq_pad", _i64), ("nk_pad", _i64),
                ("v_pad", _i64), ("v_stride_b", _i64), ("v_stride_h", _i64), ("v_stride_n", _i64),
                ("o_stride_b", _i64), ("o_stride_h", _i64), ("o_stride_n", _i64), ("qk_int4", _i64),
                ("pv_type", _i64), ("pv_accum", _i64), ("out_bf16", _i64), ("granularity", _i64), ("smooth_q", _i64),
                ("q_mean_rows", _i64), ("causal", _i64), ("sm_scale", ctypes.c_double)]


class WgmmaAttnScalars(ctypes.Structure):
    _fields_ = [("q_scale", _p), ("k_scale", _p), ("v_scale", _p), ("out", _p), ("lse", _p),
                ("q_scale_stride_b", _i64), ("q_scale_stride_h", _i64),
                ("k_scale_stride_b", _i64), ("k_scale_stride_h", _i64),
                ("v_scale_stride_b", _i64), ("v_scale_stride_h", _i64),
                ("o_stride_b", _i64), ("o_stride_h", _i64), ("o_stride_n", _i64),
                ("lse_stride_b", _i64), ("lse_stride_h", _i64),
                ("num_q", _i32), ("num_k", _i32), ("group_size", _i32), ("head_dim", _i32),
                ("causal", _i32), ("out_bf16", _i32), ("out_vec2", _i32), ("out_rows16", _i32),
                ("scale_log2", ctypes.c_float)]


TENSOR_MAP_BYTES = 128  # CUtensorMap: 128 bytes, 64-byte aligned
_TensorMap = ctypes.c_uint64 * (TENSOR_MAP_BYTES // 8)


class WgmmaAttnParams(ctypes.Structure):
    # The C struct is 64-byte aligned (its tensor maps are): the tail pads it to a multiple of 64.
    _fields_ = [("tm_q", _TensorMap), ("tm_k", _TensorMap), ("tm_v", _TensorMap), ("p", WgmmaAttnScalars),
                ("_tail", ctypes.c_uint8 * ((-(3 * TENSOR_MAP_BYTES + ctypes.sizeof(WgmmaAttnScalars))) % 64))]


class StridedInput(ctypes.Structure):
    _fields_ = [("ptr", _p), ("stride_b", _i64), ("stride_h", _i64), ("stride_n", _i64)]


class GroupRule(ctypes.Structure):
    _fields_ = [("slice_shift", _i32), ("mod_groups", _i32), ("div_shift", _i32)]


class StatsJob(ctypes.Structure):
    _fields_ = [("x", StridedInput), ("fp8_max", ctypes.c_float), ("mean_grid_bits", _i32), ("partial", _p), ("mean", _p),
                ("fp8_scale", _p), ("fp8_inv", _p), ("counter", _p), ("vec", _i32)]


class StatsParams(ctypes.Structure):
    _fields_ = [("job", StatsJob * 2), ("jobs", _i32), ("heads", _i32), ("n", _i32), ("chunks", _i32)]


class RowsJob(ctypes.Structure):
    _fields_ = [("x", StridedInput), ("heads", _i32), ("n", _i32), ("block_rows", _i32),
                ("blocks_per_head", _i32), ("groups_per_block", _i32), ("n_pad", _i64), ("rule", GroupRule),
                ("out", _p), ("scale", _p), ("mean", _p), ("mean_shift", _i32), ("qbar", _p),
                ("qbar_scale", _p), ("dot_vec", _p), ("dot_heads", _i32), ("dot_out", _p), ("vec", _i32)]


class VJob(ctypes.Structure):
    _fields_ = [("x", StridedInput), ("heads", _i32), ("n", _i32), ("tiles_per_head", _i32), ("n_pad", _i64),
                ("mean", _p), ("inv", _p), ("out", _p), ("vec", _i32)]


class Segment(ctypes.Structure):
    _fields_ = [("kind", _i32), ("ctas", _i64)]


class QuantizeParams(ctypes.Structure):
    _fields_ = [("stats", StatsParams), ("rows", RowsJob * 2), ("v", VJob), ("kv_heads", _i64), ("d", _i32),
                ("int4", _i32), ("segments", _i32), ("segment", Segment * 2)]


class SmoothV16Params(ctypes.Structure):
    _fields_ = [("x", StridedInput), ("heads", _i32), ("n", _i32), ("d", _i32), ("D", _i32), ("mean", _p),
                ("out", _p), ("vec", _i32)]


def field_offsets(struct: type[ctypes.Structure], prefix: str = "", base: int = 0) -> list[tuple[str, int, int]]:
    """(C member designator, byte offset, byte size) of every field, nested structs and arrays of
    structs expanded; fields whose name starts with `_` are Python-side padding."""
    out = []
    for name, ftype in struct._fields_:
        if name.startswith("_"):
            continue
        f = getattr(struct, name)
        path, off = prefix + name, base + f.offset
        out.append((path, off, f.size))
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            out += field_offsets(ftype, path + ".", off)
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Array) and issubclass(ftype._type_, ctypes.Structure):
            elem = ctypes.sizeof(ftype._type_)
            for i in range(ftype._length_):
                out.append((f"{path}[{i}]", off + i * elem, elem))
                out += field_offsets(ftype._type_, f"{path}[{i}].", off + i * elem)
    return out


def layout_asserts(struct: type[ctypes.Structure], c_name: str) -> str:
    """static_asserts that the C struct `c_name` has this struct's layout (size, every offset
    and field size)."""
    lines = [f'static_assert(sizeof({c_name}) == {ctypes.sizeof(struct)}, '
             f'"ABI: sizeof({c_name}) differs from sageattn2/abi.py {struct.__name__}");']
    for path, off, size in field_offsets(struct):
        where = f"{c_name}::{path}"
        lines.append(f'static_assert(SA2_OFFSETOF({c_name}, {path}) == {off} && '
                     f'sizeof((({c_name}*)nullptr)->{path}) == {size}, "ABI: {where} differs from sageattn2/abi.py");')
    return "\n".join(lines)


def enum_asserts() -> str:
    return "\n".join(f'static_assert({expr} == {value}, "ABI: {expr} differs from sageattn2/abi.py");'
                     for expr, value in ENUM_ASSERTS)


_ADDRESS = struct.Struct("P")


def param_pointer(params) -> bytes:
    """cuLaunchKernel's `kernelParams` for a kernel whose one parameter is `params` (a ctypes
    object, or a bytes object holding its bytes): the address of those bytes, as the native
    bytes of a pointer (ctypes passes a bytes argument as a pointer to its data). A bytes object
    never moves or changes, so a pointer to one can be kept and launched from any thread; a
    ctypes object must outlive the launch (the driver copies the parameter at launch time)."""
    if isinstance(params, bytes):
        return _ADDRESS.pack(ctypes.cast(ctypes.c_char_p(params), ctypes.c_void_p).value)
    return _ADDRESS.pack(ctypes.addressof(params))


class ParamTemplate:
    """A struct's bytes with every per-call-constant field filled in, and where its per-call
    fields are. `new()` returns a fresh copy (a ctypes array of 64-bit words) to fill for one
    call; `bytes()` of it is the immutable parameter a launch reads (`param_pointer`)."""

    __slots__ = ("data", "words", "offsets", "_sizes")

    def __init__(self, instance: ctypes.Structure):
        raw = bytes(instance)
        self.words = ctypes.c_uint64 * -(-len(raw) // 8)
        self.data = raw + b"\0" * (ctypes.sizeof(self.words) - len(raw))
        fields = field_offsets(type(instance))
        self.offsets = {path: off for path, off, _ in fields}
        self._sizes = [(off, size) for _, off, size in fields]

    def new(self):
        return self.words.from_buffer_copy(self.data)

    def slot(self, path: str) -> int:
        """Word index of an 8-byte field (a pointer or int64)."""
        off = self.offsets[path]
        assert off % 8 == 0, path
        return off // 8

    def word_slot(self, path: str) -> int:
        """Word index of a 32-bit field that shares its 8-byte word with padding only, so a call
        may store the whole word (value in the low half, little-endian)."""
        off = self.offsets[path]
        assert off % 8 == 0 and not any(off < o < off + 8 for o, _ in self._sizes), path
        return off // 8

    def diff(self, other: "ParamTemplate") -> tuple[tuple[int, int], ...]:
        """(word index, value) where `other`'s words differ from this template's."""
        mine, theirs = self.new(), other.new()
        return tuple((i, theirs[i]) for i in range(len(mine)) if mine[i] != theirs[i])
