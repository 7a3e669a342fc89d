"""The schedule grammar: which precision level runs at which sampling time and layer.

    schedule := rule (';' | newline) rule ...      '#' starts a comment
    rule     := selector ':' level
    selector := 'all' | (window | layers)+
    window   := A-B%                 percent of the sampling schedule, A <= p < B (B = 100
                                      includes the end); several windows: any of them
    layers   := kind [item (',' item)*]              no item = every layer of that kind
    kind     := blocks | double | single | input | middle | output
    item     := N | N-M | first N | last N
    level    := base ['+hadamard'] | exact
    base     := auto | int8+fp8 | int8+fp16 | int4+fp8 | int4+fp16
                                      '+hadamard': Q and K rotated before quantizing (outlier
                                      channels, docs/numerics.md §1.6); without it, not rotated

A rule applies when its time matches (or it has no window) and its layers match (or it has
none). Later rules override earlier ones; where none applies, the patch node's precision
runs (rotated when its rotate_qk is on). `blocks` counts every attention layer in the order
the model runs them (for models that do not label their blocks, every attention call);
`double`/`single` use the model's own block_index (Flux, HunyuanVideo, WAN: WAN's blocks are
all `double`); `input`, `middle`, `output` number the UNet's transformer blocks in order
within each part.

Example:  0-20%: int8+fp16; 20-90%: int4+fp8; 90-100%: int8+fp8
          blocks first 2, last 2: int8+fp16
          0-10% double 0-3: exact
          single 10-37: int4+fp8+hadamard

Pure Python: no ComfyUI or torch imports.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from .levels import EXACT, LEVELS, ROTATED, SCHEDULE_LEVELS, most_accurate

LAYER_KINDS = ("blocks", "double", "single", "input", "middle", "output")
_WORDS = LAYER_KINDS + ("first", "last", "all")


class ScheduleError(ValueError):
    """A schedule that does not parse; the message says where and what to write instead."""


@dataclass(frozen=True)
class LayerItem:
    form: str  # "index" | "range" | "first" | "last"
    a: int
    b: int = 0

    def matches(self, index: int, total: int | None) -> bool | None:
        if self.form == "index":
            return index == self.a
        if self.form == "range":
            return self.a <= index <= self.b
        if self.form == "first":
            return index < self.a
        if total is None:  # "last N" before the model has told how many layers it has
            return None
        return index >= total - self.a

    def text(self) -> str:
        if self.form == "index":
            return str(self.a)
        if self.form == "range":
            return f"{self.a}-{self.b}"
        return f"{self.form} {self.a}"


@dataclass(frozen=True)
class LayerGroup:
    kind: str
    items: tuple[LayerItem, ...] = ()  # empty: every layer of the kind

    def matches(self, pos) -> bool | None:
        if self.kind == "blocks":
            index, total = pos.block, pos.block_total
        elif pos.kind != self.kind:
            return False
        else:
            index, total = pos.index, pos.kind_total
        if not self.items:
            return True
        return _any3(item.matches(index, total) for item in self.items)

    def text(self) -> str:
        return " ".join([self.kind] + ([", ".join(i.text() for i in self.items)] if self.items else []))


@dataclass(frozen=True)
class Rule:
    windows: tuple[tuple[float, float], ...]  # percent ranges [a, b)
    groups: tuple[LayerGroup, ...]
    level: str
    # Where the rule was written (messages only; not part of what the rule means).
    line: int = field(default=0, compare=False)
    written: str = field(default="", compare=False)
    origin: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        at = f"line {self.line}" + (f" of {self.origin}" if self.origin else "")
        return f"{at} ('{_shown(self.written or self.text(), 80)}')"

    def text(self) -> str:
        parts = [", ".join(f"{_num(a)}-{_num(b)}%" for a, b in self.windows)] if self.windows else []
        parts += [", ".join(g.text() for g in self.groups)] if self.groups else []
        return f"{' '.join(parts) or 'all'}: {self.level}"


@dataclass(frozen=True)
class Schedule:
    rules: tuple[Rule, ...]

    @property
    def text(self) -> str:
        """Canonical form: one rule per line; parses back to an equal schedule."""
        return "\n".join(r.text() for r in self.rules)

    @property
    def levels(self) -> set[str]:
        return {r.level for r in self.rules}

    def bind(self, percent_to_sigma: Callable[[float], float] | None) -> "BoundSchedule":
        """Turn percent windows into sigma windows with the model's own mapping (None: the
        model has no mapping, so windowed rules count as 'not known')."""
        return BoundSchedule(self, percent_to_sigma)

    def unmatched(self, layers) -> list[Rule]:
        """Rules whose layer selector matches none of `layers` (the LayerPositions of one
        whole model evaluation): they can never apply to that model."""
        return [rule for rule in self.rules
                if rule.groups and not any(_layers_match(rule.groups, pos) is not False for pos in layers)]

    def __add__(self, other: "Schedule") -> "Schedule":
        return Schedule(self.rules + other.rules)


class BoundSchedule:
    """A schedule with its windows in sigmas of one model; answers level questions."""

    def __init__(self, schedule: Schedule, percent_to_sigma: Callable[[float], float] | None):
        self.schedule = schedule
        cache: dict[float, float] = {}

        def sigma_at(percent: float) -> float:
            if percent not in cache:
                cache[percent] = float(percent_to_sigma(percent / 100.0))
            return cache[percent]

        self._windows = [
            None if percent_to_sigma is None and rule.windows
            else tuple((sigma_at(a), sigma_at(b), b >= 100.0) for a, b in rule.windows)
            for rule in schedule.rules
        ]

    def level(self, sigma: float | None, pos, base: str) -> str:
        """Level for one layer at one sigma. Where the answer depends on something not yet
        known (a `last N` rule before the layer count is learned, no sigma), the most
        accurate of the possible levels wins."""
        possible = {base}
        for rule, windows in zip(self.schedule.rules, self._windows):
            m = _all3((_in_windows(sigma, windows), _layers_match(rule.groups, pos)))
            if m is True:
                possible = {rule.level}
            elif m is None:
                possible = possible | {rule.level}
        return possible.pop() if len(possible) == 1 else most_accurate(possible)


def _in_windows(sigma, windows) -> bool | None:
    if windows is None or (windows and sigma is None):
        return None
    if not windows:
        return True
    return any(sigma <= hi and (sigma > lo or (to_end and sigma >= lo)) for hi, lo, to_end in windows)


def _layers_match(groups, pos) -> bool | None:
    if not groups:
        return True
    return _any3(g.matches(pos) for g in groups)


def _any3(values) -> bool | None:
    values = list(values)
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def _all3(values) -> bool | None:
    values = list(values)
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _num(x: float) -> str:
    return f"{x:g}"


# ---------------------------------------------------------------------------------------
# Parsing

_TOKEN = re.compile(
    r"(?P<window>\d+(?:\.\d+)?\s*%?\s*-\s*\d+(?:\.\d+)?\s*%)"
    r"|(?P<range>\d+\s*-\s*\d+)(?![\d.%])"
    r"|(?P<number>\d+)(?![\d.%])"
    r"|(?P<word>[A-Za-z_]+)"
    r"|(?P<sep>[\s,]+)"
    r"|(?P<lone_percent>\d+(?:\.\d+)?\s*%)"
    r"|(?P<decimal>\d+\.\d*)"
)


# Layer numbers longer than this are refused with a clear message (Python refuses to
# convert integers of more than 4300 digits, and no model has a billion layers).
MAX_NUMBER_DIGITS = 9


def parse(text: str, origin: str = "") -> Schedule:
    """Parse schedule text; raise ScheduleError naming the line, column and fix of every
    bad rule. `origin` says where the text came from (shown in later messages)."""
    rules, errors = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        start = 0
        for piece in code.split(";"):
            if piece.strip():
                try:
                    rules.append(_parse_rule(piece, line, line_no, start, origin))
                except ScheduleError as e:
                    errors.append(str(e))
            start += len(piece) + 1
    if errors:
        raise ScheduleError("\n".join(errors))
    return Schedule(tuple(rules))


def _shown(text: str, limit: int = 24) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(line: str, line_no: int, col: int, message: str) -> ScheduleError:
    # No caret under the column: ComfyUI shows errors centred in a proportional font.
    near = _shown(line.split("#", 1)[0][col:])
    where = f"near '{near}'" if near else "at the end of the line"
    return ScheduleError(f"schedule line {line_no}, column {col + 1}, {where}: {message}")


def _parse_rule(piece: str, line: str, line_no: int, offset: int, origin: str) -> Rule:
    fail = lambda col, msg: _error(line, line_no, offset + col, msg)  # noqa: E731
    if ":" not in piece:
        lead = len(piece) - len(piece.lstrip())
        raise fail(lead, "missing ':' between the selector and the level (e.g. '0-20%: int8+fp16')")
    colon = piece.index(":")
    if ":" in piece[colon + 1 :]:
        raise fail(piece.index(":", colon + 1), "only one ':' per rule; separate rules with ';' or a new line")
    level = re.sub(r"\s+", "", piece[colon + 1 :]).lower()
    if level not in SCHEDULE_LEVELS:
        col = colon + 1 + (len(piece[colon + 1 :]) - len(piece[colon + 1 :].lstrip()))
        shown = piece[colon + 1 :].strip() or "nothing"
        if level == EXACT + ROTATED:
            raise fail(col, f"exact attention quantizes nothing, so '{ROTATED}' has nothing to rotate; write 'exact'")
        raise fail(col, f"unknown precision level '{_shown(shown)}'; expected one of {', '.join(LEVELS)} "
                        f"(any but exact may end in '{ROTATED}': Q and K rotated)")
    windows, groups = _parse_selector(piece[:colon], fail)
    return Rule(tuple(windows), tuple(groups), level, line_no, piece.strip(), origin)


def _parse_selector(sel: str, fail):
    windows: list[tuple[float, float]] = []
    groups: list[tuple[str, list[LayerItem]]] = []
    saw_all = None
    pos = 0
    pending_word = None  # ("first"|"last", column) waiting for its number
    while pos < len(sel):
        m = _TOKEN.match(sel, pos)
        if m is None:
            raise fail(pos, f"unexpected {sel[pos]!r}; a selector is made of windows like '20-90%' and "
                            "layers like 'double 0-3' or 'blocks first 2'")
        kind, value, col = m.lastgroup, m.group(), pos
        pos = m.end()
        if kind == "sep":
            continue
        shown = _shown(value)
        if kind in ("number", "range") and any(len(d) > MAX_NUMBER_DIGITS for d in re.findall(r"\d+", value)):
            raise fail(col, f"layer number '{shown}' is too large (at most {MAX_NUMBER_DIGITS} digits)")
        if kind == "lone_percent":
            raise fail(col, f"time window '{shown}' needs a start and an end, e.g. '0-{shown}'")
        if kind == "decimal":
            raise fail(col, f"layer numbers are whole numbers, got '{shown}'; time windows end with '%'")
        if pending_word is not None and kind != "number":
            raise fail(pending_word[1], f"'{pending_word[0]}' needs a count after it, e.g. '{pending_word[0]} 2'")
        if kind == "window":
            a, b = (float(x) for x in re.findall(r"\d+(?:\.\d+)?", value))
            if not (0.0 <= a < b <= 100.0):
                raise fail(col, f"time window '{shown}' must satisfy 0 <= start < end <= 100")
            windows.append((a, b))
        elif kind == "word":
            word = value.lower()
            if word not in _WORDS:
                raise fail(col, f"unknown word '{shown}'; expected a layer kind ({', '.join(LAYER_KINDS)}), "
                                "'first N', 'last N', or 'all'")
            if word == "all":
                saw_all = col
            elif word in LAYER_KINDS:
                groups.append((word, []))
            else:
                if not groups:
                    raise fail(col, f"'{word}' needs a layer kind before it, e.g. 'blocks {word} 2'")
                pending_word = (word, col)
        else:  # number or range
            if pending_word is not None:
                n = int(value)
                if n < 1:
                    raise fail(col, f"'{pending_word[0]} {n}' selects nothing; use a count of at least 1")
                groups[-1][1].append(LayerItem(pending_word[0], n))
                pending_word = None
                continue
            if not groups:
                raise fail(col, f"layer number '{shown}' needs a layer kind before it, e.g. 'double {shown}' "
                                f"or 'blocks {shown}'; time windows end with '%'")
            if kind == "range":
                a, b = (int(x) for x in re.findall(r"\d+", value))
                if a > b:
                    raise fail(col, f"layer range '{shown}' runs backwards; write '{b}-{a}'")
                groups[-1][1].append(LayerItem("range", a, b))
            else:
                groups[-1][1].append(LayerItem("index", int(value)))
    if pending_word is not None:
        raise fail(pending_word[1], f"'{pending_word[0]}' needs a count after it, e.g. '{pending_word[0]} 2'")
    if saw_all is not None and (windows or groups):
        raise fail(saw_all, "'all' stands alone; leave it out to combine windows and layers")
    if saw_all is None and not windows and not groups:
        raise fail(0, "nothing before ':'; write 'all: <level>' to set every layer and step")
    return windows, [LayerGroup(k, tuple(items)) for k, items in groups]
