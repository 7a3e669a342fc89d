"""Every product kernel once on small shapes, for compute-sanitizer (tests/gpu/sanitize.sh).

mma family: padded head dims 64/128/256 (+ d=36: padding and the 16-bit V copy), INT8 and
INT4 QK (INT4 forced where it is emulated), PV fp16 / bf16 / FP8, causal or not, every
granularity, Q/V smoothing, HND and NHD; and the fp16 P.V accumulator kernels (sm89/120's
default for FP8 PV; they compile and run on sm90 too). wgmma family (Hopper): head dims
64/128 (+ d=100), PV FP8 / fp16 / bf16, every schedule of each head dim, causal or not. All
with ragged tails (token counts that are not tile multiples), GQA (4 query heads on 2 kv
heads) and the lse. The fused quantizer and the 16-bit V copy kernel run as part of each call.
The two families' cases alternate, so a run cut short by its time limit has covered both.

    python tests/gpu/sanitize_cases.py [name filter]        (under compute-sanitizer)
    python tests/gpu/sanitize_cases.py --summarize DIR TOOL...

A run prints "TOTAL n", one line per case and "CASES n ok m"; exit 1 when a call raised or
gave non-finite output. The numbers themselves are the kernel tests' business
(test_*_kernels.py). `--summarize` reads DIR/sanitize_<tool>.txt and .rc (sanitize.sh),
prints one verdict line per tool and writes DIR/sanitize_summary.md; exit 0 only when every
tool is CLEAN.
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sageattn2 import loader  # noqa: E402
from sageattn2.backends import mma  # noqa: E402
from sageattn2.config import AttnConfig  # noqa: E402

DEV = torch.device("cuda", 0)
GRANULARITIES = ("per_thread", "per_warp", "per_block")


def inputs(d, dtype, layout, causal, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    nq, nk = (129, 129) if causal else (77, 130)
    shape = lambda h, n: (2, h, n, d) if layout == "HND" else (2, n, h, d)
    q = torch.randn(shape(4, nq), device=DEV, generator=g, dtype=dtype)
    k = torch.randn(shape(2, nk), device=DEV, generator=g, dtype=dtype)
    v = torch.randn(shape(2, nk), device=DEV, generator=g, dtype=dtype)
    return q, k, v


def mma_cases():
    pv_types = ((torch.float16, "fp16"), (torch.bfloat16, "fp16"), (torch.bfloat16, "fp8"), (torch.float16, "fp8"))
    has_fp8 = LIB.arch.fp8_mma
    for n, (d, qk, (dtype, pv), causal) in enumerate(
            itertools.product((64, 128, 256, 36), ("int8", "int4"), pv_types, (False, True))):
        if pv == "fp8" and not has_fp8:
            continue
        smooth_v = n % 7 == 3
        cfg = AttnConfig(qk, pv, GRANULARITIES[n % 3], smooth_k=n % 5 != 4, smooth_q=qk == "int4" or n % 6 == 1,
                         smooth_v=smooth_v)
        layout = "NHD" if n % 4 == 2 else "HND"
        yield f"mma d={d} {cfg.uri} {dtype} causal={causal} {layout}", lambda d=d, cfg=cfg, dtype=dtype, causal=causal, \
            layout=layout, n=n: run_mma(d, cfg, dtype, causal, layout, n)
    # fp16 P.V accumulation: FP8 PV (any input dtype) and fp16 PV (fp16 inputs only).
    accum = ((torch.bfloat16, "fp8"), (torch.float16, "fp16")) if has_fp8 else ((torch.float16, "fp16"),)
    for n, (d, (dtype, pv), causal) in enumerate(itertools.product((64, 128, 256, 36), accum, (False, True))):
        cfg = AttnConfig("int4" if n % 3 == 1 else "int8", pv, GRANULARITIES[n % 3], smooth_q=n % 3 == 1,
                         smooth_v=n % 4 == 1, pv_accum="fp16")
        layout = "NHD" if n % 4 == 3 else "HND"
        yield f"mma d={d} {cfg.uri} {dtype} causal={causal} {layout}", lambda d=d, cfg=cfg, dtype=dtype, causal=causal, \
            layout=layout, n=n: run_mma(d, cfg, dtype, causal, layout, 100 + n)


def run_mma(d, cfg, dtype, causal, layout, seed):
    q, k, v = inputs(d, dtype, layout, causal, seed)
    o, lse = mma.attention(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=d ** -0.5, return_lse=True,
                           force_int4_emulation=True)
    return o, lse


def wgmma_cases():
    from sageattn2.backends import wgmma

    pv_types = ((torch.bfloat16, "fp8"), (torch.float16, "fp16"), (torch.bfloat16, "fp16"))
    n = 0
    for d in (64, 128, 100):
        for (dtype, pv), causal in itertools.product(pv_types, (False, True)):
            cfg = AttnConfig("int8", pv, "per_thread", smooth_k=n % 3 != 2, family="wgmma")
            schedules = wgmma.schedules_for(d) if d in (64, 128) else (None,)
            for schedule in schedules:
                layout = "NHD" if n % 4 == 1 else "HND"
                yield (f"wgmma d={d} {cfg.uri} {dtype} causal={causal} schedule={schedule or 'default'} {layout}",
                       lambda d=d, cfg=cfg, dtype=dtype, causal=causal, schedule=schedule, layout=layout, n=n:
                       run_wgmma(wgmma, d, cfg, dtype, causal, schedule, layout, n))
                n += 1


def run_wgmma(wgmma, d, cfg, dtype, causal, schedule, layout, seed):
    q, k, v = inputs(d, dtype, layout, causal, seed)
    if schedule is None:  # the product path: cached plan, fused quantizer, default schedule
        return wgmma.attention(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=d ** -0.5, return_lse=True)
    prep = wgmma.prepare(q, k, v, layout=layout, cfg=cfg, is_causal=causal, sm_scale=d ** -0.5, return_lse=True)
    return wgmma.run(prep, return_lse=True, schedule=schedule)


def _alternate(*lists):
    """Items of the lists taken in turn (a, b, a, b, ..., then the longer one's rest)."""
    return [x for group in itertools.zip_longest(*lists) for x in group if x is not None]


# ---------------------------------------------------------------------------------------
# Summary of a sanitize.sh run

_SUMMARY = re.compile(r"(ERROR SUMMARY: (?P<errors>\d+) error|RACECHECK SUMMARY: (?P<hazards>\d+) hazards? displayed "
                      r"\((?P<race_errors>\d+) errors?, (?P<warnings>\d+) warnings?\))")


def tool_verdict(log: str, rc_line: str) -> dict:
    """What one tool's run says: verdict CLEAN / ERRORS / INCOMPLETE / FAILED and its counts."""
    rc = int(re.search(r"rc=(\d+)", rc_line).group(1)) if "rc=" in rc_line else None
    seconds = re.search(r"seconds=(\d+)", rc_line)
    total = re.search(r"^TOTAL (\d+)", log, re.M)
    ok = len(re.findall(r"^ok +\S", log, re.M))
    bad = re.findall(r"^(RAISED|NON-FINITE).*", log, re.M)
    found = [m for m in _SUMMARY.finditer(log)]
    errors = warnings = None
    if found:
        m = found[-1]
        errors = int(m.group("errors") if m.group("errors") is not None else m.group("race_errors"))
        warnings = int(m.group("warnings")) if m.group("warnings") is not None else 0
    total = int(total.group(1)) if total else None
    if errors:
        verdict = "ERRORS"
    elif rc == 124 or (total is not None and ok + len(bad) < total and not bad):
        verdict = "INCOMPLETE"
    elif rc == 0 and errors == 0 and total is not None and ok == total:
        verdict = "CLEAN"
    else:
        verdict = "FAILED"
    return {"verdict": verdict, "rc": rc, "seconds": int(seconds.group(1)) if seconds else None, "errors": errors,
            "warnings": warnings, "cases": total, "ok": ok, "bad": len(bad)}


def summarize(out: Path, tools) -> int:
    rows, lines = [], []
    for tool in tools:
        log_path, rc_path = out / f"sanitize_{tool}.txt", out / f"sanitize_{tool}.rc"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        v = tool_verdict(log, rc_path.read_text() if rc_path.exists() else "")
        what = {"CLEAN": "0 errors", "ERRORS": f"{v['errors']} errors", "FAILED": f"rc {v['rc']}",
                "INCOMPLETE": "stopped by its time limit" if v["rc"] == 124 else "not every case ran"}[v["verdict"]]
        line = (f"{tool}: {v['verdict']} ({what}; {v['ok']}/{v['cases'] if v['cases'] is not None else '?'} cases ok"
                f"{', %d raised or non-finite' % v['bad'] if v['bad'] else ''}"
                f"{', %d warnings' % v['warnings'] if v['warnings'] else ''}, {v['seconds']} s)")
        print(line, flush=True)
        lines.append(line)
        rows.append((tool, v))
        if v["verdict"] != "CLEAN":  # the first reports, for the log
            for report in [ln for ln in log.splitlines() if ln.startswith("=========") and "SUMMARY" not in ln][:12]:
                print("    " + report)
    head = (out / "sanitize_header.txt").read_text().strip() if (out / "sanitize_header.txt").exists() else ""
    table = ["# compute-sanitizer over every product kernel", "", head, "",
             "| tool | verdict | errors | warnings | cases ok | seconds |", "|---|---|---|---|---|---|"]
    for tool, v in rows:
        table.append(f"| {tool} | {v['verdict']} | {v['errors'] if v['errors'] is not None else '-'} | "
                     f"{v['warnings'] if v['warnings'] is not None else '-'} | {v['ok']}/{v['cases'] or '?'} | "
                     f"{v['seconds'] if v['seconds'] is not None else '-'} |")
    clean = all(v["verdict"] == "CLEAN" for _, v in rows)
    table += ["", f"status: {'CLEAN' if clean else 'NOT CLEAN'}", "",
              "Cases: tests/gpu/sanitize_cases.py (its docstring lists them); per-tool logs beside this file."]
    (out / "sanitize_summary.md").write_text("\n".join(table) + "\n")
    print(f"status: {'CLEAN' if clean else 'NOT CLEAN'}")
    return 0 if clean else 1


def main() -> int:
    global LIB
    if sys.argv[1:2] == ["--summarize"]:
        return summarize(Path(sys.argv[2]), sys.argv[3:])
    LIB, why = loader.kernels_for_device(DEV)
    if LIB is None:
        print(f"no kernel library: {why}")
        return 2
    families = set(LIB.families)
    mma_list = list(mma_cases()) if "mma" in families else []
    wgmma_list = []
    if "wgmma" in families and torch.cuda.get_device_capability(DEV) == (9, 0):
        wgmma_list = list(wgmma_cases())
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    ok = 0
    run = [(name, fn) for name, fn in _alternate(mma_list, wgmma_list) if only in name]
    print(f"TOTAL {len(run)} (mma {sum(n.startswith('mma') for n, _ in run)}, "
          f"wgmma {sum(n.startswith('wgmma') for n, _ in run)})", flush=True)
    for name, fn in run:
        try:
            o, lse = fn()
            torch.cuda.synchronize()
            finite = bool(torch.isfinite(o).all()) and bool(torch.isfinite(lse).all())
            status = "ok" if finite else "NON-FINITE"
        except Exception as e:  # keep going: the sanitizer's report is the point
            status = f"RAISED {type(e).__name__}: {str(e)[:200]}"
        ok += status == "ok"
        print(f"{status:6s} {name}", flush=True)
    print(f"CASES {len(run)} ok {ok}", flush=True)
    return 0 if ok == len(run) else 1


if __name__ == "__main__":
    sys.exit(main())
