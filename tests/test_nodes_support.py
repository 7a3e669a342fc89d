"""Shared pieces of the node tests: loading the pack the way ComfyUI does, a small
stand-in for ModelPatcher, and a replica of ComfyUI's attention call path.

The stand-ins copy the semantics the nodes rely on from ComfyUI (January 2026 tree):
`ModelPatcher.clone` deep-copies `model_options` and copies the wrapper/callback lists;
`wrap_attn` marks the call with `_inside_attn_wrapper` in kwargs and hands it to
`transformer_options["optimized_attention_override"](func, *args, **kwargs)` with the
undecorated function; `_calc_cond_batch` builds a fresh transformer_options per model call
(model_options' dict merged with the patcher's wrappers, plus `sigmas`) and
`BaseModel.apply_model` runs the APPLY_MODEL wrappers around the forward. The tests at the
bottom check the stand-ins themselves.
"""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import pkgutil
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sageattn2

ROOT = Path(__file__).resolve().parents[1]
PACK = "sageattn2_pack"


def load_pack():
    """Import the repo root as a package (ComfyUI loads custom_nodes/<folder>/__init__.py
    this way). Its `sageattn2` subpackage and every module below it are the already imported
    `sageattn2` ones, so the core (its enums, caches and torch custom op) exists once in the
    test process. Aliasing only the package would not do: `from ..sageattn2 import autotune`
    would import a second copy of each submodule and rebind `sageattn2.config` & co. to it, and
    enums from the two copies never compare equal."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    for info in pkgutil.walk_packages(sageattn2.__path__, "sageattn2."):
        importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):
        if name == "sageattn2" or name.startswith("sageattn2."):
            sys.modules[f"{PACK}.{name}"] = module
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return pack


pack = load_pack()

# ---------------------------------------------------------------------------------------
# ModelPatcher stand-in


class FlowSampling:
    """ComfyUI's ModelSamplingDiscreteFlow.percent_to_sigma with shift (Flux/WAN/SD3)."""

    def __init__(self, shift=3.0):
        self.shift = shift

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        return self.shift * t / (1 + (self.shift - 1) * t)


class DiscreteSampling:
    """ComfyUI's ModelSamplingDiscrete (eps, SD1.x/SDXL linear-beta schedule)."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas = torch.cumprod(1 - betas, 0)
        self.log_sigmas = (((1 - alphas) / alphas) ** 0.5).log().float()

    def sigma(self, t):
        t = torch.clamp(t, 0, 999)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


class FakeModel:
    def __init__(self, model_sampling):
        self.model_sampling = model_sampling


class FakePatcher:
    """The part of ModelPatcher the nodes touch, with its copy semantics."""

    def __init__(self, model_sampling=None):
        self.model = FakeModel(model_sampling if model_sampling is not None else FlowSampling())
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict = {}
        self.callbacks: dict = {}

    def clone(self):
        n = FakePatcher.__new__(FakePatcher)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in self.wrappers.items()}
        n.callbacks = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in self.callbacks.items()}
        return n

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def add_callback_with_key(self, kind, key, fn):
        self.callbacks.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_callbacks_with_key(self, kind, key):
        self.callbacks.get(kind, {}).pop(key, None)

    def get_model_object(self, name):
        return getattr(self.model, name)

    def run_callbacks(self, kind):
        for fns in self.callbacks.get(kind, {}).values():
            for fn in fns:
                fn(self)


# ---------------------------------------------------------------------------------------
# ComfyUI's attention call path


def wrap_attn(func):
    """Same logic as comfy.ldm.modules.attention.wrap_attn."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        remove = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                to = kwargs.get("transformer_options", None)
                remove = True
                kwargs["_inside_attn_wrapper"] = True
                if to is not None and "optimized_attention_override" in to:
                    return to["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if remove:
                del kwargs["_inside_attn_wrapper"]

    return wrapper


class StockCalls:
    """Records what reached the stock function (the `func` of the override)."""

    def __init__(self):
        self.calls = []


STOCK = StockCalls()


def _stock(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """attention_pytorch's conventions (plus `scale`/`enable_gqa` of later upstream)."""
    STOCK.calls.append({"mask": mask, "kwargs": dict(kwargs), "skip_reshape": skip_reshape})
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, hd = q.shape
        d = hd // heads
        q = q.view(b, -1, heads, d).transpose(1, 2)
        k = k.view(b, -1, k.shape[-1] // d, d).transpose(1, 2)
        v = v.view(b, -1, v.shape[-1] // d, d).transpose(1, 2)
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=kwargs.get("scale"),
                                         enable_gqa=bool(kwargs.get("enable_gqa", False)))
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * d)
    return out


stock_attention = wrap_attn(_stock)


def exact_reference(q, k, v, heads, skip_reshape=False, scale=None):
    """float64 attention, output (B, L, H*D)."""
    if not skip_reshape:
        d = q.shape[-1] // heads
        q = q.unflatten(-1, (heads, d)).transpose(1, 2)
        k = k.unflatten(-1, (k.shape[-1] // d, d)).transpose(1, 2)
        v = v.unflatten(-1, (v.shape[-1] // d, d)).transpose(1, 2)
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    out = torch.softmax(s, -1) @ v
    return out.transpose(1, 2).flatten(2)


def outlier_tokens(b, n, h, d, gen, k_bias=0.0):
    """(B, N, H*D) activations with the outliers real models have: a per-channel bias
    (for K) and two Q channels eight times larger."""
    x = torch.randn(b, n, h, d, generator=gen)
    if k_bias:
        x = x + k_bias * torch.randn(1, 1, h, d, generator=gen)
    else:
        x[..., torch.randperm(d, generator=gen)[:2]] *= 8.0
    return x.flatten(2)


class TinyDiT:
    """A diffusion 'model' whose forward makes attention calls the way ComfyUI's models do:
    `blocks` per block type with block_type/block_index/total_blocks (keys=True), or
    nothing (keys=False, like SD3/LTXV). Each block: self-attention (NHD) + one
    cross-attention to a short context. `qk_outliers`: in every head, two Q channels x10 and
    two other K channels x20 (test_hadamard.outlier_qkv's outliers)."""

    def __init__(self, blocks=(("double", 2), ("single", 3)), keys=True, heads=2, dim=32, tokens=96,
                 context=16, seed=0, qk_outliers=False):
        gen = torch.Generator().manual_seed(seed)
        self.blocks, self.keys, self.heads, self.tokens = blocks, keys, heads, tokens
        self.w = {(kind, i): torch.randn(dim * heads, 3 * dim * heads, generator=gen) / math.sqrt(dim * heads)
                  for kind, n in blocks for i in range(n)}
        self.ctx = torch.randn(1, context, dim * heads, generator=gen)
        self.q_gain, self.k_gain = torch.ones(heads, dim), torch.ones(heads, dim)
        if qk_outliers:
            for h in range(heads):
                channels = torch.randperm(dim, generator=gen)[:4]
                self.q_gain[h, channels[:2]], self.k_gain[h, channels[2:]] = 10.0, 20.0
        self.q_gain, self.k_gain = self.q_gain.flatten(), self.k_gain.flatten()

    def forward(self, x, transformer_options):
        to = transformer_options
        for kind, n in self.blocks:
            if self.keys:
                to["block_type"], to["total_blocks"] = kind, n
            for i in range(n):
                if self.keys:
                    to["block_index"] = i
                q, k, v = (x @ self.w[(kind, i)]).chunk(3, dim=-1)
                q, k = q * self.q_gain, k * self.k_gain
                x = x + stock_attention(q, k, v, self.heads, transformer_options=to)
                x = x + stock_attention(q, self.ctx * self.k_gain, self.ctx, heads=self.heads, transformer_options=to)
                x = x / x.std()
        return x

    def attention_calls_per_forward(self):
        return 2 * sum(n for _, n in self.blocks)


def apply_model(patcher, model, x, sigma, sample_sigmas=None):
    """One model evaluation as _calc_cond_batch + BaseModel.apply_model do it."""
    to = copy.copy(patcher.model_options.get("transformer_options", {}))
    wrappers = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in to.get("wrappers", {}).items()}
    for kind, by_key in patcher.wrappers.items():
        for key, fns in by_key.items():
            wrappers.setdefault(kind, {}).setdefault(key, []).extend(fns)
    to["wrappers"] = wrappers
    to["sigmas"] = torch.tensor([sigma])
    to["cond_or_uncond"] = [0]
    if sample_sigmas is not None:
        to["sample_sigmas"] = sample_sigmas
    chain = [fn for fns in wrappers.get("apply_model", {}).values() for fn in fns]

    class Executor:
        def __init__(self, idx):
            self.idx, self.class_obj = idx, patcher.model

        def __call__(self, *args, **kwargs):
            return Executor(self.idx + 1).execute(*args, **kwargs)

        def execute(self, *args, **kwargs):
            if self.idx == len(chain):
                x_, t_, c_concat, c_crossattn, control, to_ = args
                return model.forward(x_, to_)
            return chain[self.idx](self, *args, **kwargs)

    return Executor(0).execute(x, to["sigmas"], None, None, None, to)


def sample(patcher, model, sigmas, seed=0):
    """A few Euler-like steps: one model evaluation per step at sigmas[i], with ON_PRE_RUN
    before and ON_CLEANUP after, as CFGGuider.outer_sample does."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, model.tokens, model.w[next(iter(model.w))].shape[0], generator=gen)
    sample_sigmas = torch.tensor(sigmas)
    patcher.run_callbacks("on_pre_run")
    try:
        # The input changes with sigma (as a latent does), so errors differ between steps.
        outs = [apply_model(patcher, model, x * (0.5 + s), s, sample_sigmas) for s in sigmas[:-1]]
    finally:
        patcher.run_callbacks("on_cleanup")
    return outs


# ---------------------------------------------------------------------------------------
# The stand-ins themselves


def test_clone_deep_copies_model_options_and_copies_hook_lists():
    p = FakePatcher()
    p.model_options["transformer_options"]["x"] = {"a": [1]}
    p.add_wrapper_with_key("apply_model", "k", len)
    c = p.clone()
    c.model_options["transformer_options"]["x"]["a"].append(2)
    c.add_wrapper_with_key("apply_model", "k", abs)
    assert p.model_options["transformer_options"]["x"] == {"a": [1]}
    assert p.wrappers["apply_model"]["k"] == [len] and c.wrappers["apply_model"]["k"] == [len, abs]
    assert c.model is p.model


def test_wrap_attn_replica_routes_to_override_with_the_undecorated_function():
    seen = {}

    def override(func, *args, **kwargs):
        seen["func"], seen["kwargs"] = func, dict(kwargs)
        return func(*args, **kwargs)

    q = torch.randn(1, 8, 16)
    out = stock_attention(q, q, q, 2, transformer_options={"optimized_attention_override": override})
    assert seen["func"] is _stock and seen["kwargs"]["_inside_attn_wrapper"] is True
    torch.testing.assert_close(out, exact_reference(q, q, q, 2).float())


def test_flow_and_discrete_percent_to_sigma_are_decreasing():
    for ms in (FlowSampling(3.0), DiscreteSampling()):
        values = [ms.percent_to_sigma(p / 20) for p in range(21)]
        assert all(a > b for a, b in zip(values, values[1:]))
    assert abs(DiscreteSampling().percent_to_sigma(1e-9) - 14.6146) < 1e-3
