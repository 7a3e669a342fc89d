"""Chooses who serves an attention call: a CUDA kernel family, the reference, or exact SDPA.

Every reason for not running the requested quantized path is logged once (per reason),
never raised: unsupported input always has exact attention to fall back on.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

from . import archs, loader
from .config import (
    MAX_HEAD_DIM,
    AttnConfig,
    Family,
    Granularity,
    PVAccum,
    PVDType,
    QKDType,
    default_smooth_q,
    parse_precision,
)

log = logging.getLogger("sageattn2")
_logged: set[str] = set()

BACKENDS = ("auto", "cuda", "reference", "exact")


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log `message` the first time it is seen in this process."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, "[sageattn2] %s", message)


@dataclass(frozen=True)
class Plan:
    backend: str  # "wgmma" | "mma" | "reference" | "exact"
    cfg: AttnConfig | None  # None for exact
    force_int4_emulation: bool = False
    note: str | None = None  # why the request was changed or declined (already logged)


def default_precision(capability: tuple[int, int]) -> str:
    """What `auto` means on a GPU (sageattn2/archs.py)."""
    arch = archs.arch(*capability)
    return archs.default_precision(arch) if arch else "int8+fp16"


def default_pv_accum(capability: tuple[int, int], pv_dtype: PVDType) -> PVAccum:
    """The mma family's P.V accumulator where the caller did not choose one (sageattn2/archs.py)."""
    arch = archs.arch(*capability)
    if pv_dtype is PVDType.FP8 and arch is not None and arch.fp8_pv_fp16_accum:
        return PVAccum.FP16
    return PVAccum.FP32


def backend_module(name: str):
    """The module of kernel family `name` ("wgmma", "mma"), imported on first use."""
    mod = _backend_modules.get(name)
    if mod is None:
        mod = _backend_modules[name] = importlib.import_module(f".backends.{'wgmma' if name == 'wgmma' else 'mma'}",
                                                               __package__)
    return mod


_backend_modules: dict = {}


def _exact(note: str | None) -> Plan:
    if note:
        log_once(f"exact attention: {note}")
    return Plan("exact", None, note=note)


def _resolve_config(precision, granularity, smooth_k, smooth_q, smooth_v, family, hadamard) -> AttnConfig:
    qk, pv = parse_precision(precision)
    return AttnConfig(
        qk_dtype=qk,
        pv_dtype=pv,
        granularity=Granularity(granularity),
        smooth_k=smooth_k,
        smooth_q=default_smooth_q(qk) if smooth_q is None else smooth_q,
        smooth_v=smooth_v,
        family=family,
        hadamard=hadamard,
    )


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str,
    precision: str,
    granularity: str,
    smooth_k: bool,
    smooth_q: bool | None,
    smooth_v: bool,
    is_causal: bool,
    backend: str = "auto",
    force_int4_emulation: bool = False,
    hadamard: bool = False,
) -> Plan:
    """Arguments are assumed validated (api.py). Cached per shape and options: a diffusion
    model makes the same few calls thousands of times, and planning must cost ~nothing.
    `hadamard`: Q and K rotated inside the quantizer (numerics.md §1.6); every family and the
    reference serve it at every head dim they serve, and exact attention has nothing to rotate."""
    key = (q.device, q.dtype, tuple(q.shape), tuple(k.shape), q.stride(-1), k.stride(-1), v.stride(-1),
           layout, precision, granularity, smooth_k, smooth_q, smooth_v, is_causal, backend, force_int4_emulation,
           hadamard)
    cached = _plans.get(key)
    if cached is None:
        if len(_plans) > 4096:
            _plans.clear()
        cached = _plans[key] = _plan_uncached(
            q, k, v, layout=layout, precision=precision, granularity=granularity, smooth_k=smooth_k,
            smooth_q=smooth_q, smooth_v=smooth_v, is_causal=is_causal, backend=backend,
            force_int4_emulation=force_int4_emulation, hadamard=hadamard,
        )
    return cached


_plans: dict[tuple, Plan] = {}


def _plan_uncached(q, k, v, *, layout, precision, granularity, smooth_k, smooth_q, smooth_v, is_causal,
                   backend, force_int4_emulation, hadamard) -> Plan:
    if precision == "exact" or backend == "exact":
        return Plan("exact", None)
    if backend == "reference":
        p = "int8+fp8" if precision == "auto" else precision
        return Plan("reference", _resolve_config(p, granularity, smooth_k, smooth_q, smooth_v, Family.MMA, hadamard))

    if q.device.type != "cuda":
        return _exact(f"{q.device.type} tensors have no quantized kernel")
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return _exact(f"head dim {head_dim} > {MAX_HEAD_DIM}")

    lib, why = loader.kernels_for_device(q.device)
    if lib is None:
        return _exact(why)

    capability = loader.capability(q.device)
    return plan_for_library(
        q, k, v, lib, capability, layout=layout, precision=precision, granularity=granularity,
        smooth_k=smooth_k, smooth_q=smooth_q, smooth_v=smooth_v, is_causal=is_causal,
        force_int4_emulation=force_int4_emulation, hadamard=hadamard,
    )


def plan_for_library(
    q, k, v, lib, capability: tuple[int, int], *, layout, precision, granularity, smooth_k, smooth_q,
    smooth_v, is_causal, force_int4_emulation=False, hadamard=False,
) -> Plan:
    """The GPU part of `plan`: which family of `lib` (the device's kernels: `tag`, `families`)
    serves this call, at which precision; what the arch can do comes from sageattn2/archs.py."""
    arch = archs.arch(*capability)
    if precision == "auto":
        precision = default_precision(capability)
    cfg = _resolve_config(precision, granularity, smooth_k, smooth_q, smooth_v, Family.MMA, hadamard)

    if cfg.pv_dtype is PVDType.FP8 and not arch.fp8_mma:
        log_once(f"{lib.tag} has no FP8 tensor cores: running {cfg.qk_dtype.value}+fp16 instead of +fp8")
        cfg = cfg.with_(pv_dtype=PVDType.FP16)
    if cfg.qk_dtype is QKDType.INT4 and not arch.int4_mma and not force_int4_emulation:
        log_once(f"{lib.tag} has no INT4 tensor cores: running INT8 QK for int4 requests")
        # Q smoothing was on only because INT4 defaults to it; INT8 does not need it, and
        # keeping it would bar the (faster) wgmma family, which does not implement it.
        cfg = cfg.with_(qk_dtype=QKDType.INT8, smooth_q=cfg.smooth_q if smooth_q is not None else False)
    if "wgmma" not in lib.families:  # pv_accum exists only in the mma family
        cfg = cfg.with_(pv_accum=default_pv_accum(capability, cfg.pv_dtype))

    reasons = []
    for family in lib.families:
        family_cfg = cfg.with_(family=Family(family))
        mod = backend_module(family)
        why = mod.unsupported_reason(q, k, v, layout=layout, cfg=family_cfg, is_causal=is_causal)
        if why is None:
            # The flag matters (and exists) only where INT4 QK runs: the mma family.
            return Plan(family, family_cfg, force_int4_emulation and family_cfg.qk_dtype is QKDType.INT4)
        reasons.append(f"{family}: {why}")
    return _exact("; ".join(reasons) or f"no kernel family in the {lib.tag} library")
