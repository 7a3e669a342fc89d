"""Schedule grammar, its errors, percent -> sigma windows and layer positions."""
import pytest
import torch

import sageattn2
from test_nodes_support import DiscreteSampling, FlowSampling  # noqa: F401  (loads the pack)

from sageattn2_pack.nodes import layers, levels, schedule
from sageattn2_pack.nodes.layers import ForwardState, LayerMemory, LayerPosition, step_of
from sageattn2_pack.nodes.schedule import ScheduleError, parse


def pos(kind=None, index=0, kind_total=None, block=0, block_total=None):
    return LayerPosition(kind, index, kind_total, block, block_total)


def test_levels_match_the_core_api():
    assert levels.LEVELS == sageattn2.PRECISIONS
    assert levels.QUANTIZED == sageattn2.QUANTIZED_PRECISIONS
    assert set(levels.ACCURACY_RANK) == set(levels.LEVELS)


def test_parse_the_documented_examples():
    s = parse("0-20%: int8+fp16; 20-90%: int4+fp8; 90-100%: int8+fp8\n"
              "blocks first 2, last 2: int8+fp16   # keep the ends accurate\n"
              "double 0-3: int8+fp16\n"
              "single 10-37: int4+fp8\n"
              "0-10% double 0-3, single 5: exact\n"
              "20%-40%, 60-80%: auto\n"
              "single: int8+fp8\n"
              "all: exact")
    assert [r.level for r in s.rules] == ["int8+fp16", "int4+fp8", "int8+fp8", "int8+fp16", "int8+fp16",
                                          "int4+fp8", "exact", "auto", "int8+fp8", "exact"]
    r = s.rules[3]
    assert r.windows == () and r.groups == (schedule.LayerGroup("blocks", (
        schedule.LayerItem("first", 2), schedule.LayerItem("last", 2))),)
    r = s.rules[6]
    assert r.windows == ((0.0, 10.0),)
    assert [g.kind for g in r.groups] == ["double", "single"]
    assert s.rules[7].windows == ((20.0, 40.0), (60.0, 80.0))
    assert s.rules[8].groups == (schedule.LayerGroup("single", ()),)
    assert s.rules[9].windows == () and s.rules[9].groups == ()
    # Canonical text parses back to the same schedule.
    assert parse(s.text) == s


def test_empty_and_comment_only_schedules_have_no_rules():
    assert parse("").rules == ()
    assert parse("# nothing\n\n ; ;").rules == ()


@pytest.mark.parametrize("text, line, col, words", [
    ("0-20%: int9", 1, 8, "unknown precision level 'int9'"),
    ("0-20% int8+fp8", 1, 1, "missing ':'"),
    ("0-20%: int8+fp8: exact", 1, 16, "only one ':'"),
    ("int8+fp8: 0-20%", 1, 11, "unknown precision level"),
    ("0-20%: exact\n20%: int8+fp8", 2, 1, "needs a start and an end"),
    ("50-20%: exact", 1, 1, "0 <= start < end <= 100"),
    ("0-120%: exact", 1, 1, "0 <= start < end <= 100"),
    ("3-5: exact", 1, 1, "needs a layer kind before it"),
    ("dobule 3: exact", 1, 1, "unknown word 'dobule'"),
    ("double 5-2: exact", 1, 8, "runs backwards"),
    ("double 1.5: exact", 1, 8, "whole numbers"),
    ("blocks first: exact", 1, 8, "'first' needs a count"),
    ("blocks last 0: exact", 1, 13, "selects nothing"),
    ("first 2: exact", 1, 1, "needs a layer kind before it"),
    (": exact", 1, 1, "nothing before ':'"),
    ("all 0-10%: exact", 1, 1, "'all' stands alone"),
    ("0-10%: exact; double 1 ? 2: exact", 1, 24, "unexpected '?'"),
])
def test_errors_name_line_column_and_the_problem(text, line, col, words):
    with pytest.raises(ScheduleError) as e:
        parse(text)
    msg = str(e.value)
    assert msg.startswith(f"schedule line {line}, column {col}:"), msg
    assert words in msg
    # The caret sits under the reported column of the quoted line.
    quoted, caret = msg.splitlines()[1:3]
    assert quoted.strip() == text.splitlines()[line - 1].strip()
    assert caret.index("^") - 2 == col - 1


def test_schedule_error_is_a_value_error():
    assert issubclass(ScheduleError, ValueError)


def test_later_rules_override_earlier_and_base_fills_the_rest():
    b = parse("double: int4+fp8\ndouble 1: int8+fp16").bind(FlowSampling().percent_to_sigma)
    assert b.level(0.5, pos("double", 0, 4), "auto") == "int4+fp8"
    assert b.level(0.5, pos("double", 1, 4), "auto") == "int8+fp16"
    assert b.level(0.5, pos("single", 1, 4), "auto") == "auto"
    b = parse("double 1: int8+fp16\ndouble: int4+fp8").bind(FlowSampling().percent_to_sigma)
    assert b.level(0.5, pos("double", 1, 4), "auto") == "int4+fp8"


@pytest.mark.parametrize("sampling", [FlowSampling(3.0), FlowSampling(1.0), DiscreteSampling()])
def test_percent_windows_follow_the_models_sigmas(sampling):
    b = parse("0-20%: int8+fp16; 20-90%: int4+fp8; 90-100%: int8+fp8").bind(sampling.percent_to_sigma)
    to_sigma = sampling.percent_to_sigma
    expected = {0.0: "int8+fp16", 0.05: "int8+fp16", 0.19: "int8+fp16", 0.21: "int4+fp8", 0.5: "int4+fp8",
                0.89: "int4+fp8", 0.91: "int8+fp8", 0.999: "int8+fp8"}
    for percent, level in expected.items():
        sigma = to_sigma(percent) if percent > 0 else to_sigma(1e-9)
        assert b.level(sigma, pos(), "exact") == level, (percent, sigma)
    # The window boundary belongs to the later window: sigma(20%) starts 20-90%.
    assert b.level(to_sigma(0.2), pos(), "exact") == "int4+fp8"
    # The last window includes the end of sampling.
    assert b.level(0.0, pos(), "exact") == "int8+fp8"


def test_window_and_layers_must_both_match():
    b = parse("0-10% double 0-3: exact").bind(FlowSampling().percent_to_sigma)
    early, late = 0.999, 0.3
    assert b.level(early, pos("double", 2, 19), "int8+fp8") == "exact"
    assert b.level(late, pos("double", 2, 19), "int8+fp8") == "int8+fp8"
    assert b.level(early, pos("double", 4, 19), "int8+fp8") == "int8+fp8"
    assert b.level(early, pos("single", 2, 38), "int8+fp8") == "int8+fp8"


def test_unknown_facts_pick_the_most_accurate_possible_level():
    b = parse("blocks last 2: int8+fp16").bind(FlowSampling().percent_to_sigma)
    # Layer count not learned yet: int8+fp16 might apply, and it is more accurate than base.
    assert b.level(0.5, pos(block=3), "int4+fp8") == "int8+fp16"
    # Base more accurate than the unknown rule's level: base stays.
    assert b.level(0.5, pos(block=3), "exact") == "exact"
    # Known count: decided.
    assert b.level(0.5, pos(block=3, block_total=10), "int4+fp8") == "int4+fp8"
    assert b.level(0.5, pos(block=8, block_total=10), "int4+fp8") == "int8+fp16"
    # No sigma, or no percent_to_sigma: windows are unknown.
    b = parse("0-50%: int8+fp16").bind(FlowSampling().percent_to_sigma)
    assert b.level(None, pos(), "int8+fp8") == "int8+fp16"
    b = parse("0-50%: int4+fp8; double 1: int8+fp16").bind(None)
    assert b.level(0.9, pos("double", 0), "int8+fp8") == "int8+fp8"
    assert b.level(0.9, pos("double", 1), "int8+fp8") == "int8+fp16"


def test_first_last_ranges_and_indices():
    b = parse("double first 2, 5, 7-8, last 1: exact").bind(None)
    hits = [i for i in range(12) if b.level(0.5, pos("double", i, 12), "int8+fp8") == "exact"]
    assert hits == [0, 1, 5, 7, 8, 11]


# ---------------------------------------------------------------------------------------
# Layer positions


def test_positions_from_dit_keys():
    fwd, mem = ForwardState(0.5), LayerMemory()
    to = {"block_type": "double", "block_index": 0, "total_blocks": 2}
    seen = []
    for kind, n in (("double", 2), ("single", 3)):
        to.update(block_type=kind, total_blocks=n)
        for i in range(n):
            to["block_index"] = i
            for _ in range(2):  # self + cross attention share the layer
                seen.append(fwd.position(to, mem)[1])
    assert [p.name for p in seen[::2]] == ["double 0", "double 1", "single 0", "single 1", "single 2"]
    assert [p.block for p in seen[::2]] == [0, 1, 2, 3, 4]
    assert seen[0] == seen[1]
    assert seen[4].kind_total == 3 and seen[4].block_total is None
    mem.learn(fwd)
    assert mem.block_total == 5 and mem.kind_totals == {"double": 2, "single": 3}
    fwd2 = ForwardState(0.4)
    to = {"block_type": "single", "block_index": 2}
    assert fwd2.position(to, mem)[1] == LayerPosition("single", 2, 3, 0, 5)


def test_positions_from_unet_keys():
    fwd, mem = ForwardState(1.0), LayerMemory()
    names = []
    for block in (("input", 4), ("input", 4), ("input", 7), ("middle", 0), ("output", 2)):
        for bi in (0, 1):
            to = {"block": block, "block_index": bi, "transformer_index": 3}
            names.append(fwd.position(to, mem)[1].name)
    assert names == ["input 0", "input 1", "input 0", "input 1", "input 2", "input 3",
                     "middle 0", "middle 1", "output 0", "output 1"]
    mem.learn(fwd)
    assert mem.kind_totals == {"input": 4, "middle": 2, "output": 2} and mem.block_total == 8


def test_positions_without_keys_count_calls():
    fwd, mem = ForwardState(1.0), LayerMemory()
    ps = [fwd.position({}, mem)[1] for _ in range(6)]
    assert [p.name for p in ps] == [f"blocks {i}" for i in range(6)]
    assert all(p.kind is None for p in ps)
    mem.learn(fwd)
    assert mem.block_total == 6
    # A new forward restarts the count.
    assert ForwardState(0.5).position({}, mem)[1] == LayerPosition(None, 0, None, 0, 6)


def test_layer_key_prefers_dit_keys_and_needs_both():
    assert layers.layer_key({"block_type": "single", "block_index": 3}, 9) == ("single", 3)
    assert layers.layer_key({"block_type": "single"}, 9) == ("call", 9)
    assert layers.layer_key({"block": ("output", 5)}, 9) == ("output", 5, 0)


def test_step_of_uses_last_step_at_or_above_sigma():
    sigmas = [1.0, 0.8, 0.5, 0.2, 0.0]
    assert [step_of(sigmas, s) for s in (1.0, 0.9, 0.8, 0.65, 0.5, 0.2, 0.1, 1e-4)] == [0, 0, 1, 1, 2, 3, 3, 3]
    # float32 round-off at a step sigma still maps to that step
    assert step_of(sigmas, float(torch.tensor(0.8, dtype=torch.float32))) == 1
