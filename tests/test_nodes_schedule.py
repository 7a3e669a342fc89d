"""Schedule grammar, its errors, percent -> sigma windows and layer positions."""
import logging
import random
import re

import pytest
import torch

import sageattn2
from test_nodes_support import DiscreteSampling, FlowSampling  # noqa: F401  (loads the pack)

from sageattn2_pack.nodes import comfy_nodes, layers, levels, schedule
from sageattn2_pack.nodes.layers import ForwardState, LayerMemory, LayerPosition, step_of
from sageattn2_pack.nodes.schedule import ScheduleError, parse


def pos(kind=None, index=0, kind_total=None, block=0, block_total=None):
    return LayerPosition(kind, index, kind_total, block, block_total)


def test_levels_match_the_core_api():
    assert levels.LEVELS == sageattn2.PRECISIONS
    assert levels.QUANTIZED == sageattn2.QUANTIZED_PRECISIONS
    assert set(levels.ACCURACY_RANK) == set(levels.SCHEDULE_LEVELS)
    assert set(levels.SCHEDULE_LEVELS) == set(levels.LEVELS) | {lv + "+hadamard" for lv in levels.LEVELS if lv != "exact"}


def test_rotated_levels_parse_print_and_rank():
    """'+hadamard' after a level: Q and K rotated in that cell (sageattn(hadamard=True)); the
    canonical text keeps it, and it ranks just above the same level unrotated."""
    s = parse("0-20%: int4+fp8+hadamard; double 1-3: INT8 + FP8 +Hadamard\nall: auto+hadamard\nsingle: int4+fp16")
    assert [r.level for r in s.rules] == ["int4+fp8+hadamard", "int8+fp8+hadamard", "auto+hadamard", "int4+fp16"]
    assert s.text == "0-20%: int4+fp8+hadamard\ndouble 1-3: int8+fp8+hadamard\nall: auto+hadamard\nsingle: int4+fp16"
    assert parse(s.text) == s
    rank = levels.ACCURACY_RANK
    for level in levels.LEVELS[:-1]:
        above = [lv for lv in levels.SCHEDULE_LEVELS if rank[lv] > rank[level]]
        assert min(above, key=rank.get) == level + "+hadamard"
    assert levels.most_accurate(["int4+fp8+hadamard", "int4+fp8"]) == "int4+fp8+hadamard"
    assert levels.most_accurate(["int4+fp8+hadamard", "int4+fp16"]) == "int4+fp16"
    assert levels.split_rotation("int4+fp8+hadamard") == ("int4+fp8", True)
    assert levels.split_rotation("exact") == ("exact", False)
    assert levels.rotated("exact") == "exact" and levels.rotated("auto") == "auto+hadamard"
    assert levels.rotated("int8+fp8", False) == "int8+fp8"
    # An uncertain cell runs the most accurate candidate, rotation included.
    b = parse("blocks last 2: int4+fp8+hadamard").bind(FlowSampling().percent_to_sigma)
    assert b.level(0.5, pos(block=3), "int4+fp8") == "int4+fp8+hadamard"
    assert b.level(0.5, pos(block=3, block_total=10), "int4+fp8") == "int4+fp8"


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
    ("double 1: exact+hadamard", 1, 11, "nothing to rotate"),
    ("0-20%: hadamard", 1, 8, "may end in '+hadamard'"),
    ("0-20%: int4+hadamard", 1, 8, "unknown precision level"),
])
def test_errors_name_line_column_and_the_problem(text, line, col, words):
    with pytest.raises(ScheduleError) as e:
        parse(text)
    msg = str(e.value)
    m = re.fullmatch(r"schedule line (\d+), column (\d+), near '([^']*)': (.*)", msg)
    assert m, msg
    assert (int(m[1]), int(m[2])) == (line, col) and words in m[4]
    # One line that reads right in any font: what is at the column is quoted, no caret.
    assert text.splitlines()[line - 1][col - 1 :].startswith(m[3])


def test_every_bad_rule_is_reported():
    text = "double 5-2: exact\nall: int8+fp8\nblocks first: exact; 0-20%: int9\n\n# ok\nsingle 1: exact"
    with pytest.raises(ScheduleError) as e:
        parse(text)
    lines = str(e.value).splitlines()
    assert [re.match(r"schedule line (\d+), column (\d+)", x).groups() for x in lines] == \
        [("1", "8"), ("3", "8"), ("3", "29")]
    assert "runs backwards" in lines[0] and "needs a count" in lines[1] and "'int9'" in lines[2]
    assert str(e.value).count("at the end of the line") == 0
    with pytest.raises(ScheduleError, match=r"column 7, at the end of the line: unknown precision level 'nothing'"):
        parse("0-20%:")


@pytest.mark.parametrize("text, words", [
    ("double " + "9" * 5000 + ": exact", "too large"),
    ("double 1-" + "9" * 5000 + ": exact", "too large"),
    ("blocks first " + "9" * 5000 + ": exact", "too large"),
    ("blocks " + "1" * 10 + ": exact", "too large"),
    ("0-" + "9" * 5000 + "%: exact", "0 <= start < end <= 100"),
    ("9" * 5000 + "%: exact", "needs a start and an end"),
    ("double 1." + "9" * 5000 + ": exact", "whole numbers"),
    ("9" * 5000 + ": exact", "too large"),
], ids=["index", "range", "first", "ten-digits", "window", "lone-percent", "decimal", "bare"])
def test_huge_numbers_give_a_short_schedule_error(text, words):
    with pytest.raises(ScheduleError, match=words) as e:
        parse(text)
    assert len(str(e.value)) < 300
    assert comfy_nodes.SageAttn2Schedule.VALIDATE_INPUTS(schedule=text) == str(e.value)
    assert parse("blocks " + "9" * 9 + ": exact").rules[0].groups[0].items[0].a == 999999999


def test_random_text_gives_a_schedule_or_a_schedule_error():
    """Whatever is typed, the Schedule node's check answers with a message (ComfyUI turns any
    other exception into an internal validation error), and what parses round-trips."""
    rng = random.Random(17)
    alphabet = list("0123456789-%:;,. \n#") + ["double", "single", "blocks", "first", "last", "all", "input",
                                                "int8+fp8", "exact", "auto", "+hadamard", "9" * 30, "\u00e9", "\0"]
    parsed = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        try:
            s = parse(text)
        except ScheduleError as e:
            assert str(e).startswith("schedule line "), (text, str(e))
            continue
        parsed += 1
        assert parse(s.text) == s, text
    assert parsed > 100


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


# ---------------------------------------------------------------------------------------
# Rules that match no layer of the model


def test_rules_matching_no_layer_are_logged_once_with_their_line(caplog):
    from test_nodes_support import FakePatcher, TinyDiT, sample

    from sageattn2_pack.nodes import override as ov

    text = ("blocks 999: int8+fp16\n0-50%: int8+fp8; single 50: exact\ninput 0-3: exact\ndouble 1: exact\n"
            "single last 1, 7: int4+fp8\nblocks 4: exact\nsingle 3-9, double 5: exact")
    dit = TinyDiT(blocks=(("double", 2), ("single", 3)))  # 5 layers (self + cross attention): blocks 0-4
    state = ov.PatchState(ov.PatchSettings(precision="int8+fp16", min_seq_len=0, backend="reference"), parse(text))
    model = ov.install(FakePatcher(), state)
    with caplog.at_level(logging.INFO, logger="sageattn2.nodes"):
        for _ in range(2):
            sample(model, dit, [1.0, 0.5, 0.0])
    found = [r.message for r in caplog.records if "matches no attention layer" in r.message]
    assert [re.search(r"rule on (line \d+ \('[^']*'\))", m)[1] for m in found] == [
        "line 1 ('blocks 999: int8+fp16')", "line 2 ('single 50: exact')", "line 3 ('input 0-3: exact')",
        "line 7 ('single 3-9, double 5: exact')"]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "matches no" in r.message)
    assert all("the model's attention layers: double 0-1, single 0-2)" in m for m in found)


def test_unmatched_rules_for_every_kind_of_layer_naming():
    def layers_of(tos):
        fwd, mem = ForwardState(0.5), LayerMemory()
        for to in tos:
            fwd.position(to, mem)
        mem.learn(fwd)
        return fwd.layers(mem)

    unet = layers_of([{"block": ("input", b), "block_index": 0} for b in (4, 5, 7, 8)]
                     + [{"block": ("middle", 0), "block_index": i} for i in range(2)]
                     + [{"block": ("output", b), "block_index": 0} for b in range(3)])
    assert [p.name for p in unet] == ["input 0", "input 1", "input 2", "input 3", "middle 0", "middle 1",
                                      "output 0", "output 1", "output 2"]
    s = parse("input 3: exact\ninput 4: exact\nmiddle last 2: exact\noutput 0-9: exact\ndouble: exact\n"
              "blocks 8: exact\nblocks 9: exact\nall: exact\n0-10%: exact\nsingle first 1, input last 1: exact")
    assert [r.line for r in s.unmatched(unet)] == [2, 5, 7]
    unlabelled = layers_of([{}] * 6)
    assert [p.name for p in unlabelled] == [f"blocks {i}" for i in range(6)]
    s = parse("blocks last 6: exact\nblocks 6: exact\ndouble 0: exact\nblocks first 1: exact")
    assert [r.line for r in s.unmatched(unlabelled)] == [2, 3]


def test_rules_say_where_they_were_written():
    s = parse("# comment\n  double 1 : exact ; all: auto", origin="flux_00001.json")
    assert [r.where for r in s.rules] == ["line 2 of flux_00001.json ('double 1 : exact')",
                                          "line 2 of flux_00001.json ('all: auto')"]
    assert parse("double 1: exact") == s.__class__(s.rules[:1])  # where a rule was written is not its meaning
