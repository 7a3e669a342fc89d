"""End-to-end speed inside ComfyUI: full-width slices of real architectures (random weights)
built through ComfyUI's own classes, timed with stock attention and with our patch node.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_e2e.py [--models wan14b,flux] [--out FILE]

Each row: the diffusion model's forward (BaseModel.apply_model, bf16, transformer_options as
the sampler builds them, median of --iters pairs after 2 warm-ups), speed-up against stock (stock
and the variant alternate, the speed-up is the median of the per-pair ratios), the same
timed back to back as a sampler runs it ("in a row": alternating blocks of one side's
forwards, see in_a_row), cosine of the output against stock. `auto` rows name
auto's verdict (nodes/race.py); a thu-ml row appears when `sageattention` is importable
(ComfyUI's own sage path). "no attention" replaces attention with zeros to show how much of
the forward attention takes. A second table breaks our attention path down per CUDA kernel
(torch.profiler): the quantization
passes against the attention kernel itself, the overhead budget of issue #6.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "comfy"))
sys.path.insert(0, str(REPO / "tests"))
from comfy_env import comfyui_path, setup  # noqa: E402

LEVELS = ["int8+fp16", "int8+fp8", "int4+fp8", "auto"]


def fill_(model, seed=0):
    """Random weights that keep activations O(1): N(0, 1/fan_in) matrices, unit norms."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            # Drawn where the weight lives: billions of CPU random numbers would take minutes.
            g = torch.Generator(device=p.device).manual_seed(seed + i)
            r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if p.dim() > 1:
                p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
            else:
                base = 1.0 if ("norm" in name or "scale" in name) else 0.0
                p.copy_(r * 0.02 + base)


def build(name: str, device):
    """(label, BaseModel, apply_model kwargs) for one slice."""
    import comfy.supported_models as sm

    rnd = lambda *s: torch.randn(*s, generator=torch.Generator().manual_seed(7)).to(device, torch.bfloat16)
    if name in ("wan14b", "wan1.3b"):
        dim, heads, ffn = (5120, 40, 13824) if name == "wan14b" else (1536, 12, 8960)
        cfg = sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "dim": dim, "num_heads": heads,
                            "ffn_dim": ffn, "num_layers": 2, "in_dim": 16, "out_dim": 16, "text_dim": 4096,
                            "freq_dim": 256, "text_len": 512})
        label = f"WAN 2.1 {'14B' if name == 'wan14b' else '1.3B'} shape, 2 blocks, 480p x 81f (32,760 tokens)"
        kw = dict(x=rnd(1, 16, 21, 60, 104), t=torch.tensor([0.7], device=device), c_crossattn=rnd(1, 512, 4096))
    elif name == "flux":
        cfg = sm.Flux({"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
                       "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2,
                       "depth_single_blocks": 4, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
                       "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": []})
        label = "Flux-dev shape, 2 double + 4 single blocks, 1024² (4,608 tokens)"
        kw = dict(x=rnd(1, 16, 128, 128), t=torch.tensor([0.7], device=device), c_crossattn=rnd(1, 512, 4096),
                  y=rnd(1, 768), guidance=torch.tensor([3.5], device=device))
    elif name == "hunyuan":
        cfg = sm.HunyuanVideo({"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
                               "patch_size": [1, 2, 2], "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False,
                               "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
                               "depth": 2, "depth_single_blocks": 2, "theta": 256, "qkv_bias": True, "byt5": False,
                               "guidance_embed": True, "use_cond_type_embedding": False, "vision_in_dim": None,
                               "meanflow_sum": False})
        label = ("HunyuanVideo shape, 2 double + 2 single blocks, 720p x 129f (118,800 + 256 tokens, "
                 "56 of them text padding: a key-padding mask on every call, as with real prompts)")
        text_mask = torch.ones(1, 256, dtype=torch.long, device=device)
        text_mask[:, 200:] = 0
        kw = dict(x=rnd(1, 16, 33, 90, 160), t=torch.tensor([0.7], device=device), c_crossattn=rnd(1, 256, 4096),
                  y=rnd(1, 768), guidance=torch.tensor([6.0], device=device), attention_mask=text_mask)
    elif name == "sdxl":
        cfg = sm.SDXL({"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                       "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
                       "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
                       "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
                       "context_dim": 2048, "num_head_channels": 64,
                       "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                       "use_temporal_attention": False, "use_temporal_resblock": False})
        label = "SDXL, full UNet, 1024² (4,096 + 1,024 tokens; text 77)"
        kw = dict(x=rnd(2, 4, 128, 128), t=torch.tensor([5.0, 5.0], device=device), c_crossattn=rnd(2, 77, 2048),
                  y=rnd(2, 2816))
    else:
        raise ValueError(f"unknown model {name!r}")
    cfg.set_inference_dtype(torch.bfloat16, None)
    model = cfg.get_model({}, device=device)
    model.to(device)
    fill_(model)
    return label, model, kw


def zero_attention(func, q, k, v, heads, *args, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """An override that skips attention: zeros shaped like ComfyUI's expected output."""
    if skip_reshape:  # (B, H, L, D) in
        b, h, n, d = q.shape
        shape = (b, h, n, d) if skip_output_reshape else (b, n, h * d)
    else:  # (B, L, H*D) in
        shape = q.shape
    return torch.zeros(shape, dtype=q.dtype, device=q.device)


def sampler_options(patcher) -> dict:
    """transformer_options as ComfyUI's sampler hands them to apply_model: the patcher's
    wrappers and callbacks merged in (comfy.sampler_helpers.prepare_model_patcher). Without
    them the node's APPLY_MODEL wrapper never runs: no per-input decision for `auto`, and the
    non-finite check falls back to one host synchronisation per attention call."""
    import comfy.patcher_extension as ext

    to = dict(patcher.model_options["transformer_options"])
    to["wrappers"] = ext.merge_nested_dicts(to.get("wrappers", {}), patcher.wrappers)
    to["callbacks"] = ext.merge_nested_dicts(to.get("callbacks", {}), patcher.callbacks)
    return to


def forward_fn(model, kw, override=None, extra_options=None):
    def run():
        to = dict(extra_options or {})
        to["sigmas"] = kw["t"]  # as comfy.samplers._calc_cond_batch sets it
        if override is not None:
            to["optimized_attention_override"] = override
        with torch.no_grad():
            return model.apply_model(kw["x"], kw["t"], c_crossattn=kw["c_crossattn"], transformer_options=to,
                                     **{k: v for k, v in kw.items() if k not in ("x", "t", "c_crossattn")})
    return run


def _once_ms(fn):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def paired_ms(stock, fn, iters, warmups=2):
    """(stock ms, fn ms, speed-up): the two alternate, so drift over the row (clocks, allocator,
    Python's garbage collector, CPU-bound launch queues) hits both; the speed-up is the median
    of the per-pair ratios."""
    for _ in range(warmups):
        stock(), fn()
    torch.cuda.synchronize()
    pairs = [(_once_ms(stock), _once_ms(fn)) for _ in range(iters)]
    return (_median([a for a, _ in pairs]), _median([b for _, b in pairs]),
            _median([a / b for a, b in pairs]))


def thuml_override():
    """ComfyUI's own sage path (comfy.ldm.modules.attention.attention_sage, what
    --use-sage-attention selects) as an override; None when thu-ml sageattention is not
    importable."""
    import comfy.ldm.modules.attention as attention

    if not getattr(attention, "SAGE_ATTENTION_IS_AVAILABLE", False):
        return None
    return lambda func, *args, **kwargs: attention.attention_sage(*args, **kwargs)


def in_a_row(stock, fn, iters, rounds=2):
    """(fn ms, speed-up) with each side run back to back as a sampler runs it: blocks of
    `iters` forwards of stock, then of fn, `rounds` times; ms = median of fn's forwards, the
    speed-up = median over the rounds of (stock block median / fn block median). Blocks keep
    what alternating every forward hides from neither side (warm allocator and caches of one
    path), and adjacent blocks still share the card's drift."""
    def block(f):
        f()
        torch.cuda.synchronize()
        return [_once_ms(f) for _ in range(iters)]
    times, ratios = [], []
    for _ in range(rounds):
        s, v = block(stock), block(fn)
        times += v
        ratios.append(_median(s) / _median(v))
    return _median(times), _median(ratios)


def host_syncs(fn) -> list[str]:
    """Where one forward makes the host wait for the GPU (torch's sync debug mode): each
    synchronisation mid-forward leaves the GPU idle while the host refills the queue."""
    import warnings

    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [str(w.message).splitlines()[0][:160] + f" ({w.filename}:{w.lineno})" for w in caught]


def host_profile(fn, top=15) -> str:
    """cProfile of one call: where the CPU time of a forward goes (CPU-bound models)."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def stage_breakdown(fn) -> dict[str, float]:
    """CUDA time per kernel group of one forward: ours (quant / attention), the rest."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not us or evt.key.startswith("ProfilerStep"):
            continue
        key = evt.key.lower()
        if "quantize_" in key or "smooth_v16" in key:  # csrc/include/sa2/quant_kernels.cuh
            group = "ours: quantization"
        elif "attn_mma_kernel" in key or "attn_wgmma" in key or "sa2::" in key:
            group = "ours: attention kernel"
        elif "flash" in key or "fmha" in key or "cudnn" in key or "attention" in key:
            group = "stock attention"
        else:
            group = "everything else"
        groups[group] = groups.get(group, 0.0) + us / 1000
    return groups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="wan14b,wan1.3b,flux,sdxl,hunyuan")
    ap.add_argument("--iters", type=int, default=None,
                    help="pairs per row (default: about 1.5 s of stock forwards, 5 to 60)")
    ap.add_argument("--levels", default=",".join(LEVELS), help="patch-node levels to time")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--syncs", action="store_true",
                    help="list the host synchronisations of one forward per variant")
    ap.add_argument("--host-profile", action="store_true",
                    help="print a cProfile of one stock and one int8+fp8 forward per model")
    args = ap.parse_args(argv)
    if not comfyui_path() or not torch.cuda.is_available():
        print("needs COMFYUI_PATH and a CUDA GPU")
        return 2
    setup(comfyui_path(), cpu=False)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("sageattn2").setLevel(logging.INFO)  # the node's one-line notes
    sys.path.insert(0, str(REPO / "tests"))
    from test_nodes_support import load_pack

    load_pack()
    from sageattn2_pack.nodes import override as ov
    from sageattn2_pack.nodes.race import WINDOW as AUTO_SAMPLES  # the most a signature takes
    import comfy.model_patcher

    device = torch.device("cuda")
    lines = []
    say = lambda s="": (print(s, flush=True), lines.append(s))
    commit = os.environ.get("SAGEATTN2_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    say(f"# End to end in ComfyUI: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"{datetime.date.today()}, commit {commit or 'unknown'}")
    say()
    say("| model slice | variant | ms | vs stock | in a row: ms, vs stock | cosine vs stock |")
    say("|---|---|---|---|---|---|")
    breakdowns = []
    for name in args.models.split(","):
        label, model, kw = build(name, device)
        stock = forward_fn(model, kw)
        ref = stock().float()
        rows = []
        # Host-bound slices (Flux, SDXL) have bimodal forward times: 5 pairs left Flux's `auto`
        # row 1 % either side of stock from run to run, 60 pairs settle it (session 6, run 7).
        iters = args.iters or max(5, min(60, round(1500 / max(_once_ms(stock), 1e-3))))
        zero = forward_fn(model, kw, override=zero_attention)
        t_stock, t_zero, _ = paired_ms(stock, zero, iters)
        # Blocks of back-to-back forwards take long on the largest slices: fewer there.
        row_iters, rounds = (iters, 2) if t_stock < 500 else (2, 1)
        if args.syncs:
            print(f"== host syncs, {label}, stock:", *host_syncs(stock), sep="\n  ")

        def timed_cells(fn, warmups=2):
            """A row's cells after its name: the forward alternating with stock, then in blocks."""
            out = fn().float()
            _, t, speedup = paired_ms(stock, fn, iters, warmups)
            row_t, row_speedup = in_a_row(stock, fn, row_iters, rounds)
            return f"{t:.1f} | {speedup:.2f}x | {row_t:.1f}, {row_speedup:.2f}x | {cosine(out, ref):.6f} |"

        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
        for level in args.levels.split(","):
            # Exactly what the node installs: override, APPLY_MODEL wrapper, callbacks.
            state = ov.PatchState(ov.PatchSettings(precision=level, min_seq_len=0))
            patched = ov.install(patcher, state)
            fn = forward_fn(model, kw, extra_options=sampler_options(patched))
            # auto's first evaluations time stock against Sage Attention (nodes/race.py): time
            # what it settles on (a signature with one call per forward needs up to 2 x (WINDOW + 1)).
            cells = timed_cells(fn, 2 + (2 * (AUTO_SAMPLES + 1) if level == "auto" else 0))
            verdicts = sorted(f"{n}x {k[1]}" for k, n in state.stats.items()
                              if isinstance(k, tuple) and k[0] == "auto model")
            note = f" (auto verdict: {', '.join(verdicts)})" if verdicts else ""
            rows.append(f"| | patch node, {level}{note} | {cells}")
            if args.syncs:
                print(f"== host syncs, {label}, {level}:", *host_syncs(fn), sep="\n  ")
            if level == "int8+fp8":
                breakdowns.append((label, stage_breakdown(fn)))
                if args.host_profile:
                    print(f"== host profile, {label}: stock\n{host_profile(stock)}")
                    print(f"== host profile, {label}: int8+fp8\n{host_profile(fn)}")
        thuml = thuml_override()
        if thuml is not None:
            rows.append(f"| | thu-ml sageattention (ComfyUI's sage path) | {timed_cells(forward_fn(model, kw, override=thuml))}")
        say(f"| {label} | stock | {t_stock:.1f} | 1.00x | | 1.000000 |")
        say(f"| | no attention (zeros) | {t_zero:.1f} | | | |")
        for row in rows:
            say(row)
        del model
        torch.cuda.empty_cache()
    say()
    say("Per-kernel CUDA time of one forward with int8+fp8 (torch.profiler, ms):")
    say()
    say("| model slice | ours: quantization | ours: attention kernel | overhead / kernel | stock attention | everything else |")
    say("|---|---|---|---|---|---|")
    for label, g in breakdowns:
        q, a = g.get("ours: quantization", 0.0), g.get("ours: attention kernel", 0.0)
        ratio = f"{100 * q / a:.1f}%" if a else "n/a"
        say(f"| {label} | {q:.2f} | {a:.2f} | {ratio} | {g.get('stock attention', 0.0):.2f} | {g.get('everything else', 0.0):.2f} |")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
