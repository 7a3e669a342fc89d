"""Which attention layer a call belongs to, from what the model writes into
transformer_options during its forward (no ComfyUI imports).

- DiTs (Flux, Chroma, HunyuanVideo, WAN, Qwen-Image, Lumina...): `block_type` ("double" /
  "single") and `block_index`; `total_blocks` is the count of the current block type.
- SD1.x/SD2/SDXL UNet: `block` = ("input" | "middle" | "output", id) and `block_index`
  inside a SpatialTransformer.
- Everything else (SD3, LTXV, Mochi, HiDream...): nothing, so the position is the number
  of the attention call within the forward, counted by `ForwardState`.

One `ForwardState` lives in the per-call transformer_options dict for one model
evaluation (the APPLY_MODEL wrapper puts it there); `LayerMemory` keeps, per patched model,
the layer counts seen in completed forwards so that `last N` rules can be answered.
"""
from __future__ import annotations

from dataclasses import dataclass

FORWARD_KEY = "sageattn2_forward"
DIT_KINDS = ("double", "single")


@dataclass(frozen=True)
class LayerPosition:
    kind: str | None  # "double", "single", "input", "middle", "output"; None: model sets no keys
    index: int  # block_index for DiT kinds; order of appearance within the kind otherwise
    kind_total: int | None
    block: int  # order of appearance among all attention layers of this forward
    block_total: int | None

    @property
    def name(self) -> str:
        """How schedules and calibration files name this layer ('double 3', 'blocks 17')."""
        return f"{self.kind} {self.index}" if self.kind else f"blocks {self.block}"


def layer_key(to: dict, call_index: int) -> tuple:
    """A hashable identity of the layer making this call (same for its self and cross
    attention calls where the model labels its blocks)."""
    block_type, block_index = to.get("block_type"), to.get("block_index")
    if block_type is not None and block_index is not None:
        return (str(block_type), int(block_index))
    block = to.get("block")
    if block is not None:
        return (str(block[0]), int(block[1]), int(block_index or 0))
    return ("call", call_index)


class LayerMemory:
    """Layer counts of the last completed forward of one patched model."""

    def __init__(self):
        self.block_total: int | None = None
        self.kind_totals: dict[str, int] = {}

    def learn(self, forward: "ForwardState") -> None:
        if forward.calls == 0:
            return
        self.block_total = len(forward.blocks)
        for kind, keys in forward.kind_keys.items():
            self.kind_totals[kind] = (max(k[1] for k in keys) + 1) if kind in DIT_KINDS else len(keys)


class ForwardState:
    """Per model evaluation: sigma, call counter, layer order, per-layer level cache, where
    the quantized outputs are checked and `auto`'s decision for this input."""

    def __init__(self, sigma: float | None, sigmas_ref=None, deferred_check: bool = False):
        self.sigma = sigma
        self.sigmas_ref = sigmas_ref  # the transformer_options["sigmas"] object it was made for
        # True when made by our APPLY_MODEL wrapper, which collects the quantized outputs in
        # `outputs` (a FiniteCheck: the evaluation's, or the whole sampling run's); False: made
        # on the fly, outputs are checked call by call.
        self.deferred_check = deferred_check
        self.step: int | None = None  # sampling step (calibration only)
        self.calls = 0
        self.blocks: dict[tuple, int] = {}
        self.kind_keys: dict[str, dict[tuple, int]] = {}
        self.levels: dict[tuple, str] = {}
        self.outputs = None  # nodes.finite.FiniteCheck when deferred_check
        self.auto = None  # nodes.race.InputDecision: `auto` routes and times calls by it
        self.exact = False  # every call of this forward goes to stock attention
        # id(mask) -> kept key count (or None): one host read per mask per forward. Masks are
        # alive for the whole forward, so their ids cannot be reused meanwhile.
        self.key_padding: dict[int, int | None] = {}

    def position(self, to: dict, memory: LayerMemory) -> tuple[tuple, LayerPosition]:
        key = layer_key(to, self.calls)
        self.calls += 1
        block = self.blocks.setdefault(key, len(self.blocks))
        if key[0] != "call":
            in_kind = self.kind_keys.setdefault(key[0], {})
            in_kind.setdefault(key, len(in_kind))
        total = to.get("total_blocks") if key[0] in DIT_KINDS else None
        return key, self._position(key, block, memory, None if total is None else int(total))

    def layers(self, memory: LayerMemory) -> list[LayerPosition]:
        """Every layer this forward ran, with the counts `memory` has learned."""
        return [self._position(key, block, memory) for key, block in self.blocks.items()]

    def _position(self, key: tuple, block: int, memory: LayerMemory, kind_total: int | None = None) -> LayerPosition:
        kind = key[0]
        if kind == "call":
            return LayerPosition(None, block, None, block, memory.block_total)
        if kind_total is None:
            kind_total = memory.kind_totals.get(kind)
        index = key[1] if kind in DIT_KINDS else self.kind_keys[kind][key]
        return LayerPosition(kind, index, kind_total, block, memory.block_total)


def layers_text(names: list[str]) -> str:
    """['double 0', 'double 1', 'double 2', 'single 5'] -> 'double 0-2, single 5'."""
    groups: dict[str, list[int]] = {}
    for name in names:
        kind, index = name.rsplit(" ", 1)
        groups.setdefault(kind, []).append(int(index))
    parts = []
    for kind, indices in groups.items():
        indices = sorted(set(indices))
        runs, start = [], indices[0]
        for prev, cur in zip(indices, indices[1:] + [None]):
            if cur != prev + 1:
                runs.append(f"{start}-{prev}" if prev != start else f"{start}")
                start = cur
        parts.append(f"{kind} {', '.join(runs)}")
    return ", ".join(parts)


def step_of(sample_sigmas: list[float], sigma: float) -> int:
    """Index of the sampling step a model evaluation at `sigma` belongs to: the last i with
    sample_sigmas[i] >= sigma (robust for samplers that evaluate between steps)."""
    tol = 1e-4 * max(abs(sigma), 1e-8)
    step = 0
    for i, s in enumerate(sample_sigmas[:-1] if len(sample_sigmas) > 1 else sample_sigmas):
        if s >= sigma - tol:
            step = i
    return step
