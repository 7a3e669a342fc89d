"""Cycle model of one KV tile of the mma.sync attention kernels, from SASS and published rates.

    python tools/cycle_model.py build [--archs 86 89 120 90] [--thuml .thirdparty/SageAttention]
    python tools/cycle_model.py table [--out bench/results/rtx_cycle_model.md]

`build` compiles our attention kernel (csrc/include/sa2/attn_mma.cuh, one instantiation per level
at head dim 64 and 128) and, with --thuml, thu-ml SageAttention's sm80 (INT8 + FP16 PV) and sm89
(INT8 + FP8 PV) kernels from its source, to cubins under /tmp/sa2_cycle_model, and stores the
SASS (cuobjdump -sass; needs cuobjdump and nvdisasm, e.g. from the nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels) and register counts. `table` reads them and prints the model.

What is counted: the main loop is the backward branch whose body holds the most MMAs (one
iteration = one KV tile of 64 keys for every kernel here; of several such loops, the shortest:
the copy without masking). Regions that a predicated forward branch skips and that hold no
MMA, ldmatrix, ex2, barrier or cp.async are left out and reported as "conditional": our
Q-smoothing Delta-S and the O rescale that runs only when a row max moved (the steady state of
a long row). Of an if/else, the shorter arm is counted (our full-tile V copy; the longer,
bounds-checked one serves the last tile). Everything else in the loop body is issued every tile
(predicated code included).

The model, per SM sub-partition (a quarter SM: one scheduler, a quarter of the tensor and
special-function units), for one warp's tile:
    tensor  = sum over MMAs of ops / (tensor ops per clock per SM / 4)
    mufu    = MUFU instructions * 32 lanes / (16 per clock per SM / 4)
    issue   = every instruction, 1 per clock
    smem    = shared-memory bytes read and written (ldmatrix, LDS, STS, cp.async) / (128 B / 4)
A sub-partition with enough warps overlaps them, so a tile costs max(tensor, mufu, issue, smem)
("bound"); with no overlap it costs tensor + mufu + the other instructions ("serial", the
"no-overlap" column). On H100, where our kernels and thu-ml's sm80 kernel run natively and were
timed side by side (MEASURED_H100), the serial model fits all six timings within ~10 % with no
constant, the bound model only with an efficiency of ~0.5 and a larger spread: H100 rows are
predicted with the serial model. The GeForce rows use bound / efficiency, fitted to thu-ml's
published RTX 4090 / 5090 numbers, where its fp32-accumulating kernels sit at ~0.98 of their
tensor bound. TOPS = 4 * 32 rows * 64 keys * D per warp-tile.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sageattn2 import archs as arch_table  # noqa: E402
WORK = Path("/tmp/sa2_cycle_model")

# ---------------------------------------------------------------------------------------
# Cards: per-SM rates from the vendors' published dense figures (ops per clock per SM, an
# FMA counted as 2), boost clocks, SM counts. GeForce halves FP16/FP8 MMA with an fp32
# accumulator; datacenter parts do not. H100: mma.sync (not wgmma) rates measured on our card
# with a synthetic loop (h100-baseline.md): INT8 1280 TOPS, FP16/fp32 630 TFLOPS at 1.98 GHz.


@dataclass(frozen=True)
class Card:
    name: str
    arch: int
    sms: int
    ghz: float
    tensor: dict  # MMA kind -> ops per clock per SM
    mufu: int = 16  # ex2 per clock per SM
    smem_bytes: int = 128  # shared-memory bytes per clock per SM
    smem_per_sm_kb: int = 100  # usable by CTAs (each CTA also reserves 1 KB)
    regs_per_sm: int = 65536
    max_warps: int = 48


CARDS = [
    # RTX 3090 (GA102): 142 TFLOPS FP16 with fp16 accumulate, 71 with fp32, INT8 284, INT4 568.
    Card("RTX 3090", 86, 82, 1.695, {"f16.f32": 512, "f16.f16": 1024, "s8": 2048, "s4": 4096}),
    # RTX 4090 (AD102): FP16 165/330, FP8 330/660 (fp32/fp16 acc), INT8 661, INT4 1321.
    Card("RTX 4090", 89, 128, 2.52, {"f16.f32": 512, "f16.f16": 1024, "e4m3.f32": 1024, "e4m3.f16": 2048,
                                      "s8": 2048, "s4": 4096}),
    # RTX 5090 (GB202): FP16 209.5/419, FP8 419/838, INT8 838. No INT4 entry: CUDA 13.0 compiles
    # mma.m16n8k64.s4 for sm_120 to unpacking plus IMMA.16832.S8 (no INT4 tensor path).
    Card("RTX 5090", 120, 170, 2.41, {"f16.f32": 512, "f16.f16": 1024, "e4m3.f32": 1024, "e4m3.f16": 2048,
                                       "s8": 2048}),
    Card("H100 SXM (mma.sync)", 90, 132, 1.98, {"f16.f32": 2410, "f16.f16": 2410, "s8": 4897},
         smem_per_sm_kb=228, max_warps=64),
]

# MMA SASS opcode -> (model kind, ops per instruction). Shapes m16n8kK: 2 * 16 * 8 * K ops.
def mma_kind(op: str) -> tuple[str, int] | None:
    m = re.match(r"(HMMA|IMMA|QMMA|OMMA)\.(\d+)(\d{2})\.(\S+)", op)
    if not m:
        return None
    unit, mn, k, types = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    mnk = {"168": (16, 8)}.get(mn, None)
    if mnk is None:
        return None
    ops = 2 * 16 * 8 * k
    acc = "f32" if types.startswith("F32") else "f16"
    if unit == "IMMA":
        return ("s4" if "S4" in types or "U4" in types else "s8"), ops
    if unit == "QMMA" or "E4M3" in types:
        return f"e4m3.{acc}", ops
    return f"f16.{acc}", ops


SMEM_BYTES = {"LDSM.16.M88.4": 512, "LDSM.16.MT88.4": 512, "LDSM.16.M88.2": 256, "LDSM.16.MT88.2": 256}


def parse_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        out[name] = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
    return out


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split(" ", 1)[0]


def branch_target(text: str) -> int | None:
    """Target address of a BRA (BRA, BRA.U, predicated or not), else None."""
    if not opcode(text).startswith("BRA"):
        return None
    target = re.findall(r"0x([0-9a-f]+)", text)
    return int(target[-1], 16) if target else None


def conditional_branch(text: str) -> bool:
    """@P / @!P predicated, or BRA.U on a uniform predicate (sm_120 writes `BRA.U !UP0, addr`)."""
    return text.startswith("@") or bool(re.match(r"BRA\.U\s+!?UP\d", text))


def main_loop(ins: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(steady-state instructions, conditional instructions) of the backward-branch loop with
    the most MMAs. Conditional: regions a predicated forward branch skips that hold no MMA,
    ldmatrix, ex2, barrier or cp.async (Q smoothing's Delta-S, the lazy O rescale), which a
    tile without Q smoothing whose row maxima did not move never runs. Of an if/else, the
    longer arm (the bounds-checked copy of a last tile) is in neither list."""
    best, best_mma = [], -1
    for addr, text in ins:
        target = branch_target(text)
        if target is None or target >= addr:
            continue
        body = [x for x in ins if target <= x[0] <= addr]
        n_mma = sum(1 for _, t in body if mma_kind(opcode(t)))
        # Kernels with a masked and an unmasked copy of the loop: the unmasked one (fewer
        # instructions, same MMAs) is the steady state.
        if n_mma > best_mma or (n_mma == best_mma and len(body) < len(best)):
            best, best_mma = body, n_mma
    essential = ("LDSM", "MUFU", "BAR", "LDGSTS", "DEPBAR")
    skip, cold = set(), set()
    for addr, text in best:
        target = branch_target(text)
        if target is not None and target > addr and conditional_branch(text):
            region = [x for x in best if addr < x[0] < target]
            if region and not any(mma_kind(opcode(t)) or opcode(t).startswith(essential) for _, t in region):
                skip.update(a for a, _ in region)
            # An if/else (the fall-through arm ends in a forward BRA past the taken arm): the
            # steady state runs the shorter arm, the full-tile copy; the longer, bounds-checked
            # copy serves the last tile only.
            end = branch_target(region[-1][1]) if region else None
            if end is not None and end > target and not conditional_branch(region[-1][1]):
                taken = [x for x in best if target <= x[0] < end]
                cold.update(a for a, _ in (taken if len(taken) > len(region) else region))
    return ([x for x in best if x[0] not in skip and x[0] not in cold],
            [x for x in best if x[0] in skip and x[0] not in cold])


def loop_counts(body: list[tuple[int, str]]) -> dict:
    c = collections.Counter()
    mma = collections.Counter()
    smem = 0
    for _, text in body:
        op = opcode(text)
        c["instructions"] += 1
        kind = mma_kind(op)
        if kind:
            mma[kind] += 1
            c["mma"] += 1
        elif op.startswith("MUFU"):
            c["mufu"] += 1
            c[op] += 1
        elif op.startswith("LDSM"):
            c["ldsm"] += 1
            smem += SMEM_BYTES.get(op, 512)
        elif op.startswith(("LDS", "STS")):
            c["lds/sts"] += 1
            width = re.search(r"\.(64|128)", op)
            smem += 32 * (int(width.group(1)) // 8 if width else 4)
        elif op.startswith("LDGSTS"):
            c["cp.async"] += 1
            smem += 32 * 16
        elif op.startswith(("LDL", "STL")):
            c["spill ld/st"] += 1
        elif op.startswith(("F2FP", "F2F", "I2F", "F2I", "I2FP")):
            c["convert"] += 1
        elif op.startswith(("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "HADD2", "HFMA2", "HMUL2")):
            c["fp alu"] += 1
        elif op.startswith("SHFL"):
            c["shfl"] += 1
        else:
            c["int/other"] += 1
    return {"counts": dict(c), "mma": {f"{k}:{ops}": n for (k, ops), n in mma.items()}, "smem_bytes": smem}


# ---------------------------------------------------------------------------------------
# Kernels to build

OURS = {
    # level -> (PVType, PVAccum); QK INT8 unless the level says int4
    "int8+fp16": ("kFp16", "kFp32"),
    "int8+fp16 acc16": ("kFp16", "kFp16"),
    "int8+fp8": ("kFp8", "kFp32"),
    "int8+fp8 acc16": ("kFp8", "kFp16"),
    "int4+fp8 acc16": ("kFp8", "kFp16"),
}


def ours_source(arch: int) -> str:
    lines = ['#include "sa2/attn_mma.cuh"', "namespace sa2 {"]
    for d in (64, 128):
        for level, (pv, acc) in OURS.items():
            if pv == "kFp8" and (arch < 89 or arch == 90):  # none on sm80/86; emulated on sm90
                continue
            qk = "kInt4" if level.startswith("int4") else "kInt8"
            lines.append(f"template __global__ void attn_mma_kernel<AttnMmaTraits<{d}, QKType::{qk}, PVType::{pv}, "
                         f"PVAccum::{acc}>>(const MmaAttnParams); // {level} d{d}")
    return "\n".join(lines + ["}"]) + "\n"


def ours_level(name: str) -> tuple[str, int] | None:
    m = re.search(r"ILi(\d+)ELNS_6QKTypeE(\d)ELNS_6PVTypeE(\d)E(?:LNS_7PVAccumE(\d))?", name)
    if not m:
        return None
    d, qk, pv, acc = (int(x or 0) for x in m.groups())
    level = f"{'int4' if qk else 'int8'}+{'fp8' if pv == 2 else 'fp16'}" + (" acc16" if acc else "")
    return level, d


# thu-ml kernels, one instantiation each (non-causal, fp16 output, per-thread groups, no lse),
# as its host functions pick them for sageattn_qk_int8_pv_fp16_cuda(pv_accum_dtype="fp32") and
# sageattn_qk_int8_pv_fp8_cuda(pv_accum_dtype="fp32" / "fp32+fp16").
THUML = {
    # level: (source file, kernel template arguments after <CTA_Q, CTA_K, WARP_Q, WARP_K, D, ...>)
    "int8+fp16": ("qk_int_sv_f16_cuda_sm80.cu", "qk_int_sv_f16_attn_kernel",
                  "DataType::kInt8, QuantGranularity::kPerThread, QuantGranularity::kPerThread, float, false, half, "
                  "ComputeUnit::kTensorCore, MaskMode::kNone, false, false"),
    "int8+fp8": ("qk_int_sv_f8_cuda_sm89.cuh", "qk_int_sv_f8_attn_kernel",
                 "DataType::kInt8, QuantGranularity::kPerThread, QuantGranularity::kPerThread, float, false, half, "
                 "ComputeUnit::kCudaCore, MaskMode::kNone, false, true, false, false"),
    "int8+fp8 acc16": ("qk_int_sv_f8_cuda_sm89.cuh", "qk_int_sv_f8_attn_kernel",
                       "DataType::kInt8, QuantGranularity::kPerThread, QuantGranularity::kPerThread, float, true, half, "
                       "ComputeUnit::kCudaCore, MaskMode::kNone, false, true, false, true"),
}


def thuml_slug(level: str) -> str:
    return level.replace("+", "_").replace(" ", "_")


def thuml_source(thuml: Path, level: str) -> str:
    """Its kernel template (the file cut before its torch host functions) and a table of kernel
    addresses that instantiates exactly this level's kernel at head dim 64 and 128."""
    src, kernel, targs = THUML[level]
    text = (thuml / "csrc/qattn" / src).read_text()
    if "torch::Tensor qk_int8" in text:
        text = text[: text.index("torch::Tensor qk_int8")]
    text = text.replace('#include "', f'#include "{thuml / "csrc/qattn"}/')
    table = ", ".join(f"(void*)&{kernel}<128, 64, 32, 64, {d}, {targs}>" for d in (64, 128))
    return f"{text}\nvoid* thuml_kernels[] = {{{table}}};\n"


def thuml_head_dim(name: str) -> int | None:
    m = re.search(r"ILj128ELj64ELj32ELj64ELj(\d+)E", name)
    return int(m.group(1)) if m else None


def nvcc(args: list[str]) -> None:
    subprocess.run(["nvcc", "-O3", "-std=c++17", "--expt-relaxed-constexpr", *args], check=True)


def build(archs: list[int], thuml: Path | None, jobs_in_parallel: int = 2, ours: bool = True,
          revisions: tuple[str, ...] = ()) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    jobs = []
    for rev in revisions if 90 in archs else ():
        # Our kernel at a revision whose H100 speed was measured (MEASURED_H100), for the fit.
        tree = WORK / f"rev_{rev}"
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "csrc/include"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "x", "-C", str(tree)], input=archive.stdout, check=True)
        header = (tree / "csrc/include/sa2/attn_mma.cuh").read_text()
        params = "MmaAttnParams" if "attn_mma_kernel(const MmaAttnParams" in header else "AttnMmaArgs"
        src = WORK / f"rev{rev}_sm90.cu"
        src.write_text('#include "sa2/attn_mma.cuh"\nnamespace sa2 {\n' + "".join(
            f"template __global__ void attn_mma_kernel<AttnMmaTraits<{d}, QKType::kInt8, PVType::kFp16>>"
            f"(const {params});\n" for d in (64, 128)) + "}\n")
        jobs.append((f"rev{rev}_sm90", [*arch_table.arch(9, 0).defines(),
                                        f"-I{tree / 'csrc/include'}", str(src)], 90))
    for arch in archs if ours else ():
        src = WORK / f"ours_sm{arch}.cu"
        src.write_text(ours_source(arch))
        jobs.append((f"ours_sm{arch}", [*arch_table.arch(arch // 10, arch % 10).defines(),
                                         f"-I{ROOT / 'csrc' / 'include'}", str(src)], arch))
    if thuml:
        import sysconfig

        thuml = thuml.resolve()

        import torch

        inc = Path(torch.__file__).parent / "include"
        flags = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "--use_fast_math",
                 "-DENABLE_BF16", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}",
                 f"-I{sysconfig.get_paths()['include']}"]
        for arch in archs:
            for level in THUML:
                if "fp8" in level and (arch < 89 or arch == 90):
                    continue
                src = WORK / f"thuml_{thuml_slug(level)}_sm{arch}.cu"
                src.write_text(thuml_source(thuml, level))
                jobs.append((src.stem, flags + [str(src)], arch))
    def one(job):
        name, args, arch = job
        cubin = WORK / f"{name}.cubin"
        code = "sm_90a" if arch == 90 else f"sm_{arch}"
        nvcc(["-cubin", f"-arch={code}", *args, "-o", str(cubin)])
        for flag, suffix in (("-sass", ".sass"), ("-res-usage", ".res")):
            out = subprocess.run(["cuobjdump", flag, str(cubin)], capture_output=True, text=True, check=True).stdout
            cubin.with_suffix(suffix).write_text(out)
        print(f"built {name} ({code})", flush=True)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs_in_parallel) as pool:
        list(pool.map(one, jobs))


def registers(res_text: str) -> dict[str, int]:
    regs = {}
    for name, reg in re.findall(r"Function (\S+):\n\s+REG:(\d+)", res_text):
        regs[name] = int(reg)
    return regs


# ---------------------------------------------------------------------------------------
# Model


def smem_bytes_ours(d: int, qk_bytes: int, fp8: bool, smooth_q: bool) -> int:
    """Dynamic shared memory of one CTA at kCtaQ 128, 4 warps (AttnMmaTraits: kSmemBytes with Q
    smoothing, kQbarOffset without)."""
    q = 128 * qk_bytes
    k = 2 * 64 * qk_bytes
    v = (2 * d * 64) if fp8 else (2 if d <= 64 else 1) * 64 * 2 * d  # kVStages
    return q + k + v + ((4 * d + 4 * 64 * 4) if smooth_q else 0)


def occupancy(card: Card, regs: int, smem: int, threads: int = 128) -> int:
    """Warps per SM: registers (256-register units per warp) and shared memory (+1 KB per CTA)."""
    per_warp = ((regs + 7) // 8 * 8) * 32
    by_regs = card.regs_per_sm // (per_warp * (threads // 32))
    by_smem = (card.smem_per_sm_kb * 1024) // (smem + 1024)
    return min(by_regs, by_smem, card.max_warps // (threads // 32)) * threads // 32


def tile_cycles(card: Card, loop: dict) -> dict:
    tensor = 0.0
    for key, n in loop["mma"].items():
        kind, ops = key.split(":")
        rate = card.tensor.get(kind)
        if rate is None:  # e.g. FP8 on H100: emulated, not modelled
            return {}
        tensor += n * int(ops) / (rate / 4)
    c = loop["counts"]
    mufu = c.get("mufu", 0) * 32 / (card.mufu / 4)
    issue = c["instructions"]
    smem = loop["smem_bytes"] / (card.smem_bytes / 4)
    parts = {"tensor": tensor, "mufu": mufu, "issue": issue, "smem": smem}
    parts["bound"] = max(parts.values())
    parts["bound_by"] = max(("tensor", "mufu", "issue", "smem"), key=lambda k: parts[k])
    parts["sum"] = tensor + mufu + (issue - c.get("mma", 0) - c.get("mufu", 0))
    return parts


def predict_tops(card: Card, d: int, cycles: float) -> float:
    work = 4 * 32 * 64 * d  # one warp-tile
    return card.sms * 4 * card.ghz * 1e9 * work / cycles / 1e12


def load_kernels() -> list[dict]:
    rows = []
    slugs = {thuml_slug(level): level for level in THUML}
    for sass_path in sorted(WORK.glob("*.sass")):
        stem, arch = sass_path.stem.rsplit("_sm", 1)
        who = "ours" if stem.startswith("ours") else stem[3:] if stem.startswith("rev") else "thu-ml"
        regs = registers(sass_path.with_suffix(".res").read_text())
        for name, ins in parse_functions(sass_path.read_text()).items():
            if who != "thu-ml":
                tag = ours_level(name)
            else:
                d = thuml_head_dim(name)
                tag = None if d is None else (slugs[stem[len("thuml_"):]], d)
            if tag is None:
                continue
            level, d = tag
            steady, conditional = main_loop(ins)
            loop = loop_counts(steady)
            loop["conditional"] = len(conditional)
            rows.append({"who": who, "arch": int(arch), "level": level, "d": d, "regs": regs.get(name, 0),
                         "loop": loop, "kernel": name})
    return rows


# thu-ml's published speed (README plots, D=128, 32K tokens, non-causal, TOPS) for its own
# kernels: SA2 = INT8 + FP8 PV with fp32 accumulation, SA2++ = with fp16 accumulation.
PUBLISHED = {("RTX 4090", "int8+fp8"): 431.0, ("RTX 4090", "int8+fp8 acc16"): 493.0,
             ("RTX 5090", "int8+fp8"): 554.0, ("RTX 5090", "int8+fp8 acc16"): 643.0}


def fit_rtx(rows: list[dict]) -> tuple[dict, list[str]]:
    """Efficiency per (card, level) = thu-ml's published TOPS / the model's bound for its kernel
    (its SASS for the card's arch, else its sm_89 SASS: the MMA counts do not change)."""
    eff, lines = {}, ["GeForce fit (thu-ml's own kernels against its published D=128 32K numbers):", "",
                      "| card | level | thu-ml bound clk (by) | ideal TOPS | published | efficiency |",
                      "|---|---|---|---|---|---|"]
    for (card_name, level), published in PUBLISHED.items():
        card = next(c for c in CARDS if c.name == card_name)
        cands = [r for r in rows if r["who"] == "thu-ml" and r["level"] == level and r["d"] == 128]
        r = next((r for r in cands if r["arch"] == card.arch), next((r for r in cands if r["arch"] == 89), None))
        if r is None:
            continue
        parts = tile_cycles(card, r["loop"])
        ideal = predict_tops(card, 128, parts["bound"])
        eff[card_name, level] = published / ideal
        lines.append(f"| {card_name} | {level} | {parts['bound']:.0f} ({parts['bound_by']}, sm_{r['arch']} SASS) | "
                     f"{ideal:.0f} | {published:.0f} | {published / ideal:.2f} |")
    lines += ["", "Predictions use the efficiency of the same card and level where thu-ml publishes one, else "
              "the mean of the GeForce fits (RTX 3090, 16-bit PV, INT4); H100 rows use the serial model.", ""]
    return eff, lines


def table(out: Path | None) -> str:
    rows = load_kernels()
    if not rows:
        sys.exit(f"no SASS under {WORK}: run `python tools/cycle_model.py build` first")
    h100_eff, fit = fit_efficiency(rows)
    rtx_eff, rtx_fit = fit_rtx(rows)
    rtx_mean = sum(rtx_eff.values()) / len(rtx_eff) if rtx_eff else h100_eff["bound"]
    lines = fit + rtx_fit + ["| card | kernel | level | D | regs | warps/SM | instr/tile | MMA | MUFU | ldmatrix | spill ld/st | "
             "tensor / mufu / issue / smem clk | bound by | no-overlap clk | predicted TOPS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for card in CARDS:
        for r in sorted(rows, key=lambda r: (r["d"], r["level"], r["who"], r["arch"] != card.arch)):
            if r["who"] not in ("ours", "thu-ml"):  # earlier revisions: only in the H100 fit
                continue
            # A kernel without a build for this arch: its sm_89 SASS stands in (labelled; the MMA
            # counts are the same on every arch, the other counts within a few %).
            if r["arch"] != card.arch and not (r["arch"] == 89 and not any(
                    x["who"] == r["who"] and x["arch"] == card.arch and x["level"] == r["level"] for x in rows)):
                continue
            if r["arch"] == 89 and card.arch == 90 and "fp8" in r["level"]:
                continue
            if card.arch == 120 and r["level"].startswith("int4"):
                continue  # emulated on sm_120 (an inner loop of IMMA.S8): not a tile-level count
            key = (card.name, r["who"], r["level"], r["d"])
            if key in seen:
                continue
            seen.add(key)
            parts = tile_cycles(card, r["loop"])
            if not parts:
                continue
            fp8 = "fp8" in r["level"]
            int4 = r["level"].startswith("int4")  # INT4 levels smooth Q by default
            smem = (smem_bytes_ours(r["d"], r["d"] // 2 if int4 else r["d"], fp8, int4) if r["who"] == "ours"
                    else thuml_smem(r["d"], fp8))
            warps = occupancy(card, r["regs"], smem)
            c = r["loop"]["counts"]
            if card.arch == 90:  # the serial model, which fits the H100 timings best
                tops = predict_tops(card, r["d"], parts["sum"]) * h100_eff["serial"]
            else:
                tops = predict_tops(card, r["d"], parts["bound"]) * rtx_eff.get((card.name, r["level"]), rtx_mean)
            who = r["who"] if r["arch"] == card.arch else f"{r['who']} (sm_{r['arch']} SASS)"
            lines.append(
                f"| {card.name} | {who} | {r['level']} | {r['d']} | {r['regs']} | {warps} | {c['instructions']} | "
                f"{c.get('mma', 0)} | {c.get('mufu', 0)} | {c.get('ldsm', 0)} | {c.get('spill ld/st', 0)} | "
                f"{parts['tensor']:.0f} / {parts['mufu']:.0f} / {parts['issue']:.0f} / {parts['smem']:.0f} | "
                f"{parts['bound_by']} | {parts['sum']:.0f} | {tops:.0f} |")
    text = "\n".join(lines) + "\n"
    if out:
        out.write_text(text)
    return text


def thuml_smem(d: int, fp8: bool) -> int:
    """thu-ml's dynamic shared memory at CTA_Q 128, CTA_K 64: Q int8, K int8 and V (fp16, or
    FP8 V^T), one stage each (its sm80/sm89 kernels)."""
    return 128 * d + 64 * d + (64 * d * (1 if fp8 else 2))


# H100 whole calls, int8+fp16, bf16 inputs, TOPS: our kernel at earlier revisions and thu-ml's
# sm80 kernel, at 1x40x32760x128 and 1x24x16384x64, where quantization is a few % of the call.
# 68b357c from the run of rtx-anchors.md (thu-ml 460 / 358 there); bada5f6 and thu-ml from one
# run on 2026-12-07 (tests/gpu/rtx_round.sh, bench/results/rtx_cycle_model.md).
MEASURED_H100 = {("68b357c", 128): 326.0, ("68b357c", 64): 212.0, ("bada5f6", 128): 393.0, ("bada5f6", 64): 313.0,
                 ("thu-ml", 128): 456.0, ("thu-ml", 64): 358.0}
REVISIONS = ("68b357c", "bada5f6")


def fit_efficiency(rows: list[dict]) -> tuple[dict, list[str]]:
    """Both models against the H100 timings: the bound model's efficiency is the mean of measured /
    ideal (bound at perfect overlap); the serial model (tensor + MUFU + every other instruction,
    no overlap) has no constant but its mean ratio is reported and used the same way. The worst
    kernel's distance from the mean is each model's validation error."""
    card = next(c for c in CARDS if c.arch == 90)
    ratios = {"bound": [], "serial": []}
    lines = []
    for r in sorted(rows, key=lambda r: (r["who"], -r["d"])):
        key = (r["who"], r["d"])
        if r["arch"] != 90 or r["level"] != "int8+fp16" or key not in MEASURED_H100:
            continue
        parts = tile_cycles(card, r["loop"])
        measured = MEASURED_H100[key]
        bound_tops, serial_tops = predict_tops(card, r["d"], parts["bound"]), predict_tops(card, r["d"], parts["sum"])
        ratios["bound"].append(measured / bound_tops)
        ratios["serial"].append(measured / serial_tops)
        lines.append(f"| {r['who']} | {r['d']} | {r['loop']['counts']['instructions']} | "
                     f"{parts['tensor']:.0f} / {parts['mufu']:.0f} / {parts['issue']:.0f} / {parts['smem']:.0f} | "
                     f"{parts['bound_by']} {bound_tops:.0f} | {parts['sum']:.0f} -> {serial_tops:.0f} | {measured:.0f} | "
                     f"{ratios['bound'][-1]:.2f} / {ratios['serial'][-1]:.2f} |")
    eff = {m: (sum(v) / len(v) if v else 1.0) for m, v in ratios.items()}
    err = {m: (max(abs(x / eff[m] - 1) for x in v) if v else 0.0) for m, v in ratios.items()}
    head = ["H100 fit (int8+fp16, mma.sync, 1.98 GHz; bound = max of the four at perfect overlap, serial = their "
            "sum with no overlap):", "",
            "| kernel | D | instr/tile | tensor / mufu / issue / smem clk | bound, ideal TOPS | serial clk -> TOPS | "
            "measured | measured / ideal (bound / serial) |",
            "|---|---|---|---|---|---|---|---|"]
    tail = ["", f"Bound model: efficiency (mean ratio) {eff['bound']:.2f}, worst kernel {100 * err['bound']:.0f} % off it. "
            f"Serial model: mean ratio {eff['serial']:.2f}, worst kernel {100 * err['serial']:.0f} % off it. "
            "These spreads are the models' H100 validation errors; H100 predictions below use the serial model "
            "(times its mean ratio), GeForce ones the bound model (fitted to thu-ml's published numbers).", ""]
    return eff, head + lines + tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--archs", type=int, nargs="+", default=[86, 89, 120, 90])
    b.add_argument("--thuml", type=Path, help="a thu-ml SageAttention source tree (not part of this repo)")
    b.add_argument("-j", "--jobs", type=int, default=2)
    b.add_argument("--no-ours", action="store_true", help="only thu-ml's kernels")
    b.add_argument("--revisions", nargs="*", default=list(REVISIONS),
                   help="git revisions of our kernel whose H100 speed is in MEASURED_H100 (built for sm_90a)")
    t = sub.add_parser("table")
    t.add_argument("--out", type=Path)
    t.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.archs, args.thuml, args.jobs, ours=not args.no_ours, revisions=tuple(args.revisions))
    else:
        print(table(args.out))
        if args.json:
            args.json.write_text(json.dumps(load_kernels(), indent=1))


if __name__ == "__main__":
    main()
