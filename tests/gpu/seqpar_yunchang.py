"""Sequence-parallel attention through yunchang (the ring / Ulysses / USP engine under xDiT and
raylight) with our kernels behind its `sageattention` calls, checked and timed.

Every rank builds the same full q, k, v (same seed), takes its basic (contiguous) shard and runs
yunchang's LongContextAttention with ulysses x ring degrees:
    ring = 1 x W, ulysses = W x 1, usp = 2 x W/2 (W >= 4).
The gathered output is compared on rank 0 with our single-GPU call of the same level and with
exact attention; yunchang's exact attention types (PyTorch flash; cuDNN where no ring merges, as
yunchang's cuDNN path returns no lse; PyTorch math on CPU) run through the same engine as the
baseline of the timing table. Results: $OUT/seqpar.jsonl and $OUT/seqpar.md (rank 0). Exit status 1 on any failed check.

  GPUs (NCCL):  torchrun --nproc-per-node 2 tests/gpu/seqpar_yunchang.py --shapes wan720,causal --bench
  CPU (gloo):   python tests/gpu/seqpar_yunchang.py --spawn 2 --shapes small,small_causal
                (our levels then run sageattn2's reference emulation of the kernels)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sageattn2 import compat  # noqa: E402

SHAPES = {
    # WAN 2.1/2.2 14B at 1280x720, 81 frames: 21 x 45 x 80 = 75,600 tokens, 40 heads of 128.
    "wan720": dict(b=1, n=75600, h=40, d=128, causal=False),
    "causal": dict(b=1, n=32768, h=32, d=128, causal=True),
    "small": dict(b=1, n=512, h=4, d=64, causal=False),
    "small_causal": dict(b=1, n=512, h=4, d=64, causal=True),
}
# Our levels under the yunchang attention types xDiT/raylight users pick.
OURS = {"SAGE_FP8_SM90": "int8+fp8", "SAGE_FP16": "int8+fp16"}
# Min cosine: sharded vs our single-GPU call (the shards quantize in their own groups), and vs
# exact attention the level's budget (H100, unsharded: int8+fp8 0.99926, int8+fp16 0.99993),
# or, on data harder than that, no worse than our single-GPU call.
MIN_COS = {"int8+fp8": (0.999, 0.999), "int8+fp16": (0.9995, 0.9999), "exact": (None, 0.99995)}
# yunchang's exact attention types per device; the cuDNN and math paths return zeros for lse,
# so they only run where no ring merges.
EXACT_TYPES = {"cuda": ("TORCH_FLASH", "TORCH_CUDNN"), "cpu": ("TORCH_MATH",)}
NO_LSE = ("TORCH_CUDNN", "TORCH_MATH")


def topologies(world: int) -> dict[str, tuple[int, int]]:
    """name -> (ulysses degree, ring degree)."""
    tops = {"ring": (1, world), "ulysses": (world, 1)}
    if world >= 4 and world % 2 == 0:
        tops["usp"] = (2, world // 2)
    return tops


def make_inputs(shape: dict, device, seed: int):
    """(B, N, H, D) bf16 q, k, v, identical on every rank: randn with a K channel bias of 3
    and two Q channels x8 (the outliers the quantization must survive)."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, n, h, d = shape["b"], shape["n"], shape["h"], shape["d"]

    def randn(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32)

    q, k, v = randn(b, n, h, d), randn(b, n, h, d) + 3 * randn(1, 1, h, d), randn(b, n, h, d)
    q[..., :2] *= 8
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def metrics(out, ref) -> dict:
    o, r = out.double().flatten(), ref.double().flatten()
    return {"cos": float(o @ r / (o.norm() * r.norm())),
            "rel_l1": float((o - r).abs().sum() / r.abs().sum()),
            "max_abs": float((o - r).abs().max())}


def exact_attention(q, k, v, causal, scale):
    """Exact attention (B, N, H, D) through PyTorch SDPA, fp32 on CPU."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if not q.is_cuda:
        qh, kh, vh = qh.float(), kh.float(), vh.float()
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale).transpose(1, 2)


def gather_sequence(local, world):
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=1)


def timed_ms(fn, iters: int) -> float:
    """Median wall time of fn() over iters, every rank in step (barrier before each)."""
    fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_rank(rank: int, world: int, args) -> int:
    on_gpu = args.spawn == 0
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
        compat.install_as_sageattention(force=True)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        sys.modules["sageattention"] = compat.make_module("reference")
    # yunchang looks for `sageattention` when first imported: it must see ours.
    import yunchang
    import yunchang.kernels
    from yunchang import EXTRACT_FUNC_DICT, LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    assert yunchang.kernels.sageattention.__provider__ == "sageattn2", "yunchang did not pick up our sageattention"
    out_dir = Path(args.out)
    log_rows, failures = [], []
    attn_types = list(OURS) + list(EXACT_TYPES[device.type])

    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        causal, scale = shape["causal"], 1.0 / math.sqrt(shape["d"])
        q, k, v = make_inputs(shape, device, args.seed)
        singles = {}
        if rank == 0:
            backend = "auto" if on_gpu else "reference"
            singles["exact"] = exact_attention(q, k, v, causal, scale)
            singles["int8+fp8"] = compat.sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, "NHD", causal, backend=backend)
            singles["int8+fp16"] = compat.sageattn_qk_int8_pv_fp16_cuda(q, k, v, "NHD", causal, backend=backend)
            for level in OURS.values():
                row = dict(shape=shape_name, topology="single", world=1, attn=level, **metrics(singles[level], singles["exact"]))
                log_rows.append(row)
        for top_name, (ud, rd) in topologies(world).items():
            if top_name not in args.topologies.split(",") or shape["h"] % ud:
                continue
            set_seq_parallel_pg(ud, rd, rank, world)
            shards = [EXTRACT_FUNC_DICT["basic"](t, rank, world, rd, ud) for t in (q, k, v)]
            for attn_name in attn_types:
                if attn_name in NO_LSE and rd > 1:
                    continue
                level = OURS.get(attn_name, "exact")
                layer = LongContextAttention(ring_impl_type="basic", attn_type=AttnType[attn_name])
                call = lambda: layer(*shards, softmax_scale=scale, causal=causal)
                with torch.inference_mode():
                    out = gather_sequence(call(), world)
                    ms = timed_ms(call, args.iters) if (args.bench and on_gpu) else None
                if rank != 0:
                    continue
                row = dict(shape=shape_name, topology=top_name, world=world, ulysses=ud, ring=rd, attn=attn_name,
                           level=level, ms=ms, vs_exact=metrics(out, singles["exact"]))
                min_single, min_exact = MIN_COS[level]
                if min_single is not None:
                    row["vs_single"] = metrics(out, singles[level])
                    if row["vs_single"]["cos"] < min_single:
                        failures.append(f"{shape_name} {top_name} {attn_name}: vs single-GPU cos {row['vs_single']['cos']:.6f}")
                if level != "exact":
                    min_exact = min(min_exact, metrics(singles[level], singles["exact"])["cos"] - 1e-4)
                if not row["vs_exact"]["cos"] >= min_exact:
                    failures.append(f"{shape_name} {top_name} {attn_name}: vs exact cos {row['vs_exact']['cos']:.6f}")
                print(json.dumps(row), flush=True)
                log_rows.append(row)
        del q, k, v, singles

    status = torch.tensor([len(failures)], device=device)
    dist.broadcast(status, 0)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "seqpar.jsonl", "a") as f:
            for row in log_rows:
                f.write(json.dumps(row) + "\n")
        table = markdown_table(log_rows, device)
        with open(out_dir / "seqpar.md", "a") as f:
            f.write(table + "\n")
        print(table)
        for line in failures:
            print("FAILED", line)
    dist.destroy_process_group()
    return int(status.item() > 0)


def markdown_table(rows, device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (reference emulation)"
    lines = [f"### yunchang sequence parallel, {name}", "",
             "| shape | topology | W | attention | ms | vs flash (same engine) | cos vs exact | cos vs our 1-GPU |",
             "|---|---|---|---|---|---|---|---|"]
    flash = {(r["shape"], r["topology"]): r["ms"] for r in rows if r.get("attn") == "TORCH_FLASH"}
    for r in rows:
        if r["topology"] == "single":
            lines.append(f"| {r['shape']} | single GPU | 1 | {r['attn']} | | | {r['cos']:.6f} | |")
            continue
        base = flash.get((r["shape"], r["topology"]))
        speed = f"{base / r['ms']:.2f}x" if (base and r["ms"]) else ""
        ms = f"{r['ms']:.2f}" if r["ms"] else ""
        single = f"{r['vs_single']['cos']:.6f}" if "vs_single" in r else ""
        lines.append(f"| {r['shape']} | {r['topology']} {r['ulysses']}x{r['ring']} | {r['world']} | {r['attn']} "
                     f"({r['level']}) | {ms} | {speed} | {r['vs_exact']['cos']:.6f} | {single} |")
    return "\n".join(lines)


def _spawned(rank, world, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = run_rank(rank, world, args)
    if code:
        sys.exit(code)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="wan720,causal", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--topologies", default="ring,ulysses,usp", help="comma list (usp needs 4+ ranks)")
    parser.add_argument("--spawn", type=int, default=0, help="CPU run: spawn this many gloo ranks (else torchrun/NCCL)")
    parser.add_argument("--bench", action="store_true", help="time each configuration (GPU)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=os.environ.get("OUT", "seqpar_out"))
    args = parser.parse_args()
    if args.spawn:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.spawn, args, port), nprocs=args.spawn, join=True)  # raises on a failed rank
        return 0
    return run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)


if __name__ == "__main__":
    sys.exit(main())
