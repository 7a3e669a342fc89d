"""bench/bench_sampler.py's worker end to end on ComfyUI's CPU path, with tiny models in place
of the benchmark's slices: conditioning, comfy.sample.sample per variant, forward-only ratios,
auto's verdict, the JSON the driver aggregates."""
import argparse
import sys
from pathlib import Path

import torch

from test_comfyui import DEVICE, DTYPE, tiny_flux, tiny_wan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_e2e  # noqa: E402
import bench_sampler as bs  # noqa: E402


def tiny_build(name, device):
    g = torch.Generator().manual_seed(9)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE, DTYPE)
    if name == "flux":
        t = tiny_flux()
        kw = dict(x=rnd(1, 16, 16, 16), t=torch.tensor([0.7], device=DEVICE), c_crossattn=rnd(1, 16, 64),
                  y=rnd(1, 32), guidance=torch.tensor([3.5], device=DEVICE))
        return "Flux tiny, 2 double + 2 single blocks, 16x16", t.patcher.model, kw
    t = tiny_wan()
    kw = dict(x=rnd(1, 16, 3, 8, 8), t=torch.tensor([0.7], device=DEVICE), c_crossattn=rnd(1, 32, 64))
    return "WAN tiny, 2 blocks, 3x8x8", t.patcher.model, kw


def test_worker_produces_what_the_driver_aggregates(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_e2e, "build", tiny_build)
    monkeypatch.setitem(bs.SLICES, "flux", bs.Slice(2, 1.0, (1, 16, 16, 16), note="tiny"))
    monkeypatch.setitem(bs.SLICES, "wan1.3b", bs.Slice(2, 5.0, (1, 16, 3, 8, 8), note="tiny"))
    args = argparse.Namespace(slices="flux,wan1.3b", levels="int8+fp16", steps=None, rounds=2, warmup=1,
                              profile=str(tmp_path), device=str(DEVICE), forward_levels="int8+fp16,auto")
    out = bs.run_worker(args)
    assert set(out["slices"]) == {"flux", "wan1.3b"}
    for name, r in out["slices"].items():
        assert set(r["variants"]) == {"int8+fp16", "auto"} and r["stock_ms"] > 0
        for cell in r["variants"].values():
            assert cell["sampler"] > 0 and cell["forward"] > 0 and cell["evaluations"] > 0
            assert cell["forward_finite"] is True  # forward-only checked once at its end, as in a run
            # Every evaluation of the run was timed (cond and uncond batched: one per step).
            split = cell["split"]
            assert split["count"] == 2 and 0 < split["evaluations"] < split["wall"]
            assert split["rest"] == split["wall"] - split["evaluations"] and split["load"] > 0
        assert r["stock"]["count"] == 2 and r["variants"]["auto"]["first_run"] > 0
        # The slice's models were freed: ComfyUI holds none of them (no gc per later run).
        assert r["leaked_models"] == 0
    # One short profiled run per variant: a trace each and a summary table per slice.
    assert len(list(tmp_path.glob("flux_*.json"))) == 3 and (tmp_path / "wan1.3b_summary.md").exists()
    summary = (tmp_path / "flux_summary.md").read_text()
    assert all(f"| {v} |" in summary for v in ("stock", "int8+fp16", "auto"))
    lines = bs.aggregate([out, out])
    assert any("WAN tiny, 2 blocks, tiny" in line for line in lines)
    assert sum("| | auto |" in line for line in lines) == 2
