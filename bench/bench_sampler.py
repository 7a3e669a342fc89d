"""Speed inside ComfyUI's own sampler: `comfy.sample.sample` on the slices bench_e2e.py builds
(random weights, bf16), stock against each precision level and `auto`, in fresh processes.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_sampler.py --slices flux,wan14b --processes 5 --out FILE

Driver (the default): runs --processes fresh worker processes one after another; each worker
runs every requested slice and writes JSON. The table gives, per slice and variant, the
sampler's speed-up against stock in each process (median over that process's timed rounds),
the forward-only speed-up measured in the same process (paired forwards through the same
wrappers, the finite check read once at the end as in a sampling run, wall clock, same batch
as the sampler's evaluations), their ratio (sampler / forward: 1.00 means the node loses
nothing in a sampler that it did not lose in a forward), the evaluations' own speed-up inside
the sampler (CUDA events around each, read after the run) and the run's rest (wall minus
evaluations: ComfyUI's per-run work; the stock row splits out load_models_gpu and gc), and for
`auto` its verdict in each process and how many processes disagree with the majority.

What a timing covers: one whole `comfy.sample.sample` call (model already on the GPU:
preparing conds, the sampler loop, every model evaluation, the node's wrappers), wall clock
with the GPU drained before and after. Within a worker, variants alternate every round
(stock, each level, auto; rotated each round) after --warmup rounds; `auto` keeps one patched
model for the whole process, as a ComfyUI session does, so its first (warm-up) runs decide
(repeated, up to 3 more times, until every input has a verdict) and the timed runs use the
verdict; its first run is reported apart ("first (deciding) run" against a warm stock run).

    --profile DIR   also one short sampler run per variant under torch.profiler: a Chrome
                    trace each, and a summary table (wall, GPU busy, GPU->host reads)
    --host-cost     no GPU, no ComfyUI: host µs per model evaluation and per attention call
                    of the node's path with a fake kernel, against the stock path (CPU)
    --budget S      start no process that would end past S seconds (judged by the last one)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Slice:
    steps: int
    cfg: float
    latent: tuple
    sampler: str = "euler"
    scheduler: str = "simple"
    note: str = ""


# Step counts and cfg as users run them, shrunk where one device command (10 min) must hold
# 5 processes of several slices. cfg > 1 batches cond and uncond into one evaluation.
SLICES = {
    "flux": Slice(12, 1.0, (1, 16, 128, 128), note="1024², 12 euler steps, cfg 1"),
    "sdxl": Slice(8, 7.0, (1, 4, 128, 128), scheduler="normal", note="1024², 8 euler steps, cfg 7"),
    "wan1.3b": Slice(6, 5.0, (1, 16, 21, 60, 104), note="480p x 81f, 6 euler steps, cfg 5"),
    "wan14b": Slice(4, 5.0, (1, 16, 21, 60, 104), note="480p x 81f, 4 euler steps, cfg 5"),
    # 65 frames instead of bench_e2e's 129: a step takes about a third as long.
    "hunyuan": Slice(3, 1.0, (1, 16, 17, 90, 160), note="720p x 65f (61,200 + 256 tokens), 3 euler steps, "
                                                       "embedded guidance 6"),
}


# ---------------------------------------------------------------------------------------
# Table logic (no torch, no GPU: tested on CPU)


def majority(verdicts: list[str]) -> tuple[str, int]:
    """(most common verdict, how many differ from it)."""
    if not verdicts:
        return "", 0
    top = max(sorted(set(verdicts)), key=verdicts.count)
    return top, sum(v != top for v in verdicts)


def fmt_ratios(xs) -> str:
    return ", ".join(f"{x:.3f}x" for x in xs)


def aggregate(results: list[dict]) -> list[str]:
    """Markdown lines from the workers' JSON (one dict per process). "evaluations vs stock" is
    the speed-up of the model evaluations inside the sampler (CUDA events around each): next to
    "forward-only" it shows whether an evaluation keeps its gain in the sampler; "rest" is the
    run's time outside the evaluations (ComfyUI's per-run work), which dilutes it."""
    lines = ["| slice | variant | sampler vs stock, per process | worst | forward-only vs stock | "
             "sampler / forward | evaluations vs stock | rest ms | auto verdict per process | differs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    slices = []
    for r in results:
        for name in r["slices"]:
            if name not in slices:
                slices.append(name)
    for name in slices:
        runs = [r["slices"][name] for r in results if name in r["slices"]]
        label = runs[0]["label"]
        stock_ms = statistics.median(x["stock_ms"] for x in runs)
        split = [x["stock"] for x in runs if x.get("stock")]
        parts = ""
        if split:
            med = lambda k: statistics.median(s[k] for s in split)
            parts = (f": {med('count'):.0f} evaluations {med('evaluations'):.0f} ms, rest {med('rest'):.0f} ms "
                     f"(of which load_models_gpu {med('load'):.0f} ms, gc {med('gc'):.0f} ms)")
        leaked = sum(x.get("leaked_models", 0) for x in runs)
        if leaked:
            parts += f"; ComfyUI held {leaked} dead model(s) after the slice"
        rest = f"{statistics.median(s['rest'] for s in split):.0f}" if split else ""
        lines.append(f"| {label} | stock | {stock_ms:.0f} ms per run (median){parts} | | | | | {rest} | | |")
        for variant in runs[0]["variants"]:
            cells_of = [x["variants"][variant] for x in runs]
            ratios = [c["sampler"] for c in cells_of]
            fwd = [c["forward"] for c in cells_of if c.get("forward")]
            per = [c["sampler"] / c["forward"] for c in cells_of if c.get("forward")]
            evals = [c["evaluations"] for c in cells_of if c.get("evaluations")]
            rests = [c["split"]["rest"] for c in cells_of if c.get("split")]
            verdicts = [c.get("verdict") for c in cells_of]
            verdicts = [v for v in verdicts if v]
            top, differ = majority(verdicts)
            cells = [fmt_ratios(ratios), f"{min(ratios):.3f}x",
                     f"{statistics.median(fwd):.3f}x" if fwd else "",
                     f"{statistics.median(per):.3f}" if per else "",
                     f"{statistics.median(evals):.3f}x" if evals else "",
                     f"{statistics.median(rests):.0f}" if rests else "",
                     ", ".join(verdicts), f"{differ}/{len(verdicts)}" if verdicts else ""]
            lines.append(f"| | {variant} | " + " | ".join(cells) + " |")
            firsts = [c.get("first_run") for c in cells_of]
            if any(firsts):
                lines.append(f"| | {variant}, first (deciding) run | {fmt_ratios(f for f in firsts if f)} "
                             "| | | | | | | |")
    return lines


def worker_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Per variant: median over rounds of (stock ms / variant ms) of the same round."""
    stock = times["stock"]
    return {v: statistics.median(s / t for s, t in zip(stock, ts)) for v, ts in times.items() if v != "stock"}


def rotated(variants: list[str], round_index: int) -> list[str]:
    """Each round starts with another variant, so none is always first after the others."""
    k = round_index % len(variants)
    return variants[k:] + variants[:k]


# ---------------------------------------------------------------------------------------
# Worker (GPU, ComfyUI)


def conditioning(name: str, kw: dict, device):
    """(positive, negative) in ComfyUI's format from bench_e2e's forward arguments."""
    g = torch.Generator().manual_seed(11)
    other = lambda t: torch.randn(t.shape, generator=g).to(t.device, t.dtype)
    c = kw["c_crossattn"][:1]
    if name == "flux":
        extra = {"pooled_output": kw["y"][:1], "guidance": 3.5}
    elif name == "hunyuan":
        extra = {"pooled_output": kw["y"][:1], "guidance": 6.0, "attention_mask": kw["attention_mask"]}
    elif name == "sdxl":
        pooled = torch.randn(1, 1280, generator=g).to(device, torch.bfloat16)
        extra = {"pooled_output": pooled, "width": 1024, "height": 1024, "target_width": 1024,
                 "target_height": 1024}
    else:
        extra = {}
    return [[c, dict(extra)]], [[other(c), dict(extra)]]


def forward_kwargs(kw: dict, batch: int) -> dict:
    """bench_e2e's forward arguments at the sampler's evaluation batch (cond + uncond)."""
    if batch == 1:
        return kw
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1:
            out[k] = v.expand(batch, *v.shape[1:]).contiguous()
        else:
            out[k] = v
    return out


def paired_forwards(stock, fn, iters: int, sync, warmups: int = 2) -> float:
    """Forward-only speed-up: median over `iters` pairs of (stock ms / fn ms), wall clock with
    the device drained around each forward (as the sampler runs are timed), order alternating."""
    def once(f):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - t0

    for _ in range(warmups):
        stock(), fn()
    ratios = []
    for i in range(iters):
        if i % 2:
            t_fn, t_stock = once(fn), once(stock)
        else:
            t_stock, t_fn = once(stock), once(fn)
        ratios.append(t_stock / t_fn)
    return statistics.median(ratios)


class RunClock:
    """Where one sampler run's wall time goes: model evaluations (CUDA events around each, from
    an APPLY_MODEL wrapper outside the node's; read only after the run, so it adds no sync),
    ComfyUI's model loading (load_models_gpu: patching, unloading the previous variant's
    clone) and Python's garbage collections; the rest is the sampler's own per-run work."""

    KEY = "bench_sampler"

    def __init__(self, on_gpu: bool):
        import gc

        self.on_gpu = on_gpu
        self.marks: list = []
        self.load_s = 0.0
        self.gc_s = 0.0
        self._gc_t0 = None
        gc.callbacks.append(self._gc)

    def _gc(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._gc_t0 is not None:
            self.gc_s += time.perf_counter() - self._gc_t0
            self._gc_t0 = None

    def wrapper(self, executor, *args, **kwargs):
        if self.on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = executor(*args, **kwargs)
            end.record()
            self.marks.append((start, end))
        else:
            t0 = time.perf_counter()
            out = executor(*args, **kwargs)
            self.marks.append((t0, time.perf_counter()))
        return out

    def timed_loads(self, load):
        def load_models_gpu(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return load(*args, **kwargs)
            finally:
                self.load_s += time.perf_counter() - t0
        return load_models_gpu

    def reset(self) -> None:
        self.marks, self.load_s, self.gc_s = [], 0.0, 0.0

    def breakdown(self, wall_ms: float) -> dict:
        """After the run (the device drained): evaluations, loads, gc and the rest, in ms."""
        if self.on_gpu:
            evals = sum(s.elapsed_time(e) for s, e in self.marks)
        else:
            evals = sum(e - s for s, e in self.marks) * 1e3
        return {"wall": wall_ms, "evaluations": evals, "count": len(self.marks), "load": self.load_s * 1e3,
                "gc": self.gc_s * 1e3, "rest": wall_ms - evals}


def run_worker(args) -> dict:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "tests" / "comfy"))
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import comfyui_path, setup

    device = torch.device(args.device)
    setup(comfyui_path(), cpu=device.type == "cpu")
    import comfy.cli_args

    # Keep every model on the GPU between runs: the timings are of sampling, not of loading.
    comfy.cli_args.args.disable_smart_memory = False
    comfy.cli_args.args.highvram = device.type == "cuda"
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("sageattn2").setLevel(logging.INFO)
    import comfy.model_management as mm
    import comfy.sample
    from test_nodes_support import load_pack

    load_pack()
    on_gpu = device.type == "cuda"
    clock = RunClock(on_gpu)
    mm.load_models_gpu = clock.timed_loads(mm.load_models_gpu)
    out = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__, "slices": {}}
    for name in args.slices.split(","):
        out["slices"][name] = run_slice(name, args, device, clock)
        # The slice's models are gone (run_slice's locals): ComfyUI must hold none of them, or
        # every later load_models_gpu pays a full gc.collect and an empty_cache (cleanup_models_gc).
        mm.unload_all_models()
        import gc

        gc.collect()
        dead = [m for m in mm.current_loaded_models if m.is_dead()]
        out["slices"][name]["leaked_models"] = len(dead)
        if dead:
            print(f"[bench_sampler] {name}: ComfyUI still holds {len(dead)} model(s) of this slice; later slices "
                  "pay a gc.collect per run", file=sys.stderr, flush=True)
        mm.cleanup_models()
        if on_gpu:
            torch.cuda.empty_cache()
    return out


def run_slice(name: str, args, device, clock: RunClock) -> dict:
    """Every variant of one slice, timed round after round; returns the slice's results."""
    import bench_e2e
    import comfy.model_patcher
    import comfy.sample
    from sageattn2_pack.nodes import override as ov
    from sageattn2_pack.nodes.finite import FiniteCheck
    from sageattn2_pack.nodes.levels import cost_order

    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    capability = torch.cuda.get_device_capability() if on_gpu else None
    levels = args.levels.split(",") if args.levels else [lv for lv in cost_order(capability) if lv != "exact"]
    spec = SLICES[name]
    label, model, kw = bench_e2e.build(name, device)
    label = ", ".join(label.split(", ")[:2] + [spec.note])
    base = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    # Every variant (stock too) carries the clock's wrapper, outermost: the node's is added later.
    stock_patcher = base.clone()
    stock_patcher.add_wrapper_with_key("apply_model", RunClock.KEY, clock.wrapper)
    positive, negative = conditioning(name, kw, device)
    noise = torch.randn(spec.latent, generator=torch.Generator().manual_seed(5))
    latent = torch.zeros(spec.latent)
    steps = args.steps or spec.steps

    states, models = {}, {"stock": stock_patcher}
    backend = "auto" if on_gpu else "reference"
    for level in levels + ["auto"]:
        state = ov.PatchState(ov.PatchSettings(precision=level, backend=backend))  # the node's defaults
        states[level] = state
        models[level] = ov.install(stock_patcher, state)

    def sample(m, n_steps=steps):
        sync()
        clock.reset()
        t0 = time.perf_counter()
        comfy.sample.sample(m, noise, n_steps, spec.cfg, spec.sampler, spec.scheduler, positive, negative,
                            latent, seed=0, disable_pbar=True)
        sync()
        return clock.breakdown((time.perf_counter() - t0) * 1e3)

    variants = list(models)
    runs = {v: [] for v in variants}
    first = {}  # the first round's runs: auto decides in it
    for r in range(args.warmup + args.rounds):
        for v in rotated(variants, r):
            run = sample(models[v])
            if r >= args.warmup:
                runs[v].append(run)
            elif r == 0:
                first[v] = run
                # A short run may end before auto has decided: the timed rounds are of
                # the verdict (the deciding run is reported apart).
                for _ in range(3):
                    if v != "auto" or all(d.verdict for d in states["auto"].auto.inputs.values()):
                        break
                    sample(models[v])
    times = {v: [x["wall"] for x in rs] for v, rs in runs.items()}
    evals = {v: [x["evaluations"] for x in rs] for v, rs in runs.items()}
    ratios, eval_ratios = worker_ratios(times), worker_ratios(evals)

    # Forward-only in the same process: the sampler's evaluation batch, the same wrappers.
    batch = 1 if spec.cfg == 1.0 else 2
    fkw = kw if name == "sdxl" else forward_kwargs(kw, batch)  # bench_e2e's SDXL is batch 2 already
    # float32 like the sampler's latent: the same model input, so auto's verdict for it applies.
    fkw = dict(fkw, x=torch.randn(batch, *spec.latent[1:], generator=torch.Generator().manual_seed(6)).to(device))
    stock_fn = bench_e2e.forward_fn(model, fkw, extra_options=bench_e2e.sampler_options(stock_patcher))
    one = statistics.median(times["stock"]) / steps
    iters = max(3, min(20, round(500 / max(one, 1e-3))))
    stock_runs = runs["stock"]
    result = {"label": label, "stock_ms": statistics.median(times["stock"]), "stock": split_medians(stock_runs),
              "variants": {}}
    forward_levels = args.forward_levels.split(",")
    for v in variants[1:]:
        cell = {"sampler": ratios[v], "ms": statistics.median(times[v]), "evaluations": eval_ratios[v],
                "split": split_medians(runs[v])}
        if v in forward_levels:
            fn = bench_e2e.forward_fn(model, fkw, extra_options=bench_e2e.sampler_options(models[v]))
            # As inside a sampling run: the outputs' finite check is read once at the end, not
            # after every forward (which would stop the host running ahead of the GPU).
            states[v].run_check = FiniteCheck()
            try:
                cell["forward"] = paired_forwards(stock_fn, fn, iters, sync, warmups=1)
                cell["forward_finite"] = states[v].run_check.finite()
            finally:
                states[v].run_check = None
        if v == "auto":
            verdicts = sorted(k[1] for k, n in states[v].stats.items()
                              if isinstance(k, tuple) and k[0] == "auto model" and n)
            cell["verdict"] = "+".join(verdicts) or "none"
            # The deciding run against a warm stock run (round 0's stock run paid first-use costs).
            cell["first_run"] = result["stock_ms"] / first["auto"]["wall"] if "auto" in first else None
        result["variants"][v] = cell
    if args.profile:
        profile_slice(name, models, lambda m: sample(m, min(2, steps))["wall"], Path(args.profile))
    return result


def split_medians(runs: list[dict]) -> dict:
    """Per part of a run (wall, evaluations, load, gc, rest): the median over the timed rounds."""
    return {k: statistics.median(r[k] for r in runs) for k in ("wall", "evaluations", "count", "load", "gc", "rest")}


# ---------------------------------------------------------------------------------------
# torch.profiler: one short sampler run per variant


SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_slice(name: str, models: dict, run, out_dir: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    rows = []
    for variant, m in models.items():
        run(m)  # warm
        with profile(activities=activities) as prof:
            wall = run(m)
        prof.export_chrome_trace(str(out_dir / f"{name}_{variant.replace('+', '_')}.json"))
        busy = 0.0
        syncs = {}
        for evt in prof.key_averages():
            us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
                busy += us / 1000
            if evt.key in SYNC_OPS:
                syncs[evt.key] = evt.count
        rows.append((variant, wall, busy, syncs))
    lines = [f"## {name}: one 2-step sampler run per variant under torch.profiler", "",
             "Reads and syncs include ComfyUI's own (the sampler reads sigmas[0]) and the bench's "
             "drains before and after the run: compare each variant with stock.", "",
             "| variant | wall ms (profiled) | GPU kernel ms | GPU idle ms | .item()/bool() reads | stream/device/event syncs |",
             "|---|---|---|---|---|---|"]
    for variant, wall, busy, syncs in rows:
        reads = syncs.get("aten::_local_scalar_dense", 0)
        waits = sum(n for k, n in syncs.items() if k != "aten::_local_scalar_dense")
        lines.append(f"| {variant} | {wall:.1f} | {busy:.1f} | {max(wall - busy, 0):.1f} | {reads} | {waits} |")
    (out_dir / f"{name}_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------
# Host cost on CPU


def host_cost(evaluations: int = 200) -> list[str]:
    """Host µs per model evaluation of the node's own layer (APPLY_MODEL wrapper, override,
    route lookup, the finite check's per-call sum), with `sageattn` replaced by a function that
    returns a ready tensor and the plan by a GPU kernel's, against the stock path through the
    same fake model; `auto` rows with its verdict set (stock: the model runs without our
    override; Sage: every call is served after the verdict's lookup). The kernel call's own host
    time (sageattn2's launch path) is bench_attention.py's "host µs" column. CPU only; no ComfyUI."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from test_nodes_support import FakePatcher, apply_model, load_pack, wrap_attn

    load_pack()
    from sageattn2_pack.nodes import override as ov
    from sageattn2_pack.nodes import race
    from sageattn2_pack.sageattn2 import AttnConfig, Plan

    calls, heads = 57, 24  # Flux-dev: 19 double + 38 single blocks
    q = torch.zeros(1, 64, heads * 2)  # tiny tensors: host cost only
    done = torch.zeros_like(q)

    @wrap_attn
    def stock(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
              **kwargs):
        return done

    class Model:
        def forward(self, x, to):
            for i in range(calls):
                to["block_type"], to["block_index"], to["total_blocks"] = "double", i, calls
                stock(q, q, q, heads, transformer_options=to)
            return x

    class NoClock:  # verdicts are set, nothing is timed
        start = stop = lambda self, *a: None

    def patched(precision, verdict=None):
        state = ov.PatchState(ov.PatchSettings(precision=precision, min_seq_len=0))
        if verdict is not None:
            decision = state.auto.for_input(ov.input_key([x], {}))
            decision.clock, decision.worth_timing = NoClock(), lambda sig: True
            sig = ((1, 64, heads, 2), (1, 64, heads, 2), "NHD", q.dtype)
            decision.verdict, decision.sage_signatures = verdict, frozenset([sig])
            decision.last = (1.0, 1.0)  # a clear verdict: never re-checked
        return ov.install(FakePatcher(), state)

    real = ov.sa2.sageattn, ov.sa2.plan, ov.input_key
    ov.sa2.sageattn = lambda q4, *a, **kw: done.view(q4.shape)  # the kernel call itself: not counted
    ov.sa2.plan = lambda *a, **kw: Plan("wgmma", AttnConfig("int8", "fp8"))
    ov.input_key = lambda args, kwargs: ("cpu counts as a GPU here",)
    try:
        model, x = Model(), torch.zeros(1, 4)
        paths = {"stock": FakePatcher(), "int8+fp8": patched("int8+fp8"),
                 "auto (stock verdict)": patched("auto", race.STOCK), "auto (Sage verdict)": patched("auto", race.SAGE)}
        for m in paths.values():
            for _ in range(20):
                apply_model(m, model, x, 0.5)
        rows = {name: [] for name in paths}
        for _ in range(5):  # interleaved repeats: the minimum per path
            for name, m in paths.items():
                t0 = time.perf_counter()
                for _ in range(evaluations // 5 or 1):
                    apply_model(m, model, x, 0.5)
                rows[name].append((time.perf_counter() - t0) / (evaluations // 5 or 1) * 1e6)
    finally:
        ov.sa2.sageattn, ov.sa2.plan, ov.input_key = real
    stock_us = min(rows["stock"])
    lines = [f"Host time per model evaluation, {calls} attention calls, fake kernel (CPU, {torch.__version__}):", "",
             "| path | µs per evaluation | extra µs per attention call |", "|---|---|---|"]
    for name, us in rows.items():
        lines.append(f"| {name} | {min(us):.0f} | {(min(us) - stock_us) / calls:.1f} |")
    return lines


# ---------------------------------------------------------------------------------------


def driver(args) -> int:
    """Workers one after another; the table is rewritten after each, so a run cut short by a
    time limit still leaves the processes it finished."""
    results = []
    t_start, last = time.time(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.processes):
            if args.budget and p and time.time() - t_start + last > args.budget:
                print(f"[bench_sampler] stopping after {p} processes: another (~{last:.0f} s, as the last) "
                      f"would pass the {args.budget:.0f} s budget", flush=True)
                break
            path = Path(tmp) / f"p{p}.json"
            cmd = [sys.executable, __file__, "--worker", str(path), "--slices", args.slices,
                   "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--device", args.device]
            if args.levels:
                cmd += ["--levels", args.levels]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            cmd += ["--forward-levels", args.forward_levels]
            if args.profile and p == 0:
                cmd += ["--profile", args.profile]
            t0 = time.time()
            rc = subprocess.run(cmd).returncode
            last = time.time() - t0
            print(f"[bench_sampler] process {p + 1}/{args.processes}: rc={rc}, {last:.0f} s", flush=True)
            if rc != 0 or not path.exists():
                print("[bench_sampler] a worker failed: no table", file=sys.stderr)
                return 1
            results.append(json.loads(path.read_text()))
            text = driver_table(args, results)
            if args.out:
                Path(args.out).write_text(text)
    print(text)
    return 0


def driver_table(args, results) -> str:
    commit = os.environ.get("SAGEATTN2_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [f"# In ComfyUI's sampler: {results[0]['device']}, torch {results[0]['torch']}, "
             f"{datetime.date.today()}, commit {commit or 'unknown'}", "",
             f"{len(results)} of {args.processes} fresh processes; per process {args.warmup} warm-up and "
             f"{args.rounds} timed rounds of every variant (comfy.sample.sample, wall clock, GPU drained before "
             "and after).", ""]
    lines += aggregate(results)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", default="flux,wan14b,hunyuan,sdxl", help=f"from {', '.join(SLICES)}")
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per process")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds per process (auto decides in these)")
    ap.add_argument("--levels", default=None, help="levels to time (default: the distinct ones on this GPU)")
    ap.add_argument("--steps", type=int, default=None, help="override every slice's step count")
    ap.add_argument("--forward-levels", default="int8+fp8,auto",
                    help="variants that also get the forward-only ratio (paired forwards cost time)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all processes: none is started that would end past it (judged by the last)")
    ap.add_argument("--profile", default=None, help="directory for profiler traces and summaries (first process)")
    ap.add_argument("--host-cost", action="store_true", help="CPU: host cost of the node's path per evaluation")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs ComfyUI's CPU path (smoke tests)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.host_cost:
        text = "\n".join(host_cost()) + "\n"
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    unknown = [s for s in args.slices.split(",") if s not in SLICES]
    if unknown:
        ap.error(f"unknown slices {unknown}; choose from {', '.join(SLICES)}")
    if not os.environ.get("COMFYUI_PATH") or (args.device == "cuda" and not torch.cuda.is_available()):
        print("needs COMFYUI_PATH and a CUDA GPU")
        return 2
    if args.worker:
        Path(args.worker).write_text(json.dumps(run_worker(args)))
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
