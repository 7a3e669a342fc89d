#!/usr/bin/env bash
# Device script for the Hadamard rotation (numerics.md §1.6): the rotating quantizers and both
# families on their operands and through the public API (tests/gpu/test_hadamard_kernels.py)
# plus the mma suite's decline test, the quantizer's cost with and without it
# (bench/bench_hadamard.py) and a memcheck of tiny rotating calls. Expects the product kernels
# built (python3 install.py -j 16 --no-selfcheck; they include the rotating quantizers); the
# kernels only these reach (INT4 emulated on Hopper) and any rotating quantizer missing from an
# older cache are compiled first, in parallel, into the same cache. About 2 minutes on an H100. Logs go under $OUT (default
# ./hadamard_out); exits non-zero on a failed build, test or memcheck.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/hadamard_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 SA2_TEST_LOG=$OUT/metrics.jsonl
rm -f "$SA2_TEST_LOG"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

echo "== build the test-only kernels"
timeout 60 python3 - <<'PY' > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
import os, sys, time, torch
from sageattn2 import archs, build, kernels, nvrtc
arch = archs.arch(*torch.cuda.get_device_capability())
nv, why = nvrtc.load()
assert nv is not None, why
wanted = lambda k: "hadamard" in k.name or (k.name.startswith("mma-d") and "-int4-" in k.name and "d256" not in k.name
                                            and not k.name.endswith("acc16"))
jobs = list({k.name: (k, arch) for k in kernels.test_kernels(arch) if wanted(k)}.values())
t = time.time()
results = build.Builder(nv, build.cache_dir()).build_all(jobs, os.cpu_count() or 8,
                                                         lambda d, n, k, a, err, log: print(k.name, err or "ok"))
print(f"{len(jobs)} kernels in {time.time() - t:.0f} s")
sys.exit(1 if any(err for _, _, err in results) else 0)
PY
tail -1 "$OUT/build.log"

echo "== tests"
timeout 90 python3 -m pytest tests/gpu/test_hadamard_kernels.py "tests/gpu/test_mma_kernels.py::test_unsupported_reasons" \
  -q -rfEs --maxfail=30 -p no:cacheprovider 2>&1 | tail -60 | tee "$OUT/pytest.txt"
status=${PIPESTATUS[0]}

echo "== bench"
timeout 30 python3 bench/bench_hadamard.py 2>&1 | tee "$OUT/bench.txt"

echo "== compute-sanitizer memcheck (tiny rotating calls)"
timeout 70 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 python3 bench/bench_hadamard.py --sanitize \
  2>&1 | tail -25 | tee "$OUT/memcheck.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== summary"
python3 - <<'PY'
import json, os
rows = [json.loads(l) for l in open(os.environ["SA2_TEST_LOG"])] if os.path.exists(os.environ["SA2_TEST_LOG"]) else []
for r in rows:
    if r.get("kind") in ("hadamard_gain", "hadamard_wgmma", "hadamard_api"):
        a, b = r["rotated"], r["plain"]
        print(f"{r['kind']:15s} {r['case']:34s} vs exact: rotated cos {a['cos']:.6f} relL1 {a['rel_l1']:.4f} "
              f"lse {a['lse_err']:.2e} | plain cos {b['cos']:.6f} relL1 {b['rel_l1']:.4f} lse {b['lse_err']:.2e}")
    elif r.get("kind") == "quant_mismatch" and r["count"]:
        print(f"quantizer one-step differences: {r['what']} {r['count']} of {r['of']}")
PY
exit "$status"
