"""The quantizer's C ABI, checked without a GPU: the ctypes argument structs of
sageattn2/backends/mma.py mirror the C structs of csrc/quant.cu field for field (names,
order, nesting, 8 bytes each; a mismatch would pass garbage pointers without any error), and
the group rules mma.py passes are ones the kernel accepts and evaluates as config.py says."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from sageattn2.backends import mma
from sageattn2.config import NATIVE_HEAD_DIMS, Family, Granularity, k_group_of_key, q_group_of_row, tile_shape

QUANT_CU = Path(__file__).resolve().parents[1] / "csrc" / "quant.cu"


def c_structs(text: str) -> dict[str, list[tuple[str, str]]]:
    """{struct name: [(field, type)]} of the top-level `struct Sa2... { ... };` blocks."""
    structs = {}
    for name, body in re.findall(r"^struct (Sa2\w+) \{\n(.*?)^\};", text, flags=re.M | re.S):
        fields = []
        for line in body.splitlines():
            decl = line.split("//")[0].strip().rstrip(";")
            if not decl:
                continue
            m = re.fullmatch(r"((?:const )?[\w:]+\s*\*?)\s*(.+)", decl)
            assert m, f"cannot parse {name} field {line!r}"
            ctype = m.group(1).replace(" ", "")
            fields += [(f.strip(), ctype) for f in m.group(2).split(",")]
        structs[name] = fields
    return structs


def flatten(struct: type[ctypes.Structure], prefix: str = "") -> list[str]:
    names = []
    for name, ftype in struct._fields_:
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            names += flatten(ftype, f"{prefix}{name}.")
        else:
            assert ctypes.sizeof(ftype) == 8, f"{prefix}{name} is not 8 bytes"
            names.append(prefix + name)
    return names


def flatten_c(structs, name: str, prefix: str = "") -> list[str]:
    names = []
    for field, ctype in structs[name]:
        if ctype in structs:
            names += flatten_c(structs, ctype, f"{prefix}{field}.")
        else:
            assert ctype in ("int64_t", "void*", "constvoid*"), f"{name}.{field} has non-8-byte type {ctype}"
            names.append(prefix + field)
    return names


STRUCTS = c_structs(QUANT_CU.read_text())


@pytest.mark.parametrize("c_name,py_struct", [
    ("Sa2QuantizeQkvArgs", mma._QuantizeQkvArgs),
    ("Sa2SmoothV16Args", mma._SmoothV16Args),
    ("Sa2QkvRows", mma._QkvRows),
    ("Sa2Input", mma._Input),
])
def test_ctypes_structs_mirror_c(c_name, py_struct):
    c_fields = flatten_c(STRUCTS, c_name)
    assert flatten(py_struct) == c_fields
    assert ctypes.sizeof(py_struct) == 8 * len(c_fields)


def test_only_fused_entry_points_are_declared():
    exported = set(re.findall(r"^SA2_EXPORT \w+ (sa2_\w+)\(", QUANT_CU.read_text(), flags=re.M))
    assert exported == set(mma.QUANT_SYMBOLS)


TILES = [(fam, dpad) for fam in Family for dpad in NATIVE_HEAD_DIMS[fam]]


@pytest.mark.parametrize("for_q", [True, False], ids=["q", "k"])
@pytest.mark.parametrize("gran", list(Granularity), ids=lambda g: g.value)
@pytest.mark.parametrize("family,dpad", TILES)
def test_group_rule_shifts_reproduce_config_groups(family, dpad, gran, for_q):
    """The quantizer evaluates quant::GroupRule with shifts and rejects rules whose slice_rows
    or mod_div is not a power of two: every tile in config.py must pass, and the shifted rule
    must give config's group of every row (two blocks, so the block offset is checked too)."""
    tile = tile_shape(family, dpad)
    slice_rows, mod_groups, mod_div = mma._group_rule(gran, tile, for_q)
    block = tile.cta_q if for_q else tile.k_tile
    assert slice_rows >= 8 and slice_rows & (slice_rows - 1) == 0 and block % slice_rows == 0
    assert mod_div in (1, 2, 4, 8) and 1 <= mod_groups <= 8
    slice_shift, div_shift = slice_rows.bit_length() - 1, mod_div.bit_length() - 1
    per_block = (block >> slice_shift) * mod_groups
    group_of = q_group_of_row if for_q else k_group_of_key
    for row in range(2 * block):
        r = row % block
        local = (r >> slice_shift) * mod_groups + ((r & 7) >> div_shift)
        assert (row // block) * per_block + local == group_of(row, tile, gran), row
    if for_q:  # Q smoothing: q-bar blocks are a power of two (>= 8) dividing the Q block
        m = tile.q_mean_rows
        assert m >= 8 and m & (m - 1) == 0 and block % m == 0
